"""`check_data` / `python -m covidct.data check`: the real data against its MANIFEST, broken phantom copies."""

from __future__ import annotations

import csv
import json
import shutil
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file

from covidct.data.__main__ import main
from covidct.data.check import DataReport, check_data, format_report
from covidct.data.sites import PAPER_SITES, paper_site
from tests.phantoms import hospital_site_config, make_hospital_site
from tests.test_dicom import write_series

SITE_OF_FOLDER = {layout.folder: site for site, layout in ((site, paper_site(site)) for site in PAPER_SITES)}
FORMAT_OF_SUFFIX = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}


@pytest.fixture(scope="module")
def real_report(real_data: Path) -> DataReport:
    return check_data(real_data)  # the only real-data check in this file: it decodes ~3200 images


@pytest.fixture
def phantom_copy(phantom_root: Path, tmp_path: Path) -> Path:
    root = tmp_path / "data"
    shutil.copytree(phantom_root, root)
    return root


def _manifest(real_data: Path) -> dict[tuple[str, str], list[dict[str, str]]]:
    rows: dict[tuple[str, str], list[dict[str, str]]] = defaultdict(list)
    with (real_data / "MANIFEST.tsv").open(newline="") as fh:
        for row in csv.DictReader(fh, delimiter="\t"):
            rows[SITE_OF_FOLDER[row["site"]], row["class"]].append(row)
    return rows


def test_real_data_matches_manifest(real_report: DataReport, real_data: Path):
    assert real_report.ok, format_report(real_report)
    manifest = _manifest(real_data)
    stats = {(c.site, c.folder): c for c in real_report.classes}
    assert set(stats) == set(manifest)
    for key, rows in manifest.items():
        c = stats[key]
        widths, heights = [int(r["width"]) for r in rows], [int(r["height"]) for r in rows]
        assert c.images == len(rows) and c.bad == 0, key
        assert c.formats == dict(Counter(r["format"] for r in rows)), key
        assert c.modes == dict(Counter(r["mode"] for r in rows)), key
        assert c.misnamed == sum(FORMAT_OF_SUFFIX[Path(r["file"]).suffix.lower()] != r["format"] for r in rows), key
        assert (c.width, c.height) == ((min(widths), max(widths)), (min(heights), max(heights))), key
        assert c.bytes == sum(int(r["bytes"]) for r in rows), key
    assert sum(c.misnamed for c in real_report.classes if c.site == "B") == 34
    assert sum(c.images for c in real_report.classes) == 2481 + 746


def test_real_data_duplicates_stay_in_one_fold_with_patient_groups(real_report: DataReport):
    pairs = [g.files for g in real_report.duplicates]
    assert pairs == [
        ["sars-cov-2/COVID/Covid (128).png", "sars-cov-2/COVID/Covid (129).png"],
        ["sars-cov-2/COVID/Covid (134).png", "sars-cov-2/COVID/Covid (135).png"],
    ]
    for group in real_report.duplicates:
        assert not (group.straddles or group.mixed_labels or group.mixed_sites)
        assert None not in group.folds and len(set(group.folds)) == 1
    assert not real_report.warnings


def test_real_data_site_b_patient_coverage(real_report: DataReport):
    cov = real_report.coverage["B"]
    assert cov is not None and cov.error is None
    assert cov.mapped == {"CT_COVID": 319, "CT_NonCOVID": 397}
    assert cov.unmapped == {"CT_COVID": 30, "CT_NonCOVID": 0}
    assert sum(cov.unmapped_by_prefix.values()) == 30 and len(cov.unmapped_by_prefix) == 4
    assert {"CT_COVID/2020.03.25.20043166-p17", "CT_COVID/2020.03.26.20041426-p11"} <= set(cov.unmapped_by_prefix)
    assert cov.missing_files == [] and cov.patients_in_both_classes == []
    text = format_report(real_report)
    assert "site A has no patient ids" in text and "CT_COVID: 319 of 349 images mapped" in text
    assert text.splitlines()[-1].startswith("OK: 3227 images")


def test_image_level_folds_can_split_a_duplicate_pair(phantom_copy: Path):
    site_a = phantom_copy / "sars-cov-2" / "COVID"
    shutil.copy(site_a / "img000.png", site_a / "img900.png")
    for seed in range(20):
        report = check_data(phantom_copy, split_seed=seed, group_by="image", workers=1)
        (group,) = report.duplicates
        if group.straddles:
            break
    else:
        pytest.fail("no split seed in 0..19 put the duplicate pair into two folds")
    assert report.ok and group.files == ["sars-cov-2/COVID/img000.png", "sars-cov-2/COVID/img900.png"]
    assert any("different folds" in w and "img900.png" in w for w in report.warnings)
    assert "STRADDLES FOLDS" in format_report(report)
    patient = check_data(phantom_copy, split_seed=seed, group_by="patient", workers=1)
    assert not patient.duplicates[0].straddles and not any("different folds" in w for w in patient.warnings)


def test_duplicate_across_sites_and_labels_is_flagged(phantom_copy: Path):
    shutil.copy(phantom_copy / "sars-cov-2/COVID/img001.png", phantom_copy / "covid-ct/CT_NonCOVID/copy.png")
    report = check_data(phantom_copy, group_by="image", workers=1)
    (group,) = report.duplicates
    assert group.mixed_labels and group.mixed_sites and group.labels == [0, 1]
    assert any("different labels" in w for w in report.warnings)


def test_truncated_image_fails_and_is_named(phantom_copy: Path):
    bad = phantom_copy / "covid-ct" / "CT_COVID" / "img000.png"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    report = check_data(phantom_copy, workers=2)
    assert not report.ok
    assert [(p.site, p.file) for p in report.problems] == [("B", "covid-ct/CT_COVID/img000.png")]
    assert next(c for c in report.classes if c.folder == "CT_COVID").bad == 1
    text = format_report(report)
    assert "covid-ct/CT_COVID/img000.png: cannot read image" in text and text.endswith("FAIL: 1 problem(s)")


def test_dicom_ct_slices_in_a_class_folder_are_checked_as_training_reads_them(phantom_copy: Path):
    (ct_slice,) = write_series(phantom_copy.parent / "series", [0.0])
    shutil.move(ct_slice, phantom_copy / "sars-cov-2" / "COVID" / "ct.dcm")
    report = check_data(phantom_copy, workers=1)
    assert report.ok, format_report(report)
    stats = next(c for c in report.classes if c.folder == "COVID")
    assert stats.formats.get("DICOM") == 1 and stats.modes.get("CT") == 1 and stats.misnamed == 0


def test_a_non_ct_dicom_in_a_class_folder_is_named(phantom_copy: Path):
    shutil.copy(get_testdata_file("MR_small.dcm"), phantom_copy / "covid-ct" / "CT_COVID" / "mr.dcm")
    report = check_data(phantom_copy, workers=1)
    assert [(p.site, p.file) for p in report.problems] == [("B", "covid-ct/CT_COVID/mr.dcm")]
    assert "is a MR DICOM, not CT" in format_report(report)


def test_non_image_file_fails_and_other_site_is_still_checked(phantom_copy: Path):
    (phantom_copy / "sars-cov-2" / "non-COVID" / "notes.txt").write_text("hello")
    report = check_data(phantom_copy, workers=1)
    assert not report.ok
    (problem,) = report.problems
    assert problem.site == "A" and "notes.txt is not an image" in problem.message
    assert {c.site for c in report.classes} == {"B"} and "B" in report.coverage


def test_empty_class_folder_fails(phantom_copy: Path):
    for p in (phantom_copy / "covid-ct" / "CT_NonCOVID").iterdir():
        p.unlink()
    report = check_data(phantom_copy, workers=1)
    assert not report.ok
    assert any(p.site == "B" and "holds no images" in p.message for p in report.problems)


def test_missing_site_folder_still_checks_the_other_site(phantom_copy: Path):
    shutil.rmtree(phantom_copy / "sars-cov-2")
    report = check_data(phantom_copy, workers=1)
    assert not report.ok
    (problem,) = report.problems
    assert problem.site == "A" and "sars-cov-2" in problem.message
    assert {(c.site, c.images) for c in report.classes} == {("B", 24)}
    assert report.coverage["B"].mapped == {"CT_COVID": 24, "CT_NonCOVID": 24}


def test_malformed_patients_csv_fails_only_for_patient_folds(phantom_copy: Path):
    (phantom_copy / "covid-ct" / "Meta" / "patients.csv").write_text("folder,file\nCT_COVID,img000.png\n")
    patient = check_data(phantom_copy, group_by="patient", workers=1)
    assert not patient.ok
    (problem,) = patient.problems
    assert problem.site == "B" and "patient_id" in problem.message and "data.group_by=image" in problem.message
    image = check_data(phantom_copy, group_by="image", workers=1)
    assert image.ok and any("patients.csv" in w for w in image.warnings)
    assert image.coverage["B"].error is not None


def test_site_too_small_for_batch_per_site_fails(phantom_root: Path):
    report = check_data(phantom_root, batch_per_site=40, workers=1)  # 48 images a site: ~32 training images a fold
    assert not report.ok and {p.site for p in report.problems} == {"A", "B"}
    assert all("batch_per_site=40" in p.message for p in report.problems)


def test_cli_exit_codes_and_json(phantom_root: Path, phantom_copy: Path, tmp_path: Path, capsys):
    out = tmp_path / "report.json"
    assert main(["check", "--root", str(phantom_root), "--workers", "2", "--json", str(out)]) == 0
    assert capsys.readouterr().out.rstrip().splitlines()[-1].startswith("OK: 96 images")
    data = json.loads(out.read_text())
    assert data["ok"] is True and len(data["classes"]) == 4 and data["problems"] == []

    (phantom_copy / "covid-ct" / "CT_COVID" / "img001.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    assert main(["check", "--root", str(phantom_copy), "--workers", "1"]) == 1
    assert "FAIL: 1 problem(s)" in capsys.readouterr().out

    assert main(["check", "--root", str(phantom_root), "--workers", "0"]) == 2
    assert "error: workers must be positive" in capsys.readouterr().err


def test_folders_and_broken_symlinks_that_training_does_not_read_are_listed(phantom_copy: Path):
    (phantom_copy / "sars-cov-2" / "Pneumonia").mkdir()
    (phantom_copy / "covid-ct" / "CT_COVID" / "more").mkdir()
    (phantom_copy / "covid-ct" / "CT_NonCOVID" / "gone.png").symlink_to(phantom_copy / "nowhere.png")
    report = check_data(phantom_copy, workers=1)
    assert report.ok
    assert "sars-cov-2/Pneumonia/ is not a class folder of site A: not read" in report.warnings
    assert "covid-ct/CT_COVID/more/ is a folder inside a class folder: not read" in report.warnings
    assert "covid-ct/CT_NonCOVID/gone.png is a broken symlink: not read" in report.warnings
    assert not any("Meta" in w for w in report.warnings)


def test_a_fold_with_too_few_images_of_a_class_is_a_warning(phantom_copy: Path):
    for image in sorted((phantom_copy / "covid-ct" / "CT_COVID").iterdir())[2:]:
        image.unlink()
    report = check_data(phantom_copy, group_by="image", workers=1)
    assert report.ok
    assert sum("site B, fold" in w and "its test part holds 0 COVID" in w for w in report.warnings) == 2


def test_every_site_with_patients_gets_its_coverage(phantom_copy: Path, tmp_path: Path):
    """Not only site B: a third site whose patients are folders (a hospital's layout) is covered the same way."""
    make_hospital_site(phantom_copy)
    hospital = str(hospital_site_config(tmp_path / "conf"))
    shutil.copytree(phantom_copy / "hospital" / "normal" / "P000", phantom_copy / "hospital" / "covid" / "P000")
    report = check_data(phantom_copy, sites=["A", "B", hospital], workers=1)
    assert set(report.coverage) == {"B", "hospital"}  # site A has no patient ids
    cov = report.coverage["hospital"]
    assert cov.mapped == {"covid": 25, "normal": 20} and cov.unmapped == {"covid": 0, "normal": 0}
    assert cov.patients == {"covid": 5, "normal": 4} and cov.patients_in_both_classes == ["P000"]
    assert any("1 patient id(s) appear in both classes of site hospital" in w for w in report.warnings)
    text = format_report(report)
    assert "Site hospital patient coverage (patient folders):" in text and "covid: 25 of 25 images mapped" in text
    assert "Site B patient coverage (covid-ct/Meta/patients.csv):" in text
