"""Decode-once cache: each image is decoded and resized once, then reused across epochs and runs.

Entries are keyed by the source file's path, size and modification time plus the resize settings,
so a changed source file is decoded again. Writes are atomic (temp file + rename), so concurrent
workers and runs can share one cache directory.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np

from covidct.data.sources import load_image
from covidct.data.transforms import deterministic_resize

CACHE_VERSION = 1


def default_cache_dir() -> Path:
    return Path(os.environ.get("COVIDCT_CACHE", Path.home() / ".cache" / "covidct"))


class DecodedImageCache:
    """Resized uint8 HxWx3 arrays on disk (or in memory when `cache_dir` is None)."""

    def __init__(self, cache_dir: str | Path | None, image_size: int):
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.image_size = image_size
        self._memory: dict[str, np.ndarray] = {}
        self._resizers = {kind: deterministic_resize(kind, image_size) for kind in ("train", "eval")}

    def _key(self, path: Path, kind: str) -> str:
        stat = path.stat()
        ident = f"v{CACHE_VERSION}|{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{kind}|{self.image_size}"
        return hashlib.sha1(ident.encode()).hexdigest()

    def get(self, path: Path, kind: str) -> np.ndarray:
        key = self._key(Path(path), kind)
        if self.cache_dir is None:
            if key not in self._memory:
                self._memory[key] = self._decode(path, kind)
            return self._memory[key]
        entry = self.cache_dir / key[:2] / f"{key}.npy"
        try:
            return np.load(entry)
        except (FileNotFoundError, ValueError, OSError):
            image = self._decode(path, kind)
            self._write(entry, image)
            return image

    def _decode(self, path: Path, kind: str) -> np.ndarray:
        return self._resizers[kind](image=load_image(path))["image"]

    @staticmethod
    def _write(entry: Path, image: np.ndarray) -> None:
        entry.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=entry.parent, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                np.save(fh, image)
            os.replace(tmp, entry)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
