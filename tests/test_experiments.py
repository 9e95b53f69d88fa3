"""Every experiment composes, wires its overrides through, and fast-runs on phantom data."""

import json
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from covidct.methods import Joint, MSNet, Ours, ParallelAdapter, SepNorm, SeriesAdapter, Single
from covidct.metrics import RECORD_METRICS
from covidct.run import make_trainer, train
from tests.helpers import FAST, compose_experiment

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml"))
EXPECTED = {
    "single_covidnet": (Single, False, "step"),
    "single": (Single, True, "cosine"),
    "joint_covidnet": (Joint, False, "step"),
    "joint": (Joint, True, "cosine"),
    "series_adapter": (SeriesAdapter, True, "cosine"),
    "parallel_adapter": (ParallelAdapter, True, "cosine"),
    "msnet": (MSNet, True, "cosine"),
    "sepnorm": (SepNorm, True, "cosine"),
    "ours": (Ours, True, "cosine"),
}


def test_all_table_rows_have_an_experiment():
    assert set(EXPECTED) <= set(EXPERIMENTS) and len(EXPECTED) == 9


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_and_fast_runs(name: str, phantom_root: Path, tmp_path: Path):
    cfg = compose_experiment(name, [f"data.root={phantom_root}", *FAST])
    assert cfg.name == name
    if name in EXPECTED:
        method, redesign, schedule = EXPECTED[name]
        assert cfg.model.backbone.redesign is redesign and cfg.model.lr_schedule == schedule
        assert type(instantiate(cfg.model, _convert_="all")) is method
    results = train(cfg, tmp_path)
    record = json.loads((tmp_path / "metrics.json").read_text())
    assert record["test"] == results and list(results) == ["last"]  # no validation part: nothing else to select
    last = results["last"]
    for site in ("A", "B"):
        assert set(last["images"][site]) == set(RECORD_METRICS)
        # a barely trained net may predict one class only: what that leaves undefined is null, and says why
        for metric, value in last["images"][site].items():
            assert (value is None) == (f"images/{site}/{metric}" in last.get("undefined", {}))
            assert value is None or 0.0 <= value <= 1.0
    assert set(last["patients"]) == {"B"} and set(last["patients"]["B"]) == set(RECORD_METRICS)
    assert record["run"]["experiment"] == name and record["run"]["global_steps"] == 2
    lines = (tmp_path / "predictions.csv").read_text().splitlines()
    n_test = sum(record["run"]["splits"]["sites"][s]["test"]["images"] for s in ("A", "B"))
    assert lines[0] == "selection,site,file,patient,label,prob_covid" and len(lines) == 1 + n_test
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert "optimizer_states" not in checkpoint and checkpoint["state_dict"]  # finished: weights only


def test_overrides_reach_the_objects(phantom_root: Path):
    cfg = compose_experiment(
        "ours",
        [
            "fold=2",
            "seed=11",
            f"data.root={phantom_root}",
            "data.image_size=96",
            "trainer.max_epochs=7",
            "trainer.limit_train_batches=3",
            "trainer.accelerator=cpu",
            "model.tau=0.2",
            "model.alpha=0.5",
            "model.backbone.width=0.125",
        ],
    )
    dm = instantiate(cfg.data)
    assert (dm.fold, dm.seed, dm.image_size, str(dm.root)) == (2, 11, 96, str(phantom_root))
    model = instantiate(cfg.model, _convert_="all")
    assert (model.hparams.tau, model.hparams.alpha) == (0.2, 0.5)
    assert model.hparams.backbone["image_size"] == 96
    trainer = make_trainer(cfg, logger=False)
    assert trainer.max_epochs == 7 and trainer.limit_train_batches == 3
    assert trainer.gradient_clip_val == 2.0


def test_single_site_mode_records_one_site(phantom_root: Path, tmp_path: Path):
    cfg = compose_experiment("single", [f"data.root={phantom_root}", "data.sites=[B]", *FAST])
    train(cfg, tmp_path)
    record = json.loads((tmp_path / "metrics.json").read_text())
    assert set(record["test"]["last"]["images"]) == {"B"}


def test_the_paper_protocol_trains_on_every_non_test_image(phantom_root: Path, tmp_path: Path):
    cfg = compose_experiment("joint", [f"data.root={phantom_root}", *FAST])
    train(cfg, tmp_path)
    record = json.loads((tmp_path / "metrics.json").read_text())
    for site in ("A", "B"):
        parts = record["run"]["splits"]["sites"][site]
        assert parts["val"]["images"] == 0 and parts["train"]["images"] + parts["test"]["images"] == 48
    assert any("all non-test images" in note for note in record["run"]["splits"]["notes"])
    assert not (tmp_path / "csv").glob("*/metrics.csv").__next__().read_text().count("val/")


def test_a_validation_part_records_the_last_and_the_best_validation_checkpoint(phantom_root: Path, tmp_path: Path):
    cfg = compose_experiment(
        "sepnorm", [f"data.root={phantom_root}", "data.val_fraction=0.1", *FAST, "trainer.max_epochs=3"]
    )
    test = train(cfg, tmp_path)
    record = json.loads((tmp_path / "metrics.json").read_text())
    assert list(record["test"]) == ["last", "best_val_auc"] == record["run"]["selections"]
    best = record["test"]["best_val_auc"]
    assert best["checkpoint"] == f"checkpoints/best-epoch{best['epoch']:03d}.ckpt" and 0 <= best["epoch"] <= 2
    assert record["test"]["last"]["epoch"] == 2 and record["test"]["last"]["checkpoint"] == "checkpoints/last.ckpt"
    logged = (tmp_path / "csv").glob("*/metrics.csv").__next__().read_text().splitlines()
    header = logged[0].split(",")
    val_rows = [line for line in logged[1:] if line.split(",")[header.index("val/auc")]]
    assert len(val_rows) == 3  # validated every epoch
    assert max(float(r.split(",")[header.index("val/auc")]) for r in val_rows) == pytest.approx(best["val_auc"])
    predictions = (tmp_path / "predictions.csv").read_text().splitlines()[1:]
    assert {line.split(",")[0] for line in predictions} == {"last", "best_val_auc"}
    assert test == record["test"]
    notes = " ".join(record["run"]["splits"]["notes"])
    n_val = {site: record["run"]["splits"]["sites"][site]["val"]["images"] for site in ("A", "B")}
    assert f"site A {n_val['A']}, site B {n_val['B']} training images fewer" in notes and min(n_val.values()) > 0


def test_wandb_logger_offline(phantom_root: Path, tmp_path: Path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = compose_experiment("joint", [f"data.root={phantom_root}", *FAST, "logger=wandb", "fold=1"])
    assert (cfg.logger.group, cfg.logger.job_type) == ("joint", "fold1")
    train(cfg, tmp_path)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and (tmp_path / "metrics.json").is_file()


@pytest.mark.slow
def test_ours_learns_the_phantom_signal(phantom_root: Path, tmp_path: Path):
    """Labels, sites and the eval path are wired right: a clear signal is learned on both sites."""
    overrides = [f"data.root={phantom_root}", *FAST, "data.batch_per_site=8", "trainer.max_epochs=4", "model.lr=1e-3"]
    cfg = compose_experiment("ours", [o for o in overrides if not o.startswith("trainer.limit_train_batches")])
    results = train(cfg, tmp_path)["last"]["images"]
    assert results["A"]["auc"] >= 0.95 and results["B"]["auc"] >= 0.95, results


def test_split_seed_per_seed_redraws_the_folds_for_every_seed(phantom_root: Path):
    """`split_seed='${seed}'` (make table1 SPLIT_SEED=per-seed): repeated cross-validation."""
    folds = {}
    for seed in (643, 644):
        cfg = compose_experiment("joint", [f"data.root={phantom_root}", *FAST, f"seed={seed}", "split_seed=${seed}"])
        assert cfg.split_seed == seed
        dm = instantiate(cfg.data)
        dm.cache.warm = lambda items, workers=1: 0  # the folds are what is compared here, not the images
        dm.setup()
        folds[seed] = {s.name for s in dm.splits["A"]["test"]}
    assert folds[643] != folds[644]
