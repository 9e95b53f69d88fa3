"""What the Makefile writes where: measurements and tables stay out of tracked files unless asked."""

import subprocess

from tests.helpers import REPO


def _dry_run(*args: str) -> str:
    result = subprocess.run(["make", "-n", "--no-print-directory", *args], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_bench_and_tables_go_to_outputs_unless_recorded():
    assert "--json outputs/bench/bench-cpu.json" in _dry_run("bench", "DEVICE=cpu")
    assert "--json experiments/bench/bench-cpu.json" in _dry_run("bench", "DEVICE=cpu", "RECORD=1")
    assert '--out "outputs/table1-smoke"' in _dry_run("table1-collect", "PROTOCOL=smoke")
    assert '--out "experiments/table1-smoke"' in _dry_run("table1-collect", "PROTOCOL=smoke", "RECORD=1")
    ignored = subprocess.run(["git", "check-ignore", "-q", "outputs/bench/bench-cpu.json"], cwd=REPO)
    assert ignored.returncode == 0, "outputs/ must be ignored by git"


def test_train_runs_the_cpu_protocol_without_a_gpu_and_the_paper_when_asked():
    """This machine has no GPU (the tests run on CPU): the CPU protocol, said in one line; PROTOCOL= forces."""
    import torch

    if torch.cuda.is_available():
        assert "+protocol=paper" in _dry_run("train")
        return
    plan = _dry_run("train")
    assert "+protocol=cpu" in plan and "its numbers are not the paper's" in plan
    forced = _dry_run("train", "PROTOCOL=paper")
    assert "+protocol=paper" in forced and "CPU protocol" not in forced


def test_loso_sweeps_every_table1_method_over_the_held_out_sites_then_reports():
    from covidct.experiments import table1_experiments

    plan = _dry_run("loso", "PROTOCOL=smoke")
    methods = ",".join(e.name for e in table1_experiments())
    assert f"-m experiment={methods} +protocol=smoke" in plan and "'data.test_sites=[A],[B]'" in plan
    assert 'paths.log_dir="outputs/loso-smoke"' in plan
    assert '--runs "outputs/loso-smoke" --out "outputs/loso-smoke"' in plan
    assert "'data.test_sites=[C]'" in _dry_run("loso", "PROTOCOL=smoke", "HELD_OUT=[C]")
