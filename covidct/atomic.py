"""Atomic file writes: a reader, or a rerun after a kill, finds the old file or the new one, never half of one."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from covidct.errors import DataError


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Let `write` fill a temp file beside `path` (torch.save, np.save, a download), then rename it over `path`.

    The temp file is removed whatever fails; an OSError (a full disk) is re-raised for the caller to say what
    the file is and how much space it needs.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    temp = Path(name)
    try:
        write(temp)
        os.chmod(temp, 0o666 & ~_umask())  # mkstemp's 0600 would hide results from a lab's group
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """`text` as UTF-8 into `path`, atomically; a failed write names the path."""

    def write(temp: Path) -> None:
        with os.fdopen(os.open(temp, os.O_WRONLY | os.O_TRUNC), "w", encoding="utf-8") as fh:
            fh.write(text)

    try:
        atomic_write(path, write)
    except OSError as err:  # e.g. a full disk: say where
        raise DataError(f"cannot write {path} ({err.strerror or err}); free space there and rerun.") from None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
