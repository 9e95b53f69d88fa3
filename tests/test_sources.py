import csv
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from covidct.data.sources import file_digest, list_images, load_image, scan_site
from covidct.errors import DataError


def test_reads_jpeg_named_png_rgba_grayscale_and_16bit(tmp_path: Path):
    gray = (np.arange(30 * 40) % 251).astype(np.uint8).reshape(30, 40)
    Image.fromarray(gray).convert("RGB").save(tmp_path / "jpeg.png", format="JPEG", quality=100)
    Image.fromarray(np.dstack([gray, gray, gray, np.full_like(gray, 255)]), "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(gray).save(tmp_path / "gray.png")
    Image.fromarray(gray.astype(np.uint16) * 200).save(tmp_path / "deep.png")
    for name in ("jpeg.png", "rgba.png", "gray.png", "deep.png"):
        image = load_image(tmp_path / name)
        assert image.shape == (30, 40, 3) and image.dtype == np.uint8, name
        assert (image[..., 0] == image[..., 1]).all() and (image[..., 1] == image[..., 2]).all()
    assert (load_image(tmp_path / "gray.png")[..., 0] == gray).all()
    assert (load_image(tmp_path / "rgba.png")[..., 0] == gray).all()
    assert np.abs(load_image(tmp_path / "jpeg.png")[..., 0].astype(int) - gray).max() <= 3
    deep = load_image(tmp_path / "deep.png")[..., 0]
    assert deep.min() == 0 and deep.max() == 255


def test_corrupt_image_error_names_the_file(tmp_path: Path):
    bad = tmp_path / "broken.png"
    good = tmp_path / "good.png"
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(good)
    bad.write_bytes(good.read_bytes()[:40])
    with pytest.raises(DataError, match="broken.png"):
        load_image(bad)


def test_missing_root_says_how_to_get_data(tmp_path: Path):
    with pytest.raises(DataError, match=r"does not exist.*data.root.*covidct.data download"):
        list_images(tmp_path / "nowhere", "A")


def test_missing_site_folder_and_empty_class_folder(tmp_path: Path):
    with pytest.raises(DataError, match="sars-cov-2"):
        list_images(tmp_path, "A")
    (tmp_path / "sars-cov-2" / "COVID").mkdir(parents=True)
    (tmp_path / "sars-cov-2" / "non-COVID").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "sars-cov-2" / "COVID" / "a.png")
    with pytest.raises(DataError, match=r"non-COVID holds no images"):
        list_images(tmp_path, "A")


def test_non_image_file_in_class_folder(phantom_root: Path, tmp_path: Path):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(phantom_root, root)
    (root / "covid-ct" / "CT_COVID" / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match="notes.txt is not an image"):
        list_images(root, "B")


def test_phantom_sites_scan(phantom_root: Path):
    for site in ("A", "B"):
        samples = scan_site(phantom_root, site)
        assert Counter(s.label for s in samples) == {0: 24, 1: 24}
    groups = {s.group for s in scan_site(phantom_root, "B")}
    assert len(groups) == 2 * 8  # 3 images per patient and class


def test_malformed_patient_csv(phantom_root: Path, tmp_path: Path):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(phantom_root, root)
    (root / "covid-ct" / "Meta" / "patients.csv").write_text("name,who\nx,y\n")
    with pytest.raises(DataError, match=r"patients.csv must have the columns"):
        scan_site(root, "B")
    (root / "covid-ct" / "Meta" / "patients.csv").unlink()
    with pytest.raises(DataError, match="group_by=image"):
        scan_site(root, "B")
    assert len(scan_site(root, "B", group_by="image")) == 48


def _manifest(real_data: Path) -> list[dict[str, str]]:
    with (real_data / "MANIFEST.tsv").open() as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


def test_real_data_matches_manifest(real_data: Path):
    manifest = _manifest(real_data)
    for site, folder in (("A", "sars-cov-2"), ("B", "covid-ct")):
        expected = Counter(row["class"] for row in manifest if row["site"] == folder)
        found = Counter(path.parent.name for path, _ in list_images(real_data, site))
        assert found == expected
    assert sum(1 for _ in list_images(real_data, "A")) == 2481
    assert sum(1 for _ in list_images(real_data, "B")) == 746


def test_real_site_a_duplicates_share_a_group(real_data: Path):
    samples = scan_site(real_data, "A")
    by_name = {s.path.name: s.group for s in samples}
    assert by_name["Covid (128).png"] == by_name["Covid (129).png"]
    assert by_name["Covid (134).png"] == by_name["Covid (135).png"]
    assert len({s.group for s in samples}) == 2481 - 2
    assert file_digest(real_data / "sars-cov-2/COVID/Covid (128).png") == file_digest(
        real_data / "sars-cov-2/COVID/Covid (129).png"
    )


def test_real_site_b_groups_patients_and_source_papers(real_data: Path):
    samples = scan_site(real_data, "B")
    paper_groups = Counter(s.group for s in samples if ":paper:" in s.group)
    assert sum(paper_groups.values()) == 30
    # data/README.md names two source papers; the files show four prefixes (12 images more than it says)
    assert paper_groups == {
        "B:CT_COVID:paper:2020.03.26.20041426-p11": 14,
        "B:CT_COVID:paper:bmj.m606.full-p4": 8,
        "B:CT_COVID:paper:2020.03.25.20043166-p17": 4,
        "B:CT_COVID:paper:2020.03.30.20047985-p9": 4,
    }
    assert all(s.label == 1 for s in samples if ":paper:" in s.group)
    # every group holds one class only
    labels_of = {}
    for s in samples:
        labels_of.setdefault(s.group, set()).add(s.label)
    assert all(len(v) == 1 for v in labels_of.values())


def test_real_jpeg_named_png_decodes(real_data: Path):
    row = next(r for r in _manifest(real_data) if r["format"] == "JPEG" and r["file"].endswith(".png"))
    image = load_image(real_data / row["site"] / row["class"] / row["file"])
    assert image.shape == (int(row["height"]), int(row["width"]), 3)


def test_an_image_over_pils_pixel_limit_is_named_in_run_and_check(phantom_root: Path, tmp_path: Path):
    import shutil

    from PIL import Image

    from covidct.data.check import check_data
    from covidct.training.fit import train
    from tests.helpers import FAST, compose_experiment

    root = tmp_path / "data"
    shutil.copytree(phantom_root, root)
    huge = root / "sars-cov-2" / "COVID" / "huge.png"
    Image.new("1", (14000, 14000)).save(huge)
    with pytest.raises(DataError, match=r"cannot read image .*huge.png: it has more pixels than PIL's"):
        load_image(huge)
    report = check_data(root, workers=1)
    assert not report.ok and any(
        p.file and "huge.png" in p.file and "decompression-bomb" in p.message for p in report.problems
    )
    with pytest.raises(DataError, match=r"huge.png: it has more pixels"):
        train(compose_experiment("joint", [f"data.root={root}", *FAST]), tmp_path / "run")


def test_an_unreadable_image_is_named_when_site_a_is_hashed_for_duplicates(phantom_root: Path, monkeypatch):
    bad = phantom_root / "sars-cov-2" / "COVID" / "img004.png"
    real_read = Path.read_bytes

    def read_bytes(self: Path) -> bytes:
        if self == bad:
            raise PermissionError(13, "Permission denied", str(self))
        return real_read(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    with pytest.raises(DataError, match=r"cannot read .*img004.png \(Permission denied\); fix its permissions"):
        scan_site(phantom_root, "A", group_by="patient")


def test_a_repeated_row_in_patients_csv_is_refused(phantom_root: Path, tmp_path: Path):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(phantom_root, root)
    csv_path = root / "covid-ct" / "Meta" / "patients.csv"
    lines = csv_path.read_text().splitlines()
    csv_path.write_text("\n".join([*lines, lines[1].replace(lines[1].split(",")[-1], "other")]) + "\n")
    with pytest.raises(DataError, match=r"patients.csv line \d+ repeats CT_.*\(first at line 2\); keep one row"):
        scan_site(root, "B")
