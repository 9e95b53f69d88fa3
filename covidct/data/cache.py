"""Decode-once cache: each image is decoded and resized once, then reused across epochs and runs.

Entries are keyed by the source file's path, size and modification time plus the resize settings,
so a changed source file is decoded again. Writes are atomic (temp file + rename), so concurrent
workers and runs can share one cache directory. `warm` fills the cache up front, in parallel, so
that an unreadable image stops a run before training with an error that names the file.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from covidct.atomic import atomic_write
from covidct.data.dicom import LUNG_WINDOW
from covidct.data.sources import load_image
from covidct.data.transforms import deterministic_resize
from covidct.errors import DataError

CACHE_VERSION = 2  # 2: the authors' antialiased PIL resize
# the header np.save writes for the cache's arrays: format 1.0, uint8, C order, three dimensions
_NPY_MAGIC = b"\x93NUMPY\x01\x00"
_NPY_HEADER = re.compile(rb"\{'descr': '\|u1', 'fortran_order': False, 'shape': \((\d+), (\d+), (\d+)\), \} *\n")


def default_cache_dir() -> Path:
    return Path(os.environ.get("COVIDCT_CACHE") or Path.home() / ".cache" / "covidct")


class DecodedImageCache:
    """Resized uint8 HxWx3 arrays stored as .npy files under `cache_dir`."""

    def __init__(self, cache_dir: str | Path, image_size: int):
        self.cache_dir = Path(cache_dir)
        self.image_size = image_size
        self._resizers = {kind: deterministic_resize(kind, image_size) for kind in ("train", "eval")}

    def entry(self, path: Path, kind: str, ct_window: Sequence[float] = LUNG_WINDOW) -> Path:
        stat = Path(path).stat()
        ident = f"v{CACHE_VERSION}|{Path(path).resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{kind}|{self.image_size}"
        if tuple(ct_window) != LUNG_WINDOW:  # a site's own DICOM window (the default keeps the keys it always had)
            ident += f"|window={float(ct_window[0])},{float(ct_window[1])}"
        key = hashlib.sha1(ident.encode()).hexdigest()
        return self.cache_dir / key[:2] / f"{key}.npy"

    def get(
        self, path: Path, kind: str, entry: Path | None = None, ct_window: Sequence[float] = LUNG_WINDOW
    ) -> np.ndarray:
        """The resized image, decoded now if it is not cached (or its entry is unreadable). A caller that
        keeps `entry(path, kind, ct_window)` passes it, sparing a stat and a hash per read."""
        entry = entry or self.entry(path, kind, ct_window)
        try:
            return read_npy(entry)
        except (FileNotFoundError, ValueError, OSError):
            return self._fill(path, kind, entry, ct_window)

    def warm(self, items: Iterable[tuple[Path, str, Sequence[float]]], workers: int = 1) -> int:
        """Decode every (path, kind, DICOM window) not cached yet; returns how many were decoded."""
        missing = [
            (path, kind, entry, window)
            for path, kind, window in items
            if not (entry := self.entry(path, kind, window)).is_file()
        ]
        if workers <= 1 or len(missing) < 64:
            for job in missing:
                self._fill(*job)
        else:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                list(pool.map(self._fill_discard, missing, chunksize=32))
        return len(missing)

    def _fill_discard(self, job: tuple[Path, str, Path, Sequence[float]]) -> None:
        self._fill(*job)

    def _fill(self, path: Path, kind: str, entry: Path, ct_window: Sequence[float] = LUNG_WINDOW) -> np.ndarray:
        image = self._resizers[kind](load_image(path, ct_window))

        def save(temp: Path) -> None:
            with temp.open("wb") as fh:  # np.save given a path would add '.npy' to the temp file's name
                np.save(fh, image)

        try:
            atomic_write(entry, save)
        except OSError as err:
            raise DataError(
                f"cannot write the decode cache in {self.cache_dir} ({err.strerror or err}; an entry needs about "
                f"{image.nbytes // 1024} KiB): free space there, or set data.cache_dir (env COVIDCT_CACHE) elsewhere."
            ) from None
        return image


def read_npy(path: Path) -> np.ndarray:
    """np.load for the cache's own arrays at about a third of its cost (np.load's is mostly parsing the
    header in Python); any other .npy goes to np.load. Read-only; a truncated file raises ValueError."""
    data = path.read_bytes()
    if data[:8] == _NPY_MAGIC:
        end = 10 + int.from_bytes(data[8:10], "little")
        header = _NPY_HEADER.fullmatch(data[10:end])
        if header:
            return np.frombuffer(data, np.uint8, offset=end).reshape(tuple(int(n) for n in header.groups()))
    return np.load(io.BytesIO(data))
