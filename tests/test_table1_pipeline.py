"""`make table1` end to end on phantom data: all nine rows, every output, and a rerun that runs nothing."""

import os
import subprocess
from pathlib import Path

from tests.helpers import REPO


def make_table1(phantom_root: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    hydra_args = "model.backbone.width=0.125 data.num_workers=0 data.batch_per_site=4 data.eval_batch_size=16"
    return subprocess.run(
        [
            "make",
            "--no-print-directory",
            "table1",
            "PROTOCOL=smoke",
            f"OUT={tmp_path / 'out'}",
            f"RUNS={tmp_path / 'runs'}",
            f"DATA={phantom_root}",
            f"HYDRA_ARGS={hydra_args}",
        ],
        cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        capture_output=True,
        text=True,
        timeout=900,
    )


def test_make_table1_smoke_then_rerun_runs_nothing(phantom_root: Path, tmp_path: Path):
    first = make_table1(phantom_root, tmp_path)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    out = tmp_path / "out"
    for name in ("table1.md", "table1.csv", "table1.tex", "ttests.csv", "roc_A.png", "roc_B.png"):
        assert (out / name).is_file(), name
    rows = (out / "table1.csv").read_text().splitlines()
    assert len(rows) == 1 + 9 * 2 * 5
    assert all(row.split(",")[4:6] == ["1", "1"] for row in rows[1:]), "every cell should hold its one smoke run"
    assert all(row.split(",")[-2] for row in rows[1:]), "the paper's value sits beside every cell"
    records = sorted((tmp_path / "runs").glob("*/*/metrics.json"))
    assert len(records) == 9
    stamps = [p.stat().st_mtime_ns for p in records]
    table = (out / "table1.csv").read_text()

    second = make_table1(phantom_root, tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert (second.stdout + second.stderr).count("skipping") == 9
    assert [p.stat().st_mtime_ns for p in records] == stamps
    assert (out / "table1.csv").read_text() == table
