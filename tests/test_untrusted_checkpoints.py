"""Checkpoints from another institution never run their code (issue 23, item 1): a crafted `.ckpt`, a real
checkpoint with one object whose unpickling calls `open(MARKER, "w")`, goes through every entry point that reads a
checkpoint, as real processes; each refuses it in one line naming the file, and the marker is never created."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import FAST, REPO


class Payload:
    """Unpickling this calls open(marker, "w"): the file appears if any code path unpickles arbitrary objects."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def _cli(module: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def trained(phantom_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished phantom run of `ours` (its folder), trained through the CLI."""
    run = tmp_path_factory.mktemp("trusted") / "run"
    done = _cli("covidct.run", "experiment=ours", f"data.root={phantom_root}", *FAST, f"hydra.run.dir={run}")
    assert done.returncode == 0, done.stderr[-3000:]
    return run


def _crafted(trained: Path, where: Path, marker: Path) -> Path:
    checkpoint = torch.load(trained / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    checkpoint["note"] = Payload(marker)
    where.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, where)
    return where


def _refused(done: subprocess.CompletedProcess, crafted: Path, marker: Path) -> None:
    assert not marker.exists(), "the checkpoint's code ran"
    assert done.returncode != 0, done.stdout[-2000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    line = next(x for x in done.stderr.splitlines() if x.startswith("error:"))
    assert str(crafted) in line and "is refused: loading it would run code it carries (io.open)" in line


def test_the_crafted_file_would_run_its_code_if_unpickled(trained: Path, tmp_path: Path) -> None:
    """The probe is real: torch's full unpickler creates the marker (so the tests below can fail)."""
    marker = tmp_path / "ran"
    crafted = _crafted(trained, tmp_path / "crafted.ckpt", marker)
    torch.load(crafted, map_location="cpu", weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize(
    "command",
    [
        "predict",
        pytest.param("evaluate", marks=pytest.mark.slow),
        pytest.param("explain", marks=pytest.mark.slow),
    ],
)
def test_predict_evaluate_and_explain_refuse_it(
    command: str, trained: Path, phantom_root: Path, tmp_path: Path
) -> None:
    marker = tmp_path / "ran"
    run = tmp_path / "run"
    shutil.copytree(trained, run, ignore=shutil.ignore_patterns("*.ckpt"))
    crafted = _crafted(trained, run / "checkpoints" / "last.ckpt", marker)
    args = {
        "predict": [f"images={phantom_root / 'covid-ct' / 'CT_COVID'}", "site=B", f"out={tmp_path / 'p.csv'}"],
        "evaluate": ["site=B", f"data_root={phantom_root}", f"out={tmp_path / 'eval'}"],
        "explain": ["site=B", f"data_root={phantom_root}", f"out={tmp_path / 'cam'}"],
    }[command]
    _refused(_cli(f"covidct.{command}", f"ckpt={crafted}", *args), crafted, marker)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["resume_from", "warm_start", "last.ckpt"])
def test_a_run_refuses_it_to_resume_or_warm_start_from(
    how: str, trained: Path, phantom_root: Path, tmp_path: Path
) -> None:
    marker = tmp_path / "ran"
    base = ["experiment=ours", f"data.root={phantom_root}", *FAST]
    if how == "last.ckpt":  # an interrupted run's folder (no record) whose last checkpoint was replaced
        run = tmp_path / "run"
        shutil.copytree(trained, run, ignore=shutil.ignore_patterns("*.ckpt", "metrics.json"))
        crafted = _crafted(trained, run / "checkpoints" / "last.ckpt", marker)
        args = [*base, f"hydra.run.dir={run}"]
    else:
        crafted = _crafted(trained, tmp_path / "given.ckpt", marker)
        args = [*base, f"resume_from={crafted}", f"hydra.run.dir={tmp_path / 'run'}"]
        args += ["warm_start=true"] if how == "warm_start" else []
    _refused(_cli("covidct.run", *args), crafted, marker)


@pytest.mark.slow
def test_a_crafted_file_among_a_finished_runs_checkpoints_is_left_unread(
    trained: Path, phantom_root: Path, tmp_path: Path
) -> None:
    """At its end a run rewrites its checkpoints without their optimizer state: a planted file is not loaded."""
    marker = tmp_path / "ran"
    run = tmp_path / "run"
    crafted = _crafted(trained, run / "checkpoints" / "planted.ckpt", marker)
    done = _cli("covidct.run", "experiment=ours", f"data.root={phantom_root}", *FAST, f"hydra.run.dir={run}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert (run / "metrics.json").is_file() and not marker.exists()
    assert f"checkpoint {crafted} is refused" in done.stdout + done.stderr
