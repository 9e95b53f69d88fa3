"""Image files decoded for a model, in order, by worker processes: what `predict` (and `bench --dicom`) read.

A DataLoader over the files (batch_size=None: one item a file) keeps their order and moves decoding, the costly
part of a 512x512 JPEG Lossless slice, out of the process that classifies; an unreadable file becomes its
error, so one damaged slice never stops a series.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from covidct.errors import DataError

Decoded = tuple[Path, "np.ndarray | None", "str | None"]  # a file, its resized image or why it is unreadable
LoadImage = Callable[[Path, Sequence[float]], np.ndarray]  # a file and a DICOM window -> the model's input image


class _DecodeFiles(torch.utils.data.Dataset):
    """The files, each decoded and resized as the model's evaluation cache would hold it, or its error (naming
    the file by its path under `folder`, as the rows do)."""

    def __init__(self, load: LoadImage, folder: Path, files: Sequence[Path], ct_window: Sequence[float]):
        self.load, self.folder, self.files, self.ct_window = load, folder, list(files), tuple(ct_window)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Decoded:
        path = self.files[index]
        if not path.exists():
            return path, None, "cannot read image: a broken link (its target does not exist)"
        try:
            return path, self.load(path, self.ct_window), None
        except DataError as err:
            message = str(err.__cause__ or err).replace(str(path), path.relative_to(self.folder).as_posix())
            return path, None, f"cannot read image: {message}"


def _as_is(item: Decoded) -> Decoded:
    return item


class DecodedImages:
    """The files decoded in order, by `workers` DataLoader processes (decoding a 512x512 JPEG Lossless slice
    costs more than classifying it) or in this process; iterable again, each time decoding anew."""

    def __init__(self, load: LoadImage, folder: Path, files: Sequence[Path], ct_window: Sequence[float], workers: int):
        self.dataset, self.workers = _DecodeFiles(load, folder, files, ct_window), workers

    def __iter__(self) -> Iterator[Decoded]:
        if self.workers == 0 or len(self.dataset) < 2:
            return (self.dataset[i] for i in range(len(self.dataset)))
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=None, num_workers=min(self.workers, len(self.dataset)), collate_fn=_as_is
        )
        return iter(loader)


def chunks(decoded: Iterable[Decoded], size: int) -> Iterator[list[Decoded]]:
    chunk: list[Decoded] = []
    for item in decoded:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
