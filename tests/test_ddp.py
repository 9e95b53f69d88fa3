"""`trainer=ddp` on CPU: two gloo processes train and rank 0 writes a valid run record."""

import json
from pathlib import Path

import pytest

from covidct.metrics import STATISTICS
from tests.helpers import FAST, run_cli

pytestmark = pytest.mark.slow  # 2-process DDP through the CLI


def test_ddp_two_cpu_processes_write_a_run_record(phantom_root: Path, tmp_path: Path):
    result = run_cli(["experiment=ours", f"data.root={phantom_root}", "trainer=ddp", *FAST], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (record_path,) = tmp_path.glob("ours/*/metrics.json")
    record = json.loads(record_path.read_text())
    assert record["config"]["trainer"]["strategy"] == "ddp" and record["config"]["trainer"]["devices"] == 2
    for site in ("A", "B"):
        metrics = record["test"]["last"]["images"][site]
        assert set(metrics) == set(STATISTICS) and all(v is None or 0 <= v <= 1 for v in metrics.values())
    sites = record["run"]["splits"]["sites"]
    rows = record_path.with_name("predictions.csv").read_text().splitlines()[1:]
    assert len(rows) == sites["A"]["test"]["images"] + sites["B"]["test"]["images"]
    assert record["run"]["global_steps"] == 2
