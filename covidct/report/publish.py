"""The report's outputs replace the previous report's in OUT as one set, so a report killed at any moment never
leaves new tables beside old figures.

OUT may hold other things (the runs themselves, a README: `make table1 RECORD=1` reports into
experiments/table1-cpu/, whose layout is committed), so the set cannot be one folder swapped by one rename, and
no system call replaces several files at once. Instead:

1. every output is written into a fresh hidden folder inside OUT (`.report-new-*`); OUT is untouched while
   the tables and figures are computed, which is nearly all of a report's time. A kill here leaves the old set.
2. the commit point: a journal (`.report-replacing.json`, written atomically) lists the new files and the old
   outputs that the new set lacks.
3. each new file is renamed over its old one (same file system: no copy) and the stale ones are removed; then
   the journal goes. A kill inside this step (a few renames, well under a millisecond) leaves the journal, and
   the next report into OUT finishes its replacement before anything else, so what a kill leaves is the old
   set, the new set, or a journal that completes the new set.

An exclusive lock on OUT (flock on the folder itself: no lock file in a committed layout) keeps two reports from
replacing one set at once, and lets a report remove the staging folders killed reports left.

Written by hand: no maintained library replaces a set of files inside a shared folder (tempfile makes the
folder, os.replace the renames); it follows the write-ahead log of a database commit.
"""

from __future__ import annotations

import fcntl
import fnmatch
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from covidct.atomic import atomic_write_text
from covidct.errors import ConfigError, DataError

# Every file the report writes into OUT (text, figures, the LOSO table); a previous report's file of these names
# that the new one does not write again is stale and goes with the old set.
OUTPUT_PATTERNS = (
    *("table1.md", "table1.csv", "table1.tex", "ttests.csv", "intervals.csv", "delong.csv", "provenance.json"),
    *("claims.md", "claims.csv", "loso.md", "loso.csv", "learning_curves.png", "roc_*.png", "reliability_*.png"),
)
STAGING_PREFIX = ".report-new-"
JOURNAL = ".report-replacing.json"
log = logging.getLogger(__name__)


def is_output(name: str) -> bool:
    """Whether a file name in OUT is one of the report's outputs (a name, never a path)."""
    return "/" not in name and any(fnmatch.fnmatchcase(name, pattern) for pattern in OUTPUT_PATTERNS)


def report_outputs(out: Path) -> list[str]:
    """The names of the report's outputs now in `out`."""
    return sorted(p.name for p in Path(out).iterdir() if p.is_file() and is_output(p.name)) if out.is_dir() else []


@contextmanager
def replaced_outputs(out: Path) -> Iterator[Path]:
    """A fresh staging folder inside `out` to write the report's outputs into; when the block ends without an
    error they replace the previous report's outputs in `out` as one set (the module's steps), and when it raises
    the previous set stays as it was. Finishes first what an interrupted report left (its journal) and removes
    the staging folders of killed reports."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(f"cannot create the report folder {out} ({err.strerror or err}).") from None
    with _locked(out):
        if finish_interrupted(out):
            log.warning("%s: finished replacing the outputs of a report killed while it replaced them", out)
        for leftover in out.glob(f"{STAGING_PREFIX}*"):
            shutil.rmtree(leftover, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=out))
        try:
            yield staging
            written = sorted(p.name for p in staging.iterdir())
            unknown = [name for name in written if not is_output(name)]
            if unknown:  # a new output must be in OUTPUT_PATTERNS, or the next report would leave it stale
                raise RuntimeError(f"the report wrote {unknown}, which OUTPUT_PATTERNS does not name")
            stale = [name for name in report_outputs(out) if name not in written]
            journal = {"staging": staging.name, "write": written, "remove": stale}
            atomic_write_text(staging / JOURNAL, json.dumps(journal, indent=1) + "\n")  # a kill leaves no temp in OUT
            os.replace(staging / JOURNAL, out / JOURNAL)
            _replace(out, journal)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def finish_interrupted(out: Path) -> bool:
    """Complete the replacement a report killed after its commit point began (its journal in `out`); whether
    there was one. The renames it already made are not made again."""
    path = Path(out) / JOURNAL
    if not path.is_file():
        return False
    try:
        journal = json.loads(path.read_text())
        names = [*journal["write"], *journal["remove"]]
        staging = journal["staging"]
        if not (isinstance(staging, str) and staging.startswith(STAGING_PREFIX) and "/" not in staging):
            raise ValueError(f"its staging folder {staging!r} is not one of a report's")
        if not all(isinstance(n, str) and is_output(n) for n in names):
            raise ValueError("it names files that are not the report's outputs")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(
            f"{path} is not a report's journal ({err}); delete it and rerun the report (its outputs in {out} may "
            "mix two reports until then)."
        ) from None
    _replace(Path(out), journal)
    return True


def _replace(out: Path, journal: dict) -> None:
    """Step 3: the staged files over the old ones, the stale ones removed, then the journal."""
    staging = out / journal["staging"]
    for name in journal["write"]:
        if (staging / name).is_file():  # not yet moved (a file moved before a kill is already in place)
            os.replace(staging / name, out / name)
    for name in journal["remove"]:
        (out / name).unlink(missing_ok=True)
    (out / JOURNAL).unlink()
    shutil.rmtree(staging, ignore_errors=True)


@contextmanager
def _locked(out: Path) -> Iterator[None]:
    """An exclusive lock on the folder `out` while a report replaces its outputs; released however it ends. A
    file system without flock (some network mounts) goes without."""
    handle = os.open(out, os.O_RDONLY)
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(
                f"another report is writing into {out}; wait for it to finish, or give this one its own --out."
            ) from None
        except OSError:
            pass
        yield
    finally:
        os.close(handle)
