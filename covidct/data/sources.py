"""Readers for the two publishers' folder layouts and the images in them."""

from __future__ import annotations

import csv
import hashlib
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from covidct.data.dicom import DICOM_SUFFIX, is_dicom, load_ct_slice
from covidct.errors import ConfigError, DataError

log = logging.getLogger("covidct.data")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", DICOM_SUFFIX}
COVID, NON_COVID = 1, 0


@dataclass(frozen=True)
class SiteLayout:
    """Where a site's images live under the data root, which folder means which label, and the published
    dataset the site is (figures name it: a reader knows the datasets, not our site letters)."""

    name: str
    folder: str
    classes: dict[str, int]
    download_hint: str
    dataset: str


SITE_LAYOUTS: dict[str, SiteLayout] = {
    "A": SiteLayout(
        "A",
        "sars-cov-2",
        {"COVID": COVID, "non-COVID": NON_COVID},
        "Kaggle dataset plameneduardo/sarscov2-ctscan-dataset (run `python -m covidct.data download`)",
        "SARS-CoV-2 CT-scan dataset (Soares et al.)",
    ),
    "B": SiteLayout(
        "B",
        "covid-ct",
        {"CT_COVID": COVID, "CT_NonCOVID": NON_COVID},
        "GitHub UCSD-AI4H/COVID-CT, Images-processed/*.zip (run `python -m covidct.data download`)",
        "COVID-CT (Yang et al.)",
    ),
}
SITES: tuple[str, ...] = tuple(SITE_LAYOUTS)
PATIENTS_CSV = Path("covid-ct/Meta/patients.csv")
GROUPINGS = ("patient", "image")  # data.group_by: what folds keep on one side of a split
# Site-B images missing from patients.csv come from two source papers; the paper prefix stands in for a patient.
_PAPER_PREFIX = re.compile(r"^(.*?-p\d+)")


@dataclass(frozen=True)
class Sample:
    """One image: its site, file, label (1 = COVID), the group that must stay on one side of a split, and
    its patient id where the publisher gives one ('' where not: site A, site B's 30 unmapped images)."""

    site: str
    path: Path
    label: int
    group: str
    patient: str = ""

    @property
    def name(self) -> str:
        return f"{self.path.parent.name}/{self.path.name}"


def site_index(site: str) -> int:
    """Fixed index of a site in every site-routed layer, whichever sites a run uses."""
    if site not in SITE_LAYOUTS:
        raise DataError(f"unknown site {site!r}; known sites are {', '.join(SITES)}")
    return SITES.index(site)


def list_images(root: Path, site: str) -> list[tuple[Path, int]]:
    """(path, label) for every image of a site, sorted; clear errors for a missing or bad layout."""
    layout = SITE_LAYOUTS[site]
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise DataError(
            f"data root {root} is a file, not a directory: set data.root=DIR to the folder holding the sites."
        )
    if not root.is_dir():
        raise DataError(
            f"data root {root} does not exist. Set data.root=DIR (or env COVIDCT_DATA) to the folder holding "
            f"'sars-cov-2/' and 'covid-ct/', or fetch the data with `python -m covidct.data download --root {root}`."
        )
    site_dir = root / layout.folder
    if not site_dir.is_dir():
        raise DataError(f"site {site} folder {site_dir} is missing; get it from {layout.download_hint}.")
    items: list[tuple[Path, int]] = []
    for class_folder, label in layout.classes.items():
        class_dir = site_dir / class_folder
        if not class_dir.is_dir():
            raise DataError(f"class folder {class_dir} is missing (site {site} expects {sorted(layout.classes)}).")
        files = sorted(p for p in class_dir.iterdir() if not p.name.startswith("."))
        strays = [p for p in files if p.is_file() and p.suffix.lower() not in IMAGE_SUFFIXES]
        if strays:
            raise DataError(
                f"{strays[0]} is not an image (expected {', '.join(sorted(IMAGE_SUFFIXES))}); "
                f"move the {len(strays)} non-image file(s) out of {class_dir}."
            )
        images = [p for p in files if p.is_file()]
        if not images:
            raise DataError(f"class folder {class_dir} holds no images; re-download site {site}.")
        items.extend((p, label) for p in images)
    return items


def load_image(path: Path) -> np.ndarray:
    """Decode any mode (L, RGB, RGBA, P, I;16) to HxWx3 uint8; the format comes from content, not name. A
    DICOM CT slice is converted to Hounsfield units and shown through the lung window (data/dicom.py)."""
    if is_dicom(path):
        return load_ct_slice(path)
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode == "I;16" or img.mode == "I":
                arr = np.asarray(img, dtype=np.float32)
                span = max(float(arr.max() - arr.min()), 1.0)
                img = Image.fromarray(((arr - arr.min()) / span * 255).astype(np.uint8))
            rgb = img.convert("RGB")
    except Image.DecompressionBombError as err:
        raise DataError(
            f"cannot read image {path}: it has more pixels than PIL's decompression-bomb limit ({err}). Resize it "
            "or remove it from the data root."
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DataError(f"cannot read image {path}: {err}. Replace the file or remove it from the data root.") from err
    return np.asarray(rgb, dtype=np.uint8)


def file_digest(path: Path) -> str:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError as err:
        raise DataError(f"cannot read {path} ({err.strerror or err}); fix its permissions or remove it.") from None


def check_grouping(group_by: str) -> None:
    """Refuse an unknown data.group_by; public so `data check` refuses it before decoding every image."""
    if group_by not in GROUPINGS:
        raise ConfigError(f"data.group_by must be 'patient' or 'image', got {group_by!r}.")


def paper_prefix(file_name: str) -> str:
    """The source-paper prefix that groups a site-B image missing from patients.csv. Public so `data check`
    reports the very groups the folds fall back on."""
    match = _PAPER_PREFIX.match(file_name)
    return match.group(1) if match else Path(file_name).stem


def read_patient_ids(root: Path) -> dict[str, str]:
    """Site B's patients.csv as '<class folder>/<file>' -> '<class folder>:<patient_id>' (an id names a patient
    within its class folder only). Public so `data check` measures the mapping the folds use."""
    path = root / PATIENTS_CSV
    if not path.is_file():
        raise DataError(
            f"{path} is missing: site B's patient-grouped folds need it. Restore it from the dataset, "
            "or use image-level folds with data.group_by=image."
        )
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        needed = {"folder", "file", "patient_id"}
        if reader.fieldnames is None or not needed <= set(reader.fieldnames):
            raise DataError(f"{path} must have the columns {sorted(needed)}; found {reader.fieldnames}.")
        mapping: dict[str, str] = {}
        first_line: dict[str, int] = {}
        for line_no, row in enumerate(reader, start=2):
            folder, file, patient = (row[k] and row[k].strip() for k in ("folder", "file", "patient_id"))
            if not (folder and file and patient):
                raise DataError(f"{path} line {line_no}: empty folder, file or patient_id.")
            key = f"{folder}/{file}"
            if key in first_line:
                raise DataError(
                    f"{path} line {line_no} repeats {key} (first at line {first_line[key]}); keep one row per image."
                )
            first_line[key] = line_no
            mapping[key] = f"{folder}:{patient}"
    return mapping


def _optional_patient_ids(root: Path) -> dict[str, str]:
    """Patient ids for patient-level results under image-level folds, which do not need them: a missing or
    malformed patients.csv only costs the patient-level results (a warning, and `data check` says why)."""
    if not (root / PATIENTS_CSV).is_file():
        log.warning("%s is missing: no patient-level results for site B", root / PATIENTS_CSV)
        return {}
    try:
        return read_patient_ids(root)
    except DataError as err:
        log.warning("no patient-level results for site B: %s", err)
        return {}


def scan_site(root: Path, site: str, group_by: str = "patient") -> list[Sample]:
    """All samples of a site with the groups folds must respect.

    Site A has no patient ids: byte-identical files form a group, otherwise each image is its own group.
    Site B uses patients.csv, falling back to the source-paper prefix for unmapped images. Patient ids are
    read for patient-level results with either grouping (image-level folds do without a patients.csv).
    """
    check_grouping(group_by)
    root = Path(root)
    items = list_images(root, site)
    if group_by == "image":
        patients = _optional_patient_ids(root) if site == "B" else {}
        return [
            Sample(site, p, y, f"{site}:{p.parent.name}/{p.name}", patients.get(f"{p.parent.name}/{p.name}", ""))
            for p, y in items
        ]
    if site == "A":
        first_of_digest: dict[str, str] = {}
        samples = []
        for p, y in items:
            name = f"{p.parent.name}/{p.name}"
            group = first_of_digest.setdefault(file_digest(p), name)
            samples.append(Sample(site, p, y, f"A:{group}"))
        return samples
    patients = read_patient_ids(root)
    samples = []
    for p, y in items:
        name = f"{p.parent.name}/{p.name}"
        patient = patients.get(name, "")
        group = patient
        if not patient:
            group = f"{p.parent.name}:paper:{paper_prefix(p.name)}"
        samples.append(Sample(site, p, y, f"B:{group}", patient))
    return samples


def scan_sites(root: Path, sites: Sequence[str], group_by: str = "patient") -> dict[str, list[Sample]]:
    return {site: scan_site(root, site, group_by) for site in sites}
