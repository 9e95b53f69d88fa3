"""Every experiment of the registry composes, wires its overrides through, and fast-runs on phantom data; the
registry itself (Table I's rows from each experiment's `table1` block) and its errors."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from covidct.data.sites import PAPER_SITES as SITES
from covidct.errors import ConfigError
from covidct.experiments import Experiment, load_experiments, table1_experiments
from covidct.methods import Joint, MSNet, Ours, ParallelAdapter, SepNorm, SeriesAdapter, Single
from covidct.metrics import METRIC_NAMES, STATISTICS
from covidct.report.table1 import DEFAULT_REFERENCE
from covidct.training.fit import make_trainer, train
from tests.helpers import FAST, compose_experiment

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = [e.name for e in load_experiments()]  # the registry: Table I's by row, then the others
# federated experiments start Flower's Simulation Runtime (Ray, ~15 s): outside the fast loop; those that
# tests/test_federated.py and tests/test_federated_loso.py train through the CLI are not trained again here
FEDERATED = {p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml") if "/federated:" in p.read_text()}
TRAINED_ELSEWHERE = {"fedavg", "fedprox", "fedbn", "silobn", "local"}
# What some experiments must wire up (method class, redesigned backbone, norms per site, adapter, LR schedule);
# an experiment not named here is still composed and fast-run.
EXPECTED = {
    "single_covidnet": (Single, False, 1, "none", "StepLR"),
    "single": (Single, True, 1, "none", "CosineAnnealingLR"),
    "joint_covidnet": (Joint, False, 1, "none", "StepLR"),
    "joint": (Joint, True, 1, "none", "CosineAnnealingLR"),
    "series_adapter": (SeriesAdapter, True, 2, "series", "CosineAnnealingLR"),
    "parallel_adapter": (ParallelAdapter, True, 2, "parallel", "CosineAnnealingLR"),
    "msnet": (MSNet, True, 2, "none", "CosineAnnealingLR"),
    "sepnorm": (SepNorm, True, 2, "none", "CosineAnnealingLR"),
    "ours": (Ours, True, 2, "none", "CosineAnnealingLR"),
}


def test_the_registry_is_every_experiment_file_and_table1_its_rows_in_order():
    assert sorted(EXPERIMENTS) == sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml"))
    assert set(EXPECTED) <= set(EXPERIMENTS)
    rows = table1_experiments()
    assert [e.row for e in rows] == sorted(e.row for e in rows) and len({e.row for e in rows}) == len(rows)
    assert len({e.label for e in rows}) == len(rows) and DEFAULT_REFERENCE in {e.name for e in rows}
    assert EXPERIMENTS[: len(rows)] == [e.name for e in rows]  # those without a row come after
    paper = list(csv.DictReader((REPO / "experiments" / "paper_table1.csv").open()))
    for e in rows:  # the paper's values for every site and metric the paper reports
        have = {(p["site"], p["metric"]) for p in paper if p["experiment"] == e.paper}
        assert e.paper is None or have == {(s, m) for s in SITES for m in METRIC_NAMES}, e


def _write(folder: Path, name: str, text: str) -> Path:
    (folder / "experiment").mkdir(parents=True, exist_ok=True)
    path = folder / "experiment" / f"{name}.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("table1", "message"),
    [
        ("table1: [9, x]", "table1 must be a mapping with keys row, label, paper"),
        ("table1:\n  label: X", "table1.row is missing: it must be a positive integer"),
        ("table1:\n  row: nine\n  label: X", "table1.row must be a positive integer, got 'nine'"),
        ("table1:\n  row: 0\n  label: X", "table1.row must be a positive integer, got 0"),
        ("table1:\n  row: '5'\n  label: X", "table1.row must be a positive integer, got '5'"),
        ("table1:\n  row: true\n  label: X", "table1.row must be a positive integer, got True"),
        ("table1:\n  row: 11\n  label: ''", "table1.label must be a non-empty string"),
        ("table1:\n  row: 11\n  label: X\n  paper: 3", "table1.paper must be a key of"),
        (
            "table1:\n  row: 11\n  label: X\n  papers: x",
            "table1.papers is unknown; allowed keys: row, label, paper, block",
        ),
        ("table1:\n  row: 9\n  label: X", "table1.row 9 is also the row of " + str(REPO / "conf/experiment/ours.yaml")),
    ],
)
def test_a_malformed_table1_block_names_the_file_and_what_is_wrong(tmp_path: Path, table1: str, message: str):
    path = _write(tmp_path, "mine", f"# @package _global_\nname: mine\n{table1}\n")
    with pytest.raises(ConfigError) as err:
        load_experiments([tmp_path])
    assert str(err.value).startswith(f"{path}: ") and message in str(err.value)
    assert len(str(err.value).splitlines()) == 1


def test_an_experiment_whose_name_is_not_its_file_is_refused(tmp_path: Path):
    path = _write(tmp_path, "mine", "name: yours\n")
    with pytest.raises(ConfigError, match="name is 'yours' but the file is mine.yaml") as err:
        load_experiments([tmp_path])
    assert str(err.value).startswith(f"{path}: ")


def test_extra_config_dirs_add_experiments_and_the_cli_lists_them(tmp_path: Path):
    _write(tmp_path, "mine", "name: mine\ntable1:\n  row: 10\n  label: Mine\n  paper: null\n")
    _write(tmp_path, "sketch", "name: sketch\n")  # no table1 block: after Table I
    _write(tmp_path, "ours", "name: ours\ntable1:\n  row: 1\n  label: shadowed\n")  # the repo's comes first
    found = load_experiments([f"file://{tmp_path}"])
    assert Experiment("mine", 10, "Mine", None) in found and found[-1] == Experiment("sketch")
    centralised = [e.name for e in table1_experiments(block="centralised")]
    after = [name for name in EXPERIMENTS if name not in centralised]  # the federated block, then those without a row
    assert [e.name for e in found] == [*centralised, "mine", *after, "sketch"]
    assert next(e for e in found if e.name == "ours").row != 1

    def cli(*args: str) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "covidct.experiments", *args], cwd=REPO, capture_output=True, text=True, check=True
        )
        return result.stdout.strip()

    names = [e.name for e in table1_experiments(block="centralised")]
    assert cli() == ",".join(names)  # what `make table1` sweeps
    federated = [e.name for e in table1_experiments(block="federated")]
    assert cli("--block", "federated") == ",".join(federated) == "local,fedavg,fedprox,silobn,fedbn"
    assert cli("--config-dir", str(tmp_path)) == ",".join([*names, "mine"])
    assert cli("--all", "--config-dir", str(tmp_path)) == ",".join([*centralised, "mine", *after, "sketch"])
    bad = tmp_path / "bad"
    _write(bad, "broken", "table1: 3\n")
    result = subprocess.run(
        [sys.executable, "-m", "covidct.experiments", "--config-dir", str(bad)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "broken.yaml: table1 must be a mapping" in result.stderr


@pytest.mark.parametrize("name", sorted(TRAINED_ELSEWHERE))
def test_a_federated_experiment_composes_and_its_tests_train_it(name: str, phantom_root: Path):
    cfg = compose_experiment(name, [f"data.root={phantom_root}", *FAST])
    assert cfg.name == name and type(instantiate(cfg.model, _convert_="all")) is Joint  # the redesigned network
    assert cfg.federated.rounds == cfg.trainer.max_epochs and cfg.federated.strategy._target_.startswith(
        "covidct.federated.strategies."
    )
    tests = "".join((REPO / "tests" / f).read_text() for f in ("test_federated.py", "test_federated_loso.py"))
    assert f'"{name}"' in tests or f"experiment={name}" in tests


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(name, marks=pytest.mark.slow) if name in FEDERATED else name
        for name in EXPERIMENTS
        if name not in TRAINED_ELSEWHERE
    ],
)
def test_experiment_composes_and_fast_runs(name: str, phantom_root: Path, tmp_path: Path):
    cfg = compose_experiment(name, [f"data.root={phantom_root}", *FAST])
    assert cfg.name == name
    if name in EXPECTED:
        method, redesign, num_sites, adapter, schedule = EXPECTED[name]
        backbone = cfg.model.backbone
        assert (backbone.redesign, backbone.num_sites, backbone.adapter) == (redesign, num_sites, adapter)
        assert cfg.model.scheduler._target_.endswith(schedule)
        assert type(instantiate(cfg.model, _convert_="all")) is method
    results = train(cfg, tmp_path)
    record = json.loads((tmp_path / "metrics.json").read_text())
    assert record["test"] == results and list(results) == ["last"]  # no validation part: nothing else to select
    last = results["last"]
    for site in ("A", "B"):
        assert set(last["images"][site]) == set(STATISTICS)
        # a barely trained net may predict one class only: what that leaves undefined is null, and says why
        for metric, value in last["images"][site].items():
            assert (value is None) == (f"images/{site}/{metric}" in last.get("undefined", {}))
            assert value is None or 0.0 <= value <= 1.0
    assert set(last["patients"]) == {"B"} and set(last["patients"]["B"]) == set(STATISTICS)
    assert record["run"]["experiment"] == name
    lines = (tmp_path / "predictions.csv").read_text().splitlines()
    n_test = sum(record["run"]["splits"]["sites"][s]["test"]["images"] for s in ("A", "B"))
    assert lines[0] == "selection,site,file,patient,label,prob_covid" and len(lines) == 1 + n_test
    if cfg.get("federated") is None:
        assert record["run"]["global_steps"] == 2
        checkpoints = [tmp_path / "checkpoints" / "last.ckpt"]
    else:  # one round of 2 steps at each site, each site's final state in its own folder
        (round_,) = record["run"]["federated"]["per_round"]
        assert {site: metrics["images_trained"] for site, metrics in round_.items()} == {"A": 8, "B": 8}
        sizes = {site: record["run"]["splits"]["sites"][site]["train"]["images"] for site in ("A", "B")}
        assert {site: metrics["num-examples"] for site, metrics in round_.items()} == sizes  # FedAvg's weights
        checkpoints = sorted((tmp_path / "federated" / "clients").glob("*/*.ckpt"))
        assert [p.relative_to(tmp_path / "federated" / "clients").as_posix() for p in checkpoints] == [
            "A/round-0001.ckpt",
            "B/round-0001.ckpt",
        ]
    for path in checkpoints:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
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


def test_wandb_logger_is_offline_unless_asked(phantom_root: Path, tmp_path: Path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "unset")  # recorded, so the logger's own setting is undone after
    monkeypatch.delenv("WANDB_MODE", raising=False)  # offline by default: no mode, no key, no network
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = compose_experiment("joint", [f"data.root={phantom_root}", *FAST, "logger=wandb", "fold=1"])
    assert (cfg.logger.group, cfg.logger.job_type) == ("joint", "fold1")
    train(cfg, tmp_path)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and (tmp_path / "metrics.json").is_file()


@pytest.mark.slow
def test_ours_learns_the_phantom_signal(phantom_root: Path, tmp_path: Path):
    """Labels, sites and the eval path are wired right: a clear signal is learned on both sites."""
    overrides = [
        f"data.root={phantom_root}",
        *FAST,
        "data.batch_per_site=8",
        "trainer.max_epochs=4",
        "model.optimizer.lr=1e-3",
    ]
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
