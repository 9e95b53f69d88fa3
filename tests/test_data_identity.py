"""A run folder belongs to the images it trained and tested on: resume, skip and resume_from refuse other data,
other folds or another split, and a deliberate warm start is recorded."""

import json
import shutil
from pathlib import Path

import pytest

from covidct.errors import ConfigError, DataError
from covidct.training.fit import train
from tests.helpers import FAST, cli_env, compose_experiment, run_cli


def _copy(phantom_root: Path, where: Path) -> Path:
    shutil.copytree(phantom_root, where)
    return where


@pytest.mark.slow
def test_an_interrupted_run_refuses_to_resume_on_changed_data(phantom_root: Path, tmp_path: Path):
    root = _copy(phantom_root, tmp_path / "data")
    args = ["experiment=joint", f"data.root={root}", *FAST, "trainer.max_epochs=2"]
    args += ["model._target_=tests.helpers.RecordingJoint"]
    env = {**cli_env(tmp_path / "out"), "COVIDCT_TEST_DIE_AT": "1:0"}
    killed = run_cli(args, tmp_path / "out", env=env)
    assert killed.returncode == 137
    (folder,) = (tmp_path / "out" / "joint").iterdir()
    assert (folder / "checkpoints" / "last.ckpt").is_file() and (folder / "data_fingerprint.json").is_file()
    (root / "sars-cov-2" / "COVID" / "img003.png").unlink()
    refused = run_cli(args, tmp_path / "out")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "holds an interrupted run trained on other data (the images differ in site A" in refused.stderr
    assert not (folder / "metrics.json").exists()


@pytest.mark.slow
def test_a_finished_run_is_skipped_only_for_the_same_images(phantom_root: Path, tmp_path: Path):
    cfg = compose_experiment("joint", [f"data.root={phantom_root}", *FAST])
    first = train(cfg, tmp_path / "run")
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert set(record["run"]["data_fingerprint"]) == {"A", "B"}
    same = _copy(phantom_root, tmp_path / "same")  # the same images elsewhere: skipped
    assert train(compose_experiment("joint", [f"data.root={same}", *FAST]), tmp_path / "run") == first
    other = _copy(phantom_root, tmp_path / "other")
    shutil.copy(other / "covid-ct" / "CT_COVID" / "img001.png", other / "covid-ct" / "CT_COVID" / "img900.png")
    with pytest.raises(DataError, match=r"holds a finished run on other data \(the images differ in site B"):
        train(compose_experiment("joint", [f"data.root={other}", *FAST]), tmp_path / "run")


@pytest.mark.slow
def test_resume_from_refuses_another_fold_and_a_warm_start_is_recorded(phantom_root: Path, tmp_path: Path):
    base = [f"data.root={phantom_root}", *FAST]
    train(compose_experiment("joint", [*base, "keep_optimizer_state=true"]), tmp_path / "fold0")
    ckpt = tmp_path / "fold0" / "checkpoints" / "last.ckpt"
    with pytest.raises(
        ConfigError,
        match=r"trained on other folds or data \(fold 0 \(this run: 1\), the images differ.*warm_start=true",
    ):
        train(compose_experiment("joint", [*base, "fold=1", f"resume_from={ckpt}"]), tmp_path / "fold1")
    with pytest.raises(ConfigError, match=r"split_seed 0 \(this run: 5\)"):
        train(compose_experiment("joint", [*base, "split_seed=5", f"resume_from={ckpt}"]), tmp_path / "split5")
    train(compose_experiment("joint", [*base, "fold=1", f"resume_from={ckpt}", "warm_start=true"]), tmp_path / "warm")
    run = json.loads((tmp_path / "warm" / "metrics.json").read_text())["run"]
    assert run["warm_start"]["checkpoint"] == str(ckpt) and run["warm_start"]["trained_on"]["fold"] == 0
    assert run["global_steps"] == 2  # trained from epoch 0 of its own folds


@pytest.mark.slow
def test_resume_from_a_finished_weights_only_checkpoint_or_a_folder_is_one_clear_line(
    phantom_root: Path, tmp_path: Path
):
    base = [f"data.root={phantom_root}", *FAST]
    train(compose_experiment("joint", base), tmp_path / "done")
    ckpt = tmp_path / "done" / "checkpoints" / "last.ckpt"
    with pytest.raises(ConfigError, match=r"holds weights only .*warm_start=true"):
        train(compose_experiment("joint", [*base, f"resume_from={ckpt}"]), tmp_path / "again")
    with pytest.raises(ConfigError, match=r"is a folder; give the path of a .ckpt file"):
        train(compose_experiment("joint", [*base, f"resume_from={ckpt.parent}"]), tmp_path / "folder")


def test_a_corrupt_run_config_is_one_clear_line(phantom_root: Path, tmp_path: Path):
    cfg = compose_experiment("joint", [f"data.root={phantom_root}", *FAST])
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run_config.json").write_text('{"half": ')
    with pytest.raises(DataError, match=r"run_config.json cannot be read .*delete that run folder"):
        train(cfg, tmp_path / "run")


@pytest.mark.slow
def test_a_warm_started_run_keeps_its_provenance_across_a_kill(phantom_root: Path, tmp_path: Path):
    base = [f"data.root={phantom_root}", *FAST, "model._target_=tests.helpers.RecordingJoint"]
    train(compose_experiment("joint", [*base, "keep_optimizer_state=true"]), tmp_path / "fold0")
    ckpt = tmp_path / "fold0" / "checkpoints" / "last.ckpt"
    args = ["experiment=joint", *base, "fold=1", "trainer.max_epochs=2", f"resume_from={ckpt}", "warm_start=true"]
    killed = run_cli(args, tmp_path / "out", env={**cli_env(tmp_path / "out"), "COVIDCT_TEST_DIE_AT": "1:0"})
    assert killed.returncode == 137
    resumed = run_cli(args, tmp_path / "out")
    assert resumed.returncode == 0 and "resuming from" in resumed.stdout + resumed.stderr
    (record,) = (tmp_path / "out" / "joint").glob("*/metrics.json")
    warm = json.loads(record.read_text())["run"]["warm_start"]
    assert warm["checkpoint"] == str(ckpt) and warm["trained_on"]["fold"] == 0


def test_warm_start_false_leaves_the_run_folder_names_as_they_were():
    from covidct.run_folder import semantic_config

    assert "warm_start" not in semantic_config(compose_experiment("joint", []))
    assert semantic_config(compose_experiment("joint", ["warm_start=true"]))["warm_start"] is True
