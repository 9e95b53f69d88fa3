"""What the Makefile writes where: measurements and tables stay out of tracked files unless asked."""

import subprocess

from tests.helpers import REPO


def _dry_run(*args: str) -> str:
    """The commands `make ARGS` would run, each on one line (its continuations joined)."""
    result = subprocess.run(["make", "-n", "--no-print-directory", *args], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout.replace("\\\n\t", "")


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
    methods = ",".join(e.name for e in table1_experiments(block="centralised"))
    assert f"-m experiment={methods} +protocol=smoke" in plan and "'data.test_sites=[A],[B]'" in plan
    assert 'paths.log_dir="outputs/loso-smoke"' in plan
    assert '--runs "outputs/loso-smoke" --out "outputs/loso-smoke"' in plan
    assert "'data.test_sites=[C]'" in _dry_run("loso", "PROTOCOL=smoke", "HELD_OUT=[C]")


def test_a_recorded_sweep_keeps_its_runs_beside_its_tables_and_runs_fold_by_fold():
    """RECORD=1: the runs are committed with their tables (so a fresh clone finds and skips them), every
    method's fold 0 first (Hydra sweeps the first override slowest); the selection names tables, not runs."""
    plan = _dry_run("table1", "PROTOCOL=cpu", "SEEDS=643", "RECORD=1")
    assert "-m fold=0,1,2,3 seed=643 experiment=" in plan
    assert 'paths.log_dir="experiments/table1-cpu/runs"' in plan
    both = '--runs-if-present "experiments/table1-cpu/runs" --runs-if-present "experiments/federated-cpu/runs"'
    assert f'{both} --out "experiments/table1-cpu"' in plan  # Table I's report shows the Federated block too
    best = _dry_run("table1-collect", "PROTOCOL=cpu", "RECORD=1", "SELECT=best_val_auc")
    assert '--runs-if-present "experiments/federated-cpu/runs" --out "experiments/table1-cpu-best_val_auc"' in best
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", "experiments/table1-cpu/runs/ours/fold0-seed643-x/checkpoints/last.ckpt"],
        cwd=REPO,
    )
    assert ignored.returncode == 0, "committed run records leave their checkpoints out"
    loso = _dry_run("loso", "PROTOCOL=cpu", "FOLDS=0", "SEEDS=643", "RECORD=1", "LOSO_EXPERIMENTS=ours,sepnorm")
    assert "-m experiment=ours,sepnorm +protocol=cpu fold=0 seed=643" in loso
    assert '--runs "experiments/loso-cpu/runs" --out "experiments/loso-cpu"' in loso


def test_federated_sweeps_the_federated_block_into_its_runs_and_table1_reports_it_beside_the_centralised_runs():
    from covidct.experiments import table1_experiments

    plan = _dry_run("federated", "PROTOCOL=cpu", "FOLDS=0", "SEEDS=643", "RECORD=1")
    methods = ",".join(e.name for e in table1_experiments(block="federated"))
    assert f"-m fold=0 seed=643 experiment={methods} +protocol=cpu" in plan
    assert 'paths.log_dir="experiments/federated-cpu/runs"' in plan
    assert "table1-collect" in plan  # then Table I's report, which now finds the federated runs
