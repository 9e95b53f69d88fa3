"""Reliability: resume after SIGKILL, idempotent sweeps, determinism, refusals that leave results untouched."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from covidct.errors import ConfigError, DataError, TrainingDiverged, TrainingIncomplete
from covidct.training.fit import train
from tests.helpers import FAST, REPO, RequeueableRun, cli_env, compose_experiment, run_cli

# Full phantom epochs (32 steps) so that a kill lands inside an epoch, not between runs.
LONG = [o for o in FAST if not o.startswith(("trainer.max_epochs", "trainer.limit_train_batches"))] + [
    "trainer.max_epochs=3"
]


def _record(folder: Path) -> dict:
    record = json.loads((folder / "metrics.json").read_text())
    record["config"].pop("paths")
    return record


def _wait_for(path: Path, process: subprocess.Popen | None = None, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the run ended (rc={process.returncode}) before {path} appeared")
        assert time.time() < deadline, f"{path} did not appear"
        time.sleep(0.05)


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


@pytest.mark.slow
def test_sigkill_mid_run_then_rerun_gives_the_uninterrupted_record(phantom_root: Path, tmp_path: Path):
    args = ["experiment=ours", f"data.root={phantom_root}", *LONG]
    straight = run_cli(args, tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr[-2000:]
    (reference,) = (tmp_path / "straight" / "ours").iterdir()

    killed_root = tmp_path / "killed"
    process = subprocess.Popen(
        [sys.executable, "-m", "covidct.run", *args],
        cwd=REPO,
        env=cli_env(killed_root),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        _wait_for(killed_root / "ours" / reference.name / "checkpoints" / "last.ckpt", process)
        time.sleep(0.4)  # into the next epoch
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    folder = killed_root / "ours" / reference.name
    assert not (folder / "metrics.json").exists(), "the kill came too late to test resuming"
    assert torch.load(folder / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["epoch"] < 3

    resumed = run_cli(args, killed_root)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stdout + resumed.stderr
    assert _record(folder) == _record(reference)


@pytest.mark.slow
def test_rerun_multirun_skips_finished_runs_and_a_changed_config_gets_a_new_folder(phantom_root: Path, tmp_path: Path):
    args = ["experiment=joint", f"data.root={phantom_root}", *FAST, "fold=0,1", "-m"]
    first = run_cli(args, tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    records = sorted((tmp_path / "joint").glob("*/metrics.json"))
    assert len(records) == 2
    stamps = [(p.stat().st_mtime_ns, p.read_bytes()) for p in records]

    again = run_cli(args, tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert (again.stdout + again.stderr).count("skipping") == 2
    assert [(p.stat().st_mtime_ns, p.read_bytes()) for p in records] == stamps

    changed = run_cli(
        ["experiment=joint", f"data.root={phantom_root}", *FAST, "fold=0", "model.optimizer.lr=3e-4"], tmp_path
    )
    assert changed.returncode == 0, changed.stderr[-2000:]
    assert len(list((tmp_path / "joint").glob("*/metrics.json"))) == 3
    assert [(p.stat().st_mtime_ns, p.read_bytes()) for p in records] == stamps


@pytest.mark.slow
def test_same_seed_same_record_and_another_seed_other_numbers(phantom_root: Path, tmp_path: Path):
    def run(seed: int, folder: str) -> dict:
        train(compose_experiment("ours", [f"data.root={phantom_root}", *FAST, f"seed={seed}"]), tmp_path / folder)
        return json.loads((tmp_path / folder / "metrics.json").read_text())

    first, second, other = run(5, "a"), run(5, "b"), run(6, "c")
    assert first == second
    assert (tmp_path / "a" / "predictions.csv").read_bytes() == (tmp_path / "b" / "predictions.csv").read_bytes()
    assert first["test"] != other["test"]
    assert first["run"]["splits"] == other["run"]["splits"]  # folds depend on split_seed only


@pytest.mark.slow
def test_a_folder_of_another_config_is_refused_and_left_untouched(phantom_root: Path, tmp_path: Path):
    train(compose_experiment("joint", [f"data.root={phantom_root}", *FAST]), tmp_path)
    before = (tmp_path / "metrics.json").read_bytes()
    with pytest.raises(ConfigError, match=r"holds a run of another configuration \(differs in: model.optimizer.lr\)"):
        train(compose_experiment("joint", [f"data.root={phantom_root}", *FAST, "model.optimizer.lr=0.1"]), tmp_path)
    assert (tmp_path / "metrics.json").read_bytes() == before
    # the same config (even with another data root or worker count) skips and returns the record
    again = train(compose_experiment("joint", [f"data.root={phantom_root}", *FAST, "data.num_workers=1"]), tmp_path)
    assert again == json.loads(before)["test"]


@pytest.mark.slow
@pytest.mark.parametrize("fused", [False, True], ids=["checked-each-step", "fused-skips-on-device"])
def test_nan_loss_stops_at_its_step_and_keeps_the_last_good_checkpoint(phantom_root: Path, tmp_path: Path, fused):
    """Unfused, the loss is read every step; fused (the sync-free GPU path) the update is skipped on the
    device and the host learns of it by the epoch's end at the latest: the same step is named either way."""
    overrides = [f"data.root={phantom_root}", *FAST, "trainer.max_epochs=3", "trainer.limit_train_batches=3"]
    overrides += [f"callbacks.fast_path.gpu_tuning={fused}"]
    overrides += ["model._target_=tests.helpers.DivergingJoint", "+model.diverge_at_step=4"]
    cfg = compose_experiment("joint", overrides)
    with pytest.raises(TrainingDiverged, match=r"non-finite at epoch 1, step 4 \(loss=nan") as raised:
        train(cfg, tmp_path)
    assert ("skipped on the device" in str(raised.value)) == fused
    assert not (tmp_path / "metrics.json").exists()
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["epoch"] == 0 and checkpoint["global_step"] == 3
    assert all(torch.isfinite(t).all() for t in checkpoint["state_dict"].values() if t.is_floating_point())


def test_a_checkpoint_of_another_method_or_backbone_is_refused(phantom_root: Path, tmp_path: Path):
    train(compose_experiment("joint", [f"data.root={phantom_root}", *FAST]), tmp_path / "joint")
    joint_ckpt = tmp_path / "joint" / "checkpoints" / "last.ckpt"
    saved_by_joint = r"saved by \{'method': 'covidct.methods.joint.Joint'.*same method and backbone"
    with pytest.raises(ConfigError, match=saved_by_joint):
        train(
            compose_experiment("sepnorm", [f"data.root={phantom_root}", *FAST, f"resume_from={joint_ckpt}"]),
            tmp_path / "s",
        )
    with pytest.raises(ConfigError, match=r"'redesign': True.*'redesign': False"):
        train(
            compose_experiment("joint_covidnet", [f"data.root={phantom_root}", *FAST, f"resume_from={joint_ckpt}"]),
            tmp_path / "c",
        )
    with pytest.raises(ConfigError, match="does not exist"):
        train(
            compose_experiment("joint", [f"data.root={phantom_root}", *FAST, f"resume_from={tmp_path}/no.ckpt"]),
            tmp_path / "n",
        )
    assert not list(tmp_path.glob("[scn]/metrics.json"))


@pytest.mark.slow
def test_resume_from_a_checkpoint_of_other_settings_is_refused_naming_them(phantom_root: Path, tmp_path: Path):
    """A checkpoint of another seed, learning rate and schedule length would resume at learning rate 0 (the cosine
    of its shorter schedule) under a record stating the new settings: refused in one line; its own settings
    resume (here, at the end of its training: testing only) and give its record."""
    base = ["experiment=joint", f"data.root={phantom_root}", *FAST, "keep_optimizer_state=true"]
    first = run_cli([*base, f"hydra.run.dir={tmp_path / 'first'}"], tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    ckpt = tmp_path / "first" / "checkpoints" / "last.ckpt"

    other = ["seed=5", "model.optimizer.lr=1e-3", "trainer.max_epochs=2", f"resume_from={ckpt}"]
    refused = run_cli([*base, *other, f"hydra.run.dir={tmp_path / 'other'}"], tmp_path)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-2000:]
    (line,) = [text for text in refused.stderr.splitlines() if text.startswith("error: ")]
    assert line == (
        f"error: checkpoint {ckpt} was trained with other settings (data.seed 643 (this run: 5), "
        "model.optimizer.lr 0.0001 (this run: 0.001), model.scheduler.T_max 1 (this run: 2), seed 643 (this run: 5), "
        "trainer.max_epochs 1 (this run: 2)): resume_from continues its run, so they must be this run's. Rerun with "
        "its values, or add warm_start=true to train from its weights with these settings."
    )
    assert not (tmp_path / "other" / "metrics.json").exists()

    same = run_cli([*base, f"resume_from={ckpt}", f"hydra.run.dir={tmp_path / 'same'}"], tmp_path)
    assert same.returncode == 0, same.stderr[-2000:]
    assert "resuming from" in same.stdout + same.stderr
    resumed, original = _record(tmp_path / "same"), _record(tmp_path / "first")
    assert resumed["config"]["resume_from"] == str(ckpt) and resumed["run"]["global_steps"] == 2
    assert resumed["test"]["last"]["images"] == original["test"]["last"]["images"]


def _broken_copy(phantom_root: Path, tmp_path: Path, how: str) -> Path:
    root = tmp_path / "data"
    shutil.copytree(phantom_root, root)
    if how == "missing site":
        shutil.rmtree(root / "covid-ct")
    elif how == "missing class":
        shutil.rmtree(root / "covid-ct" / "CT_COVID")
    elif how == "empty class":
        for p in (root / "sars-cov-2" / "non-COVID").iterdir():
            p.unlink()
    elif how == "non-image":
        (root / "sars-cov-2" / "COVID" / "Thumbs.db").write_bytes(b"\0" * 10)
    elif how == "patients csv":
        (root / "covid-ct" / "Meta" / "patients.csv").write_text("folder;file;patient\n")
    elif how == "corrupt image":
        bad = root / "covid-ct" / "CT_COVID" / "img002.png"
        bad.write_bytes(bad.read_bytes()[:60])
    return root


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("missing site", r"site B folder .*covid-ct is missing; get it from GitHub UCSD-AI4H/COVID-CT"),
        ("missing class", r"class folder .*CT_COVID is missing"),
        ("empty class", r"non-COVID holds no images"),
        ("non-image", r"Thumbs.db is not an image"),
        ("patients csv", r"patients.csv must have the columns"),
        ("corrupt image", r"cannot read image .*img002.png"),
    ],
)
def test_bad_data_gets_a_clear_error_and_writes_no_record(phantom_root: Path, tmp_path: Path, how: str, message: str):

    root = _broken_copy(phantom_root, tmp_path, how)
    with pytest.raises(DataError, match=message):
        train(compose_experiment("ours", [f"data.root={root}", *FAST]), tmp_path / "run")
    assert not (tmp_path / "run" / "metrics.json").exists()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("fold=4", "fold must be an integer in 0..3, got 4"),
        ("fold=1.5", "fold must be an integer in 0..3, got 1.5"),
        ("fold='3'", r"fold must be an integer in 0..3, got '3' \(OmegaConf reads it as 3\)"),
        ("fold=abc", "fold must be an integer in 0..3, got 'abc'"),
        ("seed=-1", "seed must be an integer in 0..4294967295, got -1"),
        ("seed=4294967296", "seed must be an integer in 0..4294967295, got 4294967296"),
        ("model.backbone.width=0", "model.backbone.width must be a finite number > 0, got 0"),
        ("model.backbone.width=-3", "model.backbone.width must be a finite number > 0, got -3"),
        ("split_seed=0.5", "split_seed must be an integer in 0..4294967295, got 0.5"),
        ("trainer.max_epochs=0", "trainer.max_epochs must be an integer >= 1, got 0"),
        ("data.batch_per_site=2.5", "data.batch_per_site must be an integer >= 2, got 2.5"),
        ("data.eval_batch_size=0", "data.eval_batch_size must be an integer >= 1, got 0"),
        ("data.num_workers=-1", r"data.num_workers must be an integer >= 0 \(or null for the default\), got -1"),
        ("data.repeat.B=0", "data.repeat: site B's factor must be an integer >= 1, got 0"),
        ("data.repeat=often", "data.repeat must be 'auto' or a mapping such as {B: 4}, got 'often'"),
        ("+data.repeat.C=2", "data.repeat names site 'C'; the sites are A, B"),
        ("data.sites=[A,A]", r"data.sites must be a list of site names, each named once, .*got \['A', 'A'\]"),
        ("data.sites=[A,sars_cov_2]", r"data.sites names site A twice \('A' and 'sars_cov_2'\)"),
        ("data.sites=[]", r"data.sites must be a list of site names, each named once, .*got \[\]"),
        ("data.sites=A", r"data.sites must be a list of site names, .*got 'A' \(Invalid value assigned"),
        ("data.sites=[C]", r"unknown site 'C': no C.yaml in .*Known sites: A \(sars_cov_2\), B \(covid_ct\)"),
        ("data.test_sites=[A,B]", r"data.test_sites=\['A', 'B'\] leaves no site of data.sites=\['A', 'B'\] to"),
        ("model.tau=0", "model.tau must be a finite number > 0, got 0"),
        ("model.alpha=-1", "model.alpha must be a finite number >= 0, got -1"),
        ("model.optimizer.lr=nan", "model.optimizer.lr must be a finite number > 0, got nan"),
        ("model.optimizer.lr=0", "model.optimizer.lr must be a finite number > 0, got 0"),
        ("trainer.limit_train_batches=0", "trainer.limit_train_batches must be null .*trains nothing"),
        ("trainer.limit_train_batches=1.5", r"trainer.limit_train_batches must be null .*fraction in \(0, 1\]"),
        ("data.batch_per_site=40", "fewer than data.batch_per_site=40"),
    ],
)
def test_bad_settings_get_a_clear_error_before_any_work(
    phantom_root: Path, tmp_path: Path, override: str, message: str
):
    with pytest.raises(ConfigError, match=message) as err:
        train(compose_experiment("ours", [f"data.root={phantom_root}", *FAST, override]), tmp_path / "run")
    assert len(str(err.value).splitlines()) == 1
    assert not (tmp_path / "run" / "metrics.json").exists()
    if override != "data.batch_per_site=40":  # that one needs the data to be read
        assert not (tmp_path / "run").exists(), "the run folder was claimed before the check"


def test_an_msnet_transfer_weight_above_one_is_refused(phantom_root: Path, tmp_path: Path):
    """kt_weight=5 would weight MS-Net's label term 1 - 5 = -4: refused before any work."""
    with pytest.raises(ConfigError, match=r"model.kt_weight must be a finite number >= 0 and <= 1, got 5"):
        train(compose_experiment("msnet", [f"data.root={phantom_root}", *FAST, "model.kt_weight=5"]), tmp_path / "r")
    assert not (tmp_path / "r").exists()


def test_a_run_that_stops_training_early_writes_no_record(phantom_root: Path, tmp_path: Path):
    overrides = [
        f"data.root={phantom_root}",
        *FAST,
        "trainer.max_epochs=3",
        "model._target_=tests.helpers.StoppingJoint",
    ]
    with pytest.raises(TrainingIncomplete, match=r"training stopped after 1 of 3 epochs .*rerun the same command"):
        train(compose_experiment("joint", overrides), tmp_path)
    assert not (tmp_path / "metrics.json").exists() and (tmp_path / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("number", [signal.SIGTERM, signal.SIGHUP])  # SIGHUP: the terminal closed
def test_sigterm_or_sighup_exits_non_zero_and_the_rerun_resumes(phantom_root: Path, tmp_path: Path, number: int):
    args = ["experiment=joint", f"data.root={phantom_root}", *LONG]
    process, folder = _start_run(args, tmp_path)
    process.send_signal(number)
    process.wait(timeout=240)
    stderr = (tmp_path / "stderr.txt").read_text()
    name = signal.Signals(number).name
    assert process.returncode == 128 + number, stderr[-2000:]
    assert re.search(rf"error: stopped by {name} (after batch|at the start of epoch)", stderr), stderr[-2000:]
    assert "Traceback" not in stderr
    assert not (folder / "metrics.json").exists()
    resumed = run_cli(args, tmp_path)
    assert resumed.returncode == 0 and "resuming from" in resumed.stdout + resumed.stderr
    assert (folder / "metrics.json").is_file()


def _start_run(args: list[str], outputs: Path, timeout: float = 240) -> tuple[subprocess.Popen, Path]:
    """A CLI run in the background, once its (one) run folder holds its first checkpoint; its stderr goes to
    OUTPUTS/stderr.txt (a pipe nobody reads could fill and block it)."""
    outputs.mkdir(parents=True, exist_ok=True)
    with (outputs / "stderr.txt").open("w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "covidct.run", *args],
            cwd=REPO,
            env=cli_env(outputs),
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    deadline = time.time() + timeout
    parent = outputs / args[0].split("=", 1)[1]  # experiment=NAME: the run folders' parent
    while not (parent.is_dir() and any(parent.iterdir())):
        assert process.poll() is None and time.time() < deadline, "no run folder appeared"
        time.sleep(0.05)
    (folder,) = parent.iterdir()
    _wait_for(folder / "checkpoints" / "last.ckpt", process)
    return process, folder


@pytest.mark.slow
def test_cli_errors_are_one_clear_line(phantom_root: Path, tmp_path: Path):
    root = _broken_copy(phantom_root, tmp_path, "corrupt image")
    corrupt = run_cli(["experiment=ours", f"data.root={root}", *FAST, "data.num_workers=2"], tmp_path / "out")
    assert corrupt.returncode == 2 and "Traceback" not in corrupt.stderr
    assert "error: cannot read image" in corrupt.stderr and "img002.png" in corrupt.stderr
    not_integer = run_cli(["experiment=ours", f"data.root={root}", "fold=abc"], tmp_path / "out")
    assert not_integer.returncode == 2 and "Traceback" not in not_integer.stderr
    assert "error: fold must be an integer in 0..3, got 'abc'" in not_integer.stderr
    unknown = run_cli(["experiment=ourz", f"data.root={root}"], tmp_path / "out")
    assert unknown.returncode != 0 and "Traceback" not in unknown.stderr
    assert "Could not find 'experiment/ourz'" in unknown.stderr and "ours" in unknown.stderr
    assert not list((tmp_path / "out").rglob("metrics.json"))


@pytest.mark.slow
def test_submitit_preemption_requeues_and_resumes(phantom_root: Path, tmp_path: Path):
    submitit = pytest.importorskip("submitit")
    executor = submitit.LocalExecutor(folder=tmp_path / "submitit")
    executor.update_parameters(timeout_min=10)
    job = executor.submit(RequeueableRun("ours", [f"data.root={phantom_root}", *LONG], tmp_path / "run"))
    _wait_for(tmp_path / "run" / "checkpoints" / "last.ckpt")
    # SLURM signals the job's task before a time limit or preemption (USR2 with submitit's settings);
    # locally the task is the child of submitit's controller process.
    (task,) = _children(job._process.pid)
    os.kill(task, signal.SIGUSR2)
    results = job.result()
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert results == record["test"] and record["run"]["epochs_trained"] == 3
    log = "".join(p.read_text() for p in (tmp_path / "submitit").glob("*_log.*"))
    assert "Restored all states from the checkpoint" in log  # the requeued attempt resumed the fit


def test_slurm_launcher_config():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=ours", "hydra/launcher=slurm"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.max_num_timeout > 0 and launcher.signal_delay_s > 0 and launcher.gpus_per_node == 1


@pytest.mark.slow
def test_a_second_identical_run_is_refused_while_the_first_holds_the_folder(phantom_root: Path, tmp_path: Path):
    """The first run trains far longer than the second takes to start (3 epochs could end first on a fast machine),
    and is stopped once the second has been refused; the lock goes with its process."""
    from covidct.run_folder import run_dir_lock

    args = ["experiment=joint", f"data.root={phantom_root}", *LONG[:-1], "trainer.max_epochs=500"]
    first, folder = _start_run(args, tmp_path)
    try:
        second = run_cli(args, tmp_path)
        assert second.returncode == 2 and "Traceback" not in second.stderr
        assert f"is in use by another run (pid {first.pid} on" in second.stderr
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=300)
    assert first.returncode == 128 + signal.SIGTERM and not (folder / "metrics.json").exists()
    with run_dir_lock(folder):  # free again: taking it would refuse otherwise
        pass


@pytest.mark.slow
def test_a_second_run_asked_to_wait_waits_then_skips_the_finished_folder(phantom_root: Path, tmp_path: Path):
    """15 epochs: the first run must still hold the folder when the second reaches it (3 could end first)."""
    args = ["experiment=joint", f"data.root={phantom_root}", *LONG[:-1], "trainer.max_epochs=15"]
    first, folder = _start_run(args, tmp_path)
    second = run_cli([*args, "wait_for_run_folder=true"], tmp_path)
    first.wait(timeout=300)
    assert first.returncode == 0 and second.returncode == 0, second.stderr[-2000:]
    assert "waiting for it" in second.stdout + second.stderr and "skipping" in second.stdout + second.stderr


def test_a_full_disk_while_checkpointing_names_the_path_and_leaves_no_partial(
    phantom_root: Path, tmp_path: Path, monkeypatch
):
    import pytorch_lightning as pl

    def full_disk(self, filepath, weights_only=False, storage_options=None):
        Path(filepath).parent.mkdir(parents=True, exist_ok=True)
        Path(filepath).write_bytes(b"\0" * 1000)  # what a write gets to before the disk fills
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pl.Trainer, "save_checkpoint", full_disk)
    with pytest.raises(DataError, match=r"cannot write checkpoint .*last.ckpt \(No space left on device\).*free"):
        train(compose_experiment("joint", [f"data.root={phantom_root}", *FAST]), tmp_path)
    assert not list(tmp_path.rglob("*.tmp")) and not (tmp_path / "metrics.json").exists()


def test_a_full_disk_while_caching_names_the_cache_dir(phantom_root: Path, tmp_path: Path, monkeypatch):
    import numpy as np

    def full_disk(fh, array):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "save", full_disk)
    cache = tmp_path / "cache"
    overrides = [f"data.root={phantom_root}", *FAST, f"data.cache_dir={cache}"]
    with pytest.raises(
        DataError, match=r"cannot write the decode cache in .*cache \(No space left on device; an entry"
    ):
        train(compose_experiment("joint", overrides), tmp_path / "run")
    assert not list(cache.rglob("*.tmp"))


def test_a_full_disk_while_writing_the_record_names_the_file(phantom_root: Path, tmp_path: Path, monkeypatch):
    import os as os_module

    real_fdopen = os_module.fdopen

    class FullDisk:
        def __init__(self, fd, *args, **kwargs):
            self.fh = real_fdopen(fd, *args, **kwargs)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

        def write(self, text):
            raise OSError(28, "No space left on device")

    def fdopen(fd, mode="r", *args, **kwargs):
        return (
            FullDisk(fd, mode, *args, **kwargs)
            if "w" in mode and "b" not in mode
            else real_fdopen(fd, mode, *args, **kwargs)
        )

    cfg = compose_experiment("joint", [f"data.root={phantom_root}", *FAST])
    monkeypatch.setattr("covidct.records.os.fdopen", fdopen)
    with pytest.raises(DataError, match=r"cannot write .*run_config.json \(No space left on device\); free space"):
        train(cfg, tmp_path)
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_mid_epoch_checkpoint_of_an_earlier_covidct_is_refused_not_resumed_from_the_epoch_s_start(
    phantom_root: Path, tmp_path: Path
):
    """Earlier versions kept the loader's place in the DataModule's state, which Lightning no longer hands back:
    resuming such a checkpoint would silently redo its epoch from batch 0 (other batches than an uninterrupted run)."""
    overrides = [f"data.root={phantom_root}", *FAST, "keep_optimizer_state=true"]
    train(compose_experiment("joint", overrides), tmp_path / "first")
    checkpoint = torch.load(tmp_path / "first" / "checkpoints" / "last.ckpt", weights_only=True)
    checkpoint["loops"]["fit_loop"]["state_dict"] = {}
    checkpoint["loops"]["fit_loop"]["epoch_loop.batch_progress"]["is_last_batch"] = False
    checkpoint["SiteDataModule"] = {"next_batch": {"seed": 643, "epoch": 0, "batch": 1}}
    old = tmp_path / "old.ckpt"
    torch.save(checkpoint, old)
    with pytest.raises(ConfigError, match=r"stopped mid-epoch under an earlier covidct"):
        train(compose_experiment("joint", [*overrides, f"resume_from={old}"]), tmp_path / "second")
