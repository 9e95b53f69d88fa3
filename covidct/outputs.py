"""Where predict, evaluate and explain may write: never over a run's record or one of their inputs, and over an
existing file only when asked (`overwrite=true`). Their files are then written atomically (covidct/atomic.py).

A run's record is everything in a run folder (the one holding run_config.json: metrics.json, predictions.csv,
run.log, checkpoints/, csv/, .hydra/) but the `evaluate/` and `gradcam/` folders those commands write by default;
the report counts a run whose record was replaced as missing, and no command's output is worth a training run.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from covidct.errors import ConfigError

RUN_MARKER = "run_config.json"  # written by covidct.run into every run folder
COMMAND_FOLDERS = ("evaluate", "gradcam")  # where evaluate and explain write inside a run folder by default


def is_run_folder(folder: Path) -> bool:
    return (Path(folder) / RUN_MARKER).is_file()


def check_outputs(outputs: Iterable[Path], inputs: Iterable[Path], overwrite: bool, option: str = "out") -> None:
    """Refuse, in one line naming the file, an output inside a run's record or one of the `inputs`
    (the files a command reads: its checkpoint, images, predictions), or that exists while `overwrite` is false."""
    sources = {Path(p).resolve() for p in inputs}
    for output in outputs:
        path = Path(output).resolve()
        run = next((folder for folder in path.parents if is_run_folder(folder)), None)
        if run is not None and path.relative_to(run).parts[0] not in COMMAND_FOLDERS:
            raise ConfigError(
                f"{option}={output} would write into the record of the run in {run}; choose a folder outside it "
                f"(or its {' or '.join(f'{name}/' for name in COMMAND_FOLDERS)} folder)."
            )
        if path in sources:
            raise ConfigError(f"{option}={output} would overwrite one of its inputs; choose another {option}.")
        if path.exists() and not overwrite:
            raise ConfigError(f"{output} exists; add overwrite=true to replace it, or choose another {option}.")
