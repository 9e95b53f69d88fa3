"""The test loop's rules (tests/conftest.py): a real-data test skips without the data, naming
COVIDCT_SHARED_DATA, and fails in CI; it carries the `real_data` marker, so `-m "not real_data"` leaves
it out before its fixture runs; a `gpu` test skips without CUDA."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import torch

from tests.helpers import REPO

TINY = """
import pytest


def test_uses_the_data(real_data):
    assert real_data.is_dir()


def test_needs_no_data():
    pass


@pytest.mark.gpu
def test_needs_cuda():
    pass
"""


def _pytest(tmp_path: Path, ci: bool, *args: str) -> tuple[dict[str, int], str]:
    (tmp_path / "test_tiny.py").write_text(TINY)
    empty = tmp_path / "no-data"
    empty.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["COVIDCT_SHARED_DATA"] = str(empty)
    if ci:
        env["CI"] = "true"
    result = subprocess.run(
        # the project's pytest settings (markers, --strict-markers) and its conftest, on the tiny file alone
        [sys.executable, "-m", "pytest", "-c", str(REPO / "pyproject.toml"), "--rootdir", str(tmp_path)]
        + ["-p", "tests.conftest", "-p", "no:cacheprovider", "-rsE", str(tmp_path / "test_tiny.py"), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = result.stdout + result.stderr
    summary = output.strip().splitlines()[-1]
    counts = {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", summary)}
    counts["errors"] = counts.pop("error", 0) + counts.pop("errors", 0)
    return {"rc": result.returncode, **counts}, output


def _gpu() -> tuple[int, int]:
    """What the gpu test adds to (passed, skipped)."""
    return (1, 0) if torch.cuda.is_available() else (0, 1)


def test_without_the_data_a_real_data_test_skips_naming_the_variable(tmp_path: Path):
    counts, output = _pytest(tmp_path, ci=False)
    passed, skipped = _gpu()
    assert counts == {"rc": 0, "passed": 1 + passed, "skipped": 1 + skipped, "errors": 0}, output
    assert f"the real data is not at {tmp_path / 'no-data'}; set COVIDCT_SHARED_DATA to its folder" in output
    assert torch.cuda.is_available() or "needs a CUDA device" in output


def test_in_ci_without_the_data_a_real_data_test_fails(tmp_path: Path):
    counts, output = _pytest(tmp_path, True, "-k", "not cuda")
    assert counts == {"rc": 1, "passed": 1, "deselected": 1, "errors": 1}, output
    assert "set COVIDCT_SHARED_DATA to its folder (CI=true: the real-data tests must run)" in output


def test_the_fast_loop_deselects_real_data_and_gpu_tests_before_they_run(tmp_path: Path):
    counts, output = _pytest(tmp_path, True, "-m", "not slow and not real_data and not gpu")
    assert counts == {"rc": 0, "passed": 1, "deselected": 2, "errors": 0}, output
