"""Sites declared in config: a hospital added with one YAML file, every method on three sites, and the site
files' errors, through the CLI and trainer.fit."""

import json
from collections import Counter
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf

from covidct.data.datamodule import SiteDataModule
from covidct.data.sites import find_site, paper_site, read_site_file, resolve_sites
from covidct.data.sources import scan_site
from covidct.errors import ConfigError, DataError
from covidct.experiments import registry
from covidct.models.norms import SiteBatchNorm
from covidct.records import read_predictions
from covidct.run_folder import semantic_config
from tests.helpers import FAST, compose_experiment, run_cli, tiny_method
from tests.phantoms import hospital_site_config, make_hospital_site, make_phantom_root

SITES3 = ["A", "B", "hospital"]
WARD = {"folder": "/nowhere/ward", "classes": {"covid": 1, "normal": 0}}


@pytest.fixture(scope="module")
def three_sites(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(data root with A, B and a hospital laid out as one folder per patient, config dir with its YAML)."""
    root = make_phantom_root(tmp_path_factory.mktemp("three") / "data", per_class=16)
    make_hospital_site(root)
    conf = tmp_path_factory.mktemp("own_conf")
    hospital_site_config(conf)
    return root, conf


def test_the_paper_sites_are_two_site_files_found_by_name_or_alias():
    a, b = paper_site("A"), paper_site("B")
    assert find_site("sars_cov_2") == a and find_site("covid_ct") == b
    assert (a.folder, a.classes, a.patients.kind, a.patients.duplicates) == (
        "sars-cov-2",
        {"COVID": 1, "non-COVID": 0},
        "none",
        "together",
    )
    assert (b.folder, b.patients.kind, b.patients.file, b.patients.unmapped["tag"]) == (
        "covid-ct",
        "csv",
        "Meta/patients.csv",
        "paper",
    )


@pytest.mark.slow
def test_every_experiment_runs_on_three_sites_added_by_one_yaml_file(three_sites, tmp_path: Path):
    root, conf = three_sites
    # every centralised experiment and one federated (the others: tests/test_federated*.py, Ray's start each)
    names = [e.name for e in registry() if e.block != "federated" or e.name == "fedbn"]
    result = run_cli(
        [
            "-m",
            f"experiment={','.join(names)}",
            f"data.root={root}",
            "data.sites=[A,B,hospital]",
            f"hydra.searchpath=[file://{conf}]",
            f"hydra.sweep.dir={tmp_path / 'sweep'}",
            *FAST,
        ],
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    records = sorted((tmp_path / "sweep").rglob("metrics.json"))
    assert len(records) == len(names)
    for path in records:
        record = json.loads(path.read_text())
        assert list(record["run"]["splits"]["sites"]) == SITES3, path
        assert set(record["test"]["last"]["images"]) == set(SITES3), path
        assert set(record["test"]["last"]["patients"]) == {"B", "hospital"}, path  # A has no patient ids
        assert record["run"]["sites"]["hospital"]["dataset"] == "phantom hospital hospital"
        assert {row["site"] for row in read_predictions(path.parent)} == set(SITES3)
        assert "site hospital folds are patient-disjoint (patients from folders)" in record["run"]["splits"]["notes"]
    report = run_cli(
        ["--runs", str(tmp_path / "sweep"), "--out", str(tmp_path / "report"), "--folds", "0", "--seeds", "643"],
        tmp_path,
        module="covidct.report",
    )
    assert report.returncode == 0, report.stderr[-3000:]
    table = (tmp_path / "report" / "table1.md").read_text()
    assert all(f"### Site {site}" in table for site in SITES3)  # one block per site
    assert (tmp_path / "report" / "roc_hospital.png").is_file()


def _three_site_datamodule(root: Path, tmp_path: Path, **kwargs) -> SiteDataModule:
    hospital = read_site_file(hospital_site_config(tmp_path / "conf")).as_dict()
    hospital["folder"] = str(root / "hospital")
    defaults = {"image_size": 64, "batch_per_site": 4, "num_workers": 0, "eval_batch_size": 16}
    return SiteDataModule(
        root, sites=SITES3, site_specs={"hospital": hospital}, cache_dir=tmp_path / "cache", **{**defaults, **kwargs}
    )


class RoutingProbe(pl.Callback):
    """Records, for every training step, the batch's sites and which rows each site's BatchNorm copy received
    (by the copies' forward hooks on the first SiteBatchNorm, compared with its whole input)."""

    def __init__(self):
        self.steps: list[dict] = []

    def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        norm = next(m for m in module.modules() if isinstance(m, SiteBatchNorm))
        self._whole: list[torch.Tensor] = []
        self._parts: dict[int, torch.Tensor] = {}
        norm.register_forward_pre_hook(lambda m, args: self._whole.append(args[0].detach()))
        for k, copy in enumerate(norm.norms):
            copy.register_forward_pre_hook(lambda m, args, k=k: self._parts.__setitem__(k, args[0].detach()))

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        whole = self._whole[0]
        site = batch["site"].cpu()
        own = {k: bool(torch.equal(part, whole[site == k])) for k, part in self._parts.items()}
        self.steps.append({"sites": site.tolist(), "files": list(batch["file"]), "own_rows": own})
        self._whole.clear()
        self._parts.clear()


def test_three_sites_each_bn_sees_only_its_own_samples_and_batches_hold_batch_per_site_of_each(
    three_sites, tmp_path: Path
):
    root, _ = three_sites
    datamodule = _three_site_datamodule(root, tmp_path, repeat={"covid_ct": 4, "hospital": 3})  # an alias too
    model = tiny_method("sepnorm", "data.sites=[A,B,hospital]", sites=SITES3)
    assert [m.num_sites for m in model.modules() if isinstance(m, SiteBatchNorm)][0] == 3
    probe = RoutingProbe()
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        limit_val_batches=0,
        callbacks=[probe],
    )
    trainer.fit(model, datamodule=datamodule)
    sizes = {site: len(datamodule.splits[site]["train"]) for site in SITES3}
    repeats = dict(zip(SITES3, datamodule.repeat_factors()))
    assert repeats == {"A": 1, "B": 4, "hospital": 3}
    steps = -(-max(repeats[s] * sizes[s] for s in SITES3) // 4)
    assert len(probe.steps) == steps  # a whole epoch, as the sampler defines it
    shown: dict[str, Counter] = {site: Counter() for site in SITES3}
    for step in probe.steps:
        assert step["sites"] == [0] * 4 + [1] * 4 + [2] * 4  # exactly batch_per_site of each, in site order
        assert step["own_rows"] == {0: True, 1: True, 2: True}  # each copy got its site's rows and no other
        for site, file in zip(step["sites"], step["files"]):
            shown[SITES3[site]][file] += 1
    for site in SITES3:
        assert len(shown[site]) == sizes[site]  # every training image of every site
        assert min(shown[site].values()) >= repeats[site]  # each at least its repeat factor
    assert min(shown["hospital"].values()) == 3 and max(shown["B"].values()) >= 4


def test_a_held_out_site_may_be_named_by_its_alias_and_is_stored_by_name(tmp_path: Path, phantom_root: Path):
    datamodule = SiteDataModule(phantom_root, sites=["sars_cov_2", "covid_ct"], test_sites=["B"], cache_dir=tmp_path)
    assert (datamodule.sites, datamodule.unseen_sites) == (["A"], ["B"])
    assert (datamodule.hparams["sites"], datamodule.hparams["test_sites"]) == (["A"], ["B"])
    cfg = OmegaConf.create(
        {
            "data": {"sites": ["A", "covid_ct", "ward"], "test_sites": ["ward"], "site_specs": {"ward": WARD}},
            "n": "${num_sites:${data.sites}}",
        }
    )
    assert cfg.n == 2  # the training sites': an inline site counts too


def test_options_at_their_inert_default_leave_the_run_id_unchanged():
    cfg = compose_experiment("ours", [])
    assert "test_sites" not in semantic_config(cfg)["data"] and "site_specs" not in semantic_config(cfg)["data"]
    held = compose_experiment("ours", ["data.test_sites=[B]"])
    assert semantic_config(held)["data"]["test_sites"] == ["B"]


def test_repeat_auto_evens_three_sites_passes(three_sites, tmp_path: Path):
    root, _ = three_sites
    datamodule = _three_site_datamodule(root, tmp_path, repeat="auto")
    datamodule.split_data()
    sizes = [len(datamodule.splits[site]["train"]) for site in SITES3]
    assert datamodule.repeat_factors() == [max(1, round(max(sizes) / n)) for n in sizes]


def test_a_folder_site_names_its_patients_by_their_folders(three_sites):
    root, conf = three_sites
    spec = find_site("hospital", [conf])
    samples = scan_site(root, spec)
    assert len(samples) == 2 * 4 * 5
    assert {s.patient for s in samples} == {
        f"{c}:P{y}{p:02d}" for c, y in (("covid", 1), ("normal", 0)) for p in range(4)
    }
    assert all(s.group == f"hospital:{s.patient}" for s in samples)
    assert samples[0].name == "covid/P100/slice00.png"


def test_regex_and_csv_patients(tmp_path: Path, three_sites):
    root, _ = three_sites
    flat = tmp_path / "flat"
    for class_folder in ("covid", "normal"):
        (flat / class_folder).mkdir(parents=True)
        for patient in ("P01", "P02"):
            for k in range(2):
                (flat / class_folder / f"{patient}_{k}.png").write_bytes(
                    (root / "sars-cov-2/COVID/img000.png").read_bytes()
                )
    by_name = resolve_sites(
        ["flat"],
        {
            "flat": {
                "folder": str(flat),
                "classes": {"covid": 1, "normal": 0},
                "patients": {"kind": "regex", "pattern": r"^(P\d+)_"},
            }
        },
    )[0]
    assert Counter(s.patient for s in scan_site(tmp_path, by_name)) == {"P01": 4, "P02": 4}
    (flat / "ids.csv").write_text("image,pid\ncovid/P01_0.png,x1\ncovid/P01_1.png,x1\n")
    table = {"folder": str(flat), "classes": {"covid": 1, "normal": 0}}
    table["patients"] = {"kind": "csv", "file": "ids.csv", "columns": {"file": "image", "patient": "pid"}}
    spec = resolve_sites(["flat"], {"flat": table})[0]
    with pytest.raises(DataError, match=r"6 image\(s\) of site flat are not in .*ids.csv \(first: covid/P02_0.png\)"):
        scan_site(tmp_path, spec)
    samples = scan_site(tmp_path, spec, group_by="image")  # image-level folds do without the gaps
    assert [s.patient for s in samples][:2] == ["x1", "x1"]


@pytest.mark.parametrize(
    "text, message",
    [
        ("folder: x\nclasses: {covid: 1, normal: 1}\n", r"classes must give label 1 \(COVID\) and 0"),
        ("classes: {covid: 1, normal: 0}\n", "folder is missing"),
        ("folder: x\n", r"classes is missing: it must give label 1 \(COVID\) and 0 .*\(Missing mandatory value"),
        ("folder: x\nclasses: {covid: one, normal: 0}\n", r"classes must give .*could not be converted to Integer"),
        ("folder: x\nclasses: {covid: 1, normal: 0}\ncolour: red\n", r"colour is unknown; allowed keys: name, folder"),
        ("folder: x\nclasses: {covid: 1, normal: 0}\npatients: {kind: csv, colour: 1}\n", "patients.colour is unknown"),
        ("folder: x\nclasses: {covid: 1, normal: 0}\npatients: {kind: ward}\n", "patients.kind must be one of none"),
        ("folder: x\nclasses: {covid: 1, normal: 0}\npatients: {kind: regex}\n", "needs patients.pattern"),
        ("folder: x\nclasses: {covid: 1, normal: 0}\npatients: {kind: regex, pattern: '(P'}\n", "not a regular"),
        ("folder: x\nclasses: {covid: 1, normal: 0}\nwindow: [-600, 0]\n", r"window must be \[centre, width\]"),
        ("folder: [x\n", "is not valid YAML"),
    ],
)
def test_a_bad_site_file_is_one_line_naming_the_file(tmp_path: Path, text: str, message: str):
    path = tmp_path / "data" / "site" / "bad.yaml"
    path.parent.mkdir(parents=True)
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as info:
        find_site("bad", [tmp_path])
    assert str(path) in str(info.value) and len(str(info.value).splitlines()) == 1


def test_a_missing_site_folder_or_patient_folder_layout_is_named(three_sites, tmp_path: Path):
    root, conf = three_sites
    spec = find_site("hospital", [conf])
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(DataError, match=r"site hospital folder .*elsewhere/hospital is missing; fix 'folder' in"):
        scan_site(tmp_path / "elsewhere", spec)
    flat = tmp_path / "loose" / "hospital" / "covid"
    flat.mkdir(parents=True)
    (flat / "a.png").write_bytes(b"")
    (tmp_path / "loose" / "hospital" / "normal").mkdir()
    with pytest.raises(DataError, match=r"a.png lies directly in .*patients are folders \(patients.kind: folder\)"):
        scan_site(tmp_path / "loose", spec)


def test_a_users_site_file_wins_over_the_templates_name_in_conf(tmp_path: Path):
    own = tmp_path / "data" / "site" / "my_hospital.yaml"
    own.parent.mkdir(parents=True)
    own.write_text("folder: /mine\nclasses: {covid: 1, normal: 0}\n")
    compose_experiment("ours", [f"hydra.searchpath=[file://{tmp_path}]"])  # Hydra's state, as in a run
    spec = find_site("my_hospital")
    assert (spec.name, spec.folder) == ("my_hospital", "/mine")  # the name defaults to the file's


def test_patients_are_the_first_folder_under_the_class_whatever_lies_below(tmp_path: Path, three_sites):
    root, _ = three_sites
    image = (root / "sars-cov-2" / "COVID" / "img000.png").read_bytes()
    for class_folder, patient in (("covid", "P1"), ("normal", "P2")):
        for series in ("series1", "series2"):
            folder = tmp_path / "nested" / class_folder / patient / "study1" / series
            folder.mkdir(parents=True)
            (folder / "x.png").write_bytes(image)
    spec = resolve_sites(
        ["nested"], {"nested": {"folder": "nested", "classes": {"covid": 1, "normal": 0}, "patients": "folder"}}
    )[0]
    samples = scan_site(tmp_path, spec)
    assert [(s.name, s.patient) for s in samples] == [
        ("covid/P1/study1/series1/x.png", "covid:P1"),
        ("covid/P1/study1/series2/x.png", "covid:P1"),
        ("normal/P2/study1/series1/x.png", "normal:P2"),
        ("normal/P2/study1/series2/x.png", "normal:P2"),
    ]
