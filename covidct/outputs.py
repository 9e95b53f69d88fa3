"""Where predict, evaluate and explain may write: never over a run's record or one of their inputs, and over an
existing file only when asked (`overwrite=true`). Their files are then written atomically (covidct/atomic.py).

A run's record is the top level of a run folder (the one holding run_config.json: metrics.json, predictions.csv,
run.log and the rest); the report counts a run whose record was replaced as missing, and no command's output
is worth a training run.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from covidct.errors import ConfigError

RUN_MARKER = "run_config.json"  # written by covidct.run into every run folder


def is_run_folder(folder: Path) -> bool:
    return (Path(folder) / RUN_MARKER).is_file()


def check_outputs(outputs: Iterable[Path], inputs: Iterable[Path], overwrite: bool, option: str = "out") -> None:
    """Refuse, in one line naming the file, an output that is a file of a run's record or one of the `inputs`
    (the files a command reads: its checkpoint, images, predictions), or that exists while `overwrite` is false."""
    sources = {Path(p).resolve() for p in inputs}
    for output in outputs:
        path = Path(output).resolve()
        if is_run_folder(path.parent):
            raise ConfigError(
                f"{option}={output} would write into the record of the run in {path.parent}; choose a folder outside "
                "it (or a subfolder of it)."
            )
        if path in sources:
            raise ConfigError(f"{option}={output} would overwrite one of its inputs; choose another {option}.")
        if path.exists() and not overwrite:
            raise ConfigError(f"{output} exists; add overwrite=true to replace it, or choose another {option}.")
