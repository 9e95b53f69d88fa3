"""Sites never trained on: leave-one-site-out runs (data.test_sites) and `covidct.evaluate`, through the CLI, on
phantoms, DICOM series and the real PNG sites."""

import csv
import json
from pathlib import Path

import pytest

from covidct import evaluate as evaluate_module
from covidct.data.folds import split_fold
from covidct.data.sources import scan_site
from covidct.pseudonyms import Pseudonyms
from covidct.records import read_predictions
from tests.helpers import FAST, run_cli
from tests.phantoms import hospital_site_config, make_hospital_site, make_phantom_root
from tests.test_dicom import write_series

CHOICES = {
    "ours": ["adabn", "mean", "site:A", "site:B"],  # per-site norms
    "single": ["site:A", "site:B"],  # a network per site: borrow one
    "joint": ["shared"],  # norms shared by A and B serve any site
}
HOSPITAL_IMAGES = 2 * 4 * 5


@pytest.fixture(scope="module")
def loso_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """ours, single and joint trained on A and B with the hospital held out, in one multirun."""
    base = tmp_path_factory.mktemp("loso")
    root = make_phantom_root(base / "data", per_class=16)
    make_hospital_site(root)
    hospital_site_config(base / "conf")
    sweep = base / "sweep"
    result = run_cli(
        [
            "-m",
            f"experiment={','.join(CHOICES)}",
            f"data.root={root}",
            "data.sites=[A,B,hospital]",
            "data.test_sites=[hospital]",
            f"hydra.searchpath=[file://{base / 'conf'}]",
            f"hydra.sweep.dir={sweep}",
            *FAST,
        ],
        base,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = {json.loads(p.read_text())["run"]["experiment"]: p.parent for p in sweep.rglob("metrics.json")}
    assert set(runs) == set(CHOICES)
    return runs


@pytest.mark.parametrize("experiment", list(CHOICES))
def test_a_held_out_site_is_tested_with_every_norm_choice_its_method_allows(loso_runs, experiment: str):
    run = loso_runs[experiment]
    record = json.loads((run / "metrics.json").read_text())
    last = record["test"]["last"]
    assert set(last["images"]) == {"A", "B"}  # the training sites' own test folds
    assert list(last["unseen"]) == CHOICES[experiment]
    for results in last["unseen"].values():
        assert set(results["images"]) == {"hospital"} and set(results["patients"]) == {"hospital"}
        assert results["images"]["hospital"]["auc"] is not None
    splits = record["run"]["splits"]
    assert splits["test_sites"] == ["hospital"]
    assert splits["sites"]["hospital"]["train"]["images"] == 0 and splits["sites"]["hospital"]["test"]["images"] == 40
    assert any("leave-one-site-out" in note for note in splits["notes"])
    rows = [r for r in read_predictions(run) if r["site"] == "hospital"]
    assert len(rows) == HOSPITAL_IMAGES * len(CHOICES[experiment])
    assert {r["unseen_norm"] for r in rows} == set(CHOICES[experiment])
    assert all(r["unseen_norm"] == "" for r in read_predictions(run) if r["site"] != "hospital")


def _probs(rows: list[dict], choice: str) -> dict[str, float]:
    return {r["file"]: r["prob_covid"] for r in rows if r["unseen_norm"] == choice}


def test_the_norm_choices_differ_as_defined(loso_runs):
    rows = read_predictions(loso_runs["ours"])
    adabn, mean, a, b = (_probs(rows, how) for how in CHOICES["ours"])
    assert adabn != mean and a != b  # its own statistics, and each site's copies, classify differently
    assert mean != a and mean != b


@pytest.mark.slow
def test_evaluate_reproduces_the_runs_held_out_predictions(loso_runs, tmp_path: Path, capsys):
    """The evaluate CLI on the run's checkpoint gives the run's own unseen-site predictions, every choice."""
    for experiment in ("ours", "single"):
        run = loso_runs[experiment]
        out = tmp_path / experiment
        # another batch size than the run's (data.eval_batch_size=16): AdaBN's statistics do not depend on it
        args = [f"ckpt={run / 'checkpoints' / 'last.ckpt'}", "site=hospital", f"out={out}", "batch_size=7"]
        assert evaluate_module.main([*args, "device=cpu"]) == 0, capsys.readouterr().err
        mine, theirs = read_predictions(out), read_predictions(run)
        for how in CHOICES[experiment]:
            ours, expected = _probs(mine, how), _probs(theirs, how)
            assert ours.keys() == expected.keys() and len(ours) == HOSPITAL_IMAGES
            assert all(abs(ours[f] - expected[f]) < 1e-5 for f in ours), how
        record = json.loads((out / "metrics.json").read_text())
        assert list(record["test"]["last"]["unseen"]) == CHOICES[experiment]
        assert record["run"]["splits"]["test_sites"] == ["hospital"] and (out / "roc_hospital.png").is_file()
    # by default into the run's folder, which the report then reads past: an evaluation is not a sweep's run
    assert evaluate_module.main([f"ckpt={loso_runs['ours'] / 'checkpoints' / 'last.ckpt'}", "site=hospital"]) == 0
    assert (loso_runs["ours"] / "evaluate" / "hospital" / "metrics.json").is_file()
    sweep = loso_runs["ours"].parent.parent
    report = run_cli(
        ["--runs", str(sweep), "--out", str(tmp_path / "report"), "--folds", "0", "--seeds", "643"],
        tmp_path,
        module="covidct.report",
    )
    assert report.returncode == 0, report.stderr[-2000:]
    assert (
        "## Site hospital held out (trained on A,B): AUC, image level" in (tmp_path / "report" / "loso.md").read_text()
    )
    # leave-one-site-out runs alone: their table alone, no Table I of empty cells, the provenance counting them
    assert not (tmp_path / "report" / "table1.md").exists()
    provenance = json.loads((tmp_path / "report" / "provenance.json").read_text())
    assert provenance["runs"] == "3 leave-one-site-out runs (folds [0] x seeds [643])"


@pytest.mark.slow
def test_a_loso_run_s_predictions_do_not_depend_on_its_eval_batch_size(loso_runs, tmp_path: Path):
    """data.eval_batch_size is left out of the run id, so it must change nothing: AdaBN's statistics are the held-out
    site's own over all its images, however they are batched."""
    run = loso_runs["ours"]
    record = json.loads((run / "metrics.json").read_text())
    base = run.parents[2]  # <base>/sweep/ours/<run id>
    args = ["experiment=ours", f"data.root={record['run']['data_root']}", "data.sites=[A,B,hospital]"]
    args += ["data.test_sites=[hospital]", f"hydra.searchpath=[file://{base / 'conf'}]"]
    result = run_cli([*args, f"hydra.run.dir={tmp_path / 'run'}", *FAST, "data.eval_batch_size=7"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]

    def probabilities(folder: Path) -> dict[tuple[str, ...], float]:
        rows = read_predictions(folder)
        return {(r["selection"], r["site"], r["file"], r["unseen_norm"]): r["prob_covid"] for r in rows}

    mine, theirs = probabilities(tmp_path / "run"), probabilities(run)
    assert mine.keys() == theirs.keys() and sum(key[3] == "adabn" for key in mine) == HOSPITAL_IMAGES
    assert max(abs(mine[key] - theirs[key]) for key in mine) < 1e-5


def test_predict_s_adabn_does_not_depend_on_its_batch_size(loso_runs, tmp_path: Path, capsys):
    """20 images in batches of 3 or of 19 (a last batch of one image, which counts too): the same probabilities."""
    from covidct import predict as predict_module

    ckpt = loso_runs["ours"] / "checkpoints" / "last.ckpt"
    images = Path(json.loads((loso_runs["ours"] / "metrics.json").read_text())["run"]["data_root"]) / "hospital/covid"
    probabilities = []
    for batch_size in (3, 19):
        out = tmp_path / f"{batch_size}.csv"
        argv = [f"ckpt={ckpt}", f"images={images}", "recursive=true", "site=hospital", "unseen_norm=adabn"]
        assert predict_module.main([*argv, f"batch_size={batch_size}", f"out={out}", "device=cpu"]) == 0
        assert "estimated on 20 image(s) here" in capsys.readouterr().err
        with out.open() as rows:
            probabilities.append({row["file"]: float(row["prob_covid"]) for row in csv.DictReader(rows)})
    assert probabilities[0].keys() == probabilities[1].keys() and len(probabilities[0]) == 20
    assert max(abs(probabilities[0][f] - probabilities[1][f]) for f in probabilities[0]) < 1e-5


def test_evaluate_reads_a_folder_of_dicom_series_per_patient(loso_runs, tmp_path: Path, capsys):
    site = tmp_path / "dicom_hospital"
    for class_folder in ("covid", "normal"):
        for patient in ("p1", "p2"):
            write_series(site / class_folder / patient, [0.0, 2.5, 5.0], patient=patient)
    out = tmp_path / "out"
    ckpt = loso_runs["ours"] / "checkpoints" / "last.ckpt"
    argv = [f"ckpt={ckpt}", f"site={site}", "classes={covid: 1, normal: 0}", f"out={out}", "device=cpu"]
    assert evaluate_module.main([*argv, "unseen_norm=adabn"]) == 0, capsys.readouterr().err
    record = json.loads((out / "metrics.json").read_text())
    results = record["test"]["last"]["unseen"]["adabn"]
    assert set(results["patients"]) == {"dicom_hospital"}
    rows = read_predictions(out)
    shown = Pseudonyms()  # patients, and the folders named by them, as keyed pseudonyms (the session's key)
    assert len(rows) == 12 and {r["patient"] for r in rows} == {
        shown.patient(f"{c}:{p}") for c in ("covid", "normal") for p in ("p1", "p2")
    }
    assert rows[0]["file"] == f"covid/{shown.patient('covid:p1')}/slice001.dcm"


def test_evaluate_on_a_real_png_site_it_was_trained_on(loso_runs, real_data: Path, tmp_path: Path, capsys):
    ckpt = loso_runs["joint"] / "checkpoints" / "last.ckpt"
    out = tmp_path / "real_b"
    argv = [f"ckpt={ckpt}", "site=covid_ct", f"data_root={real_data}", f"out={out}", "device=cpu", "batch_size=64"]
    assert evaluate_module.main(argv) == 0, capsys.readouterr().err
    record = json.loads((out / "metrics.json").read_text())
    last = record["test"]["last"]
    assert set(last["images"]) == {"B"} and set(last["patients"]) == {"B"} and "unseen" not in last
    test_part = split_fold(scan_site(real_data, "B"), fold=0, split_seed=0, val_fraction=0.0)["test"]
    assert sorted(r["file"] for r in read_predictions(out)) == sorted(s.name for s in test_part)  # not its training
    assert record["run"]["tested"] == "fold 0's test part of site B"


@pytest.mark.parametrize(
    "extra, message",
    [
        (["site=nowhere_hospital"], "unknown site 'nowhere_hospital'"),
        (["site=A", "unseen_norm=adabn"], "site A is one the model was trained on: it needs no unseen_norm"),
        (["site=hospital", "unseen_norm=median"], "unseen_norm=median does not apply to Ours"),
        (["site=hospital", "unseen_norm=site:C"], "choose one of adabn, mean, site:A, site:B"),
        (["site=hospital", "batch_size=0"], "batch_size must be at least 1"),
    ],
)
def test_evaluate_bad_input_is_one_line(loso_runs, capsys, extra: list[str], message: str):
    ckpt = loso_runs["ours"] / "checkpoints" / "last.ckpt"
    assert evaluate_module.main([f"ckpt={ckpt}", "device=cpu", *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err, err


def test_evaluate_asks_which_folder_is_covid(loso_runs, tmp_path: Path, capsys):
    site = tmp_path / "ward"
    for name in ("x", "y"):
        (site / name).mkdir(parents=True)
    ckpt = loso_runs["ours"] / "checkpoints" / "last.ckpt"
    assert evaluate_module.main([f"ckpt={ckpt}", f"site={site}", "device=cpu"]) == 2
    assert "say which is which with classes={<covid folder>: 1, <other folder>: 0}" in capsys.readouterr().err


def test_leave_one_site_out_on_the_real_data(real_data: Path, tmp_path: Path):
    """B held out: trained on the real site A alone, the real site B tested whole with every choice."""
    result = run_cli(
        [
            "experiment=ours",
            f"data.root={real_data}",
            "data.test_sites=[B]",
            f"hydra.run.dir={tmp_path / 'run'}",
            *FAST,
            "data.batch_per_site=8",
        ],
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())
    unseen = record["test"]["last"]["unseen"]
    assert list(unseen) == ["adabn", "mean", "site:A"]  # one training site: mean and site:A are its norms
    assert all(results["images"]["B"]["auc"] is not None for results in unseen.values())
    assert record["run"]["splits"]["sites"]["B"]["test"]["images"] == 746


def _loso_record(experiment: str, fold: int, unseen: dict[str, float], held: str = "B") -> dict:
    def metrics(auc: float) -> dict:
        return {"acc": auc - 0.1, "f1": None, "recall": None, "precision": None, "auc": auc, "ece": 0.1}

    trained = "A" if held == "B" else "B"
    return {
        "run": {
            "experiment": experiment,
            "fold": fold,
            "seed": 643,
            "splits": {"sites": {trained: {}, held: {}}, "test_sites": [held]},
        },
        "test": {
            "last": {
                "images": {trained: metrics(0.9)},
                "patients": {},
                "unseen": {how: {"images": {held: metrics(auc)}, "patients": {}} for how, auc in unseen.items()},
            }
        },
        "config": {},
    }


LOSO_RECORDS = [
    _loso_record("ours", 0, {"adabn": 0.80, "mean": 0.60, "site:A": 0.60}),
    _loso_record("ours", 1, {"adabn": 0.70, "mean": 0.65, "site:A": 0.65}),
    _loso_record("joint", 0, {"adabn": 0.75, "mean": 0.70, "site:A": 0.70}),
    _loso_record("ours", 0, {"adabn": 0.55, "mean": 0.50, "site:B": 0.50}, held="A"),
]


def test_the_loso_table_matches_its_golden_files():
    from covidct.report.loso import LOSO_COLUMNS, loso_markdown, loso_rows
    from covidct.report.table1 import to_csv

    golden = Path(__file__).parent / "golden"
    rows = loso_rows(LOSO_RECORDS, folds=[0, 1], seeds=[643])
    ours_adabn = next(
        r
        for r in rows
        if r["experiment"] == "ours" and r["unseen_norm"] == "adabn" and r["metric"] == "auc" and r["held_out"] == "B"
    )
    assert (ours_adabn["n"], ours_adabn["mean"], round(ours_adabn["std"], 6)) == (2, 75.0, round(7.0710678, 6))
    assert loso_markdown(rows) == (golden / "loso.md").read_text()
    assert to_csv(rows, LOSO_COLUMNS) == (golden / "loso.csv").read_text()


def test_loso_records_stay_out_of_table1_and_duplicates_are_refused():
    from covidct.report.loso import loso_rows
    from covidct.report.table1 import DuplicateRunError, select_records

    assert select_records(LOSO_RECORDS, [0, 1], [643]) == {}
    with pytest.raises(DuplicateRunError, match="two leave-one-site-out records for experiment=ours fold=0"):
        loso_rows([*LOSO_RECORDS, LOSO_RECORDS[0]], [0, 1], [643])


def test_predict_on_a_real_png_site_and_a_site_it_never_saw(loso_runs, real_data: Path, tmp_path: Path, capsys):
    from covidct import predict as predict_module

    ckpt = loso_runs["ours"] / "checkpoints" / "last.ckpt"
    images = real_data / "covid-ct" / "CT_COVID"
    out = tmp_path / "b.csv"
    assert predict_module.main([f"ckpt={ckpt}", f"images={images}", "site=B", f"out={out}", "device=cpu"]) == 0
    rows = out.read_text().splitlines()
    assert len(rows) == 1 + len([p for p in images.iterdir() if p.is_file()])  # 349 COVID images of site B
    unseen = tmp_path / "hospital.csv"
    argv = [f"ckpt={ckpt}", f"images={images}", "site=hospital", "unseen_norm=adabn", f"out={unseen}", "device=cpu"]
    assert predict_module.main(argv) == 0
    assert "unseen_norm=adabn" in capsys.readouterr().err


def test_data_check_reads_a_hospital_site_file(three_sites_root: tuple[Path, Path]):
    from covidct.data.check import check_data, format_report

    root, site_file = three_sites_root
    report = check_data(root, batch_per_site=4, workers=1, sites=["A", "B", str(site_file)])
    assert report.ok, format_report(report)
    counts = {(c.site, c.folder): c.images for c in report.classes if c.site == "hospital"}
    assert counts == {("hospital", "covid"): 20, ("hospital", "normal"): 20}


@pytest.fixture
def three_sites_root(tmp_path: Path) -> tuple[Path, Path]:
    root = make_phantom_root(tmp_path / "data", per_class=8)
    make_hospital_site(root)
    return root, hospital_site_config(tmp_path / "conf")
