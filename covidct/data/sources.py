"""Reading a site's folders (as its config, data/sites.py, declares them) and the images in them."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from covidct.data.dicom import DICOM_SUFFIX, LUNG_WINDOW, ct_series, is_dicom, load_ct_slice
from covidct.data.sites import SiteSpec, find_site, read_patient_table, regex_patient, unmapped_group
from covidct.errors import ConfigError, DataError

log = logging.getLogger("covidct.data")
PICTURE_SUFFIXES = {".png", ".jpg", ".jpeg"}
IMAGE_SUFFIXES = {*PICTURE_SUFFIXES, DICOM_SUFFIX}
COVID, NON_COVID = 1, 0  # the labels site configs give their class folders


GROUPINGS = ("patient", "image")  # data.group_by: what folds keep on one side of a split


@dataclass(frozen=True)
class Sample:
    """One image: its site, file, label (1 = COVID), the group that must stay on one side of a split, and
    its patient id where the publisher gives one ('' where not: site A, site B's 30 unmapped images)."""

    site: str
    path: Path
    label: int
    group: str
    name: str  # what records call it: its path under the site folder ('<class>/<file>', '<class>/<patient>/...')
    patient: str = ""


def _spec(site: str | SiteSpec) -> SiteSpec:
    return site if isinstance(site, SiteSpec) else find_site(site)


# the publishers ship these beside site B's class folders (metadata and the official split)
KNOWN_EXTRA_FOLDERS = {"Meta", "Data-split"}


@dataclass(frozen=True)
class SiteListing:
    """What one walk over a site's folder found: its images with their labels, and what lies there unread (one
    line each, naming the entry under the data root). Runs log the unread entries and `data check` lists them,
    both from this one walk, so the two never disagree on what training reads."""

    images: list[tuple[Path, int]]
    unread: list[str]


def _shown(root: Path, path: Path) -> str:
    return path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)


def _image_files(folder: Path, root: Path, unread: list[str], subfolders_read: bool = False) -> list[Path]:
    """A folder's images; a broken symlink (and, unless a caller reads them, a subfolder) goes to `unread`."""
    files = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    strays = [p for p in files if p.is_file() and p.suffix.lower() not in IMAGE_SUFFIXES and not is_dicom(p)]
    if strays:
        raise DataError(
            f"{strays[0]} is not an image (expected {', '.join(sorted(IMAGE_SUFFIXES))} or DICOM); "
            f"move the {len(strays)} non-image file(s) out of {folder}."
        )
    for p in files:
        if p.is_symlink() and not p.exists():
            unread.append(f"{_shown(root, p)} is a broken symlink: not read")
        elif p.is_dir() and not subfolders_read:
            unread.append(f"{_shown(root, p)}/ is a folder inside a class folder: not read")
    return [p for p in files if p.is_file()]


def _patient_images(patient: Path, root: Path, unread: list[str]) -> list[Path]:
    """A patient folder's images, in it and its subfolders (DICOM exports nest studies and series); a folder of
    DICOM slices is checked as one series (ct_series refuses a folder that mixes series)."""
    folders = [patient, *sorted(p for p in patient.rglob("*") if p.is_dir() and not p.name.startswith("."))]
    images = []
    for folder in folders:
        found = _image_files(folder, root, unread, subfolders_read=True)
        if any(p.suffix.lower() not in PICTURE_SUFFIXES for p in found):  # the rest passed as DICOM
            ct_series(folder)
        images += found
    return images


def list_images(root: Path, site: str | SiteSpec) -> list[tuple[Path, int]]:
    """(path, label) for every image of a site, sorted (list_site's images)."""
    return list_site(root, site).images


def list_site(root: Path, site: str | SiteSpec) -> SiteListing:
    """Every image of a site with its label, sorted, and what its folder holds that is not read; clear errors
    for a missing or bad layout. A site whose patients are folders holds '<class>/<patient>/<image>'; any
    other '<class>/<image>'."""
    spec = _spec(site)
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise DataError(
            f"data root {root} is a file, not a directory: set data.root=DIR to the folder holding the sites."
        )
    site_dir = spec.site_dir(root)
    if not root.is_dir() and not Path(spec.folder).is_absolute():
        raise DataError(
            f"data root {root} does not exist. Set data.root=DIR (or env COVIDCT_DATA) to the folder holding "
            f"'{spec.folder}/', or fetch the paper's data with `python -m covidct.data download --root {root}`."
        )
    if not site_dir.is_dir():
        hint = f"get it from {spec.download}" if spec.download else f"fix 'folder' in {spec.source}"
        raise DataError(f"site {spec.name} folder {site_dir} is missing; {hint}.")
    table_folder = Path(spec.patients.file).parts[:-1][:1]  # where a csv site keeps its table (site B: Meta)
    unread = [
        f"{_shown(root, entry)}/ is not a class folder of site {spec.name}: not read"
        for entry in sorted(site_dir.iterdir())
        if entry.is_dir()
        and not entry.name.startswith(".")
        and entry.name not in {*spec.classes, *KNOWN_EXTRA_FOLDERS, *table_folder}
    ]
    items: list[tuple[Path, int]] = []
    for class_folder, label in spec.classes.items():
        class_dir = site_dir / class_folder
        if not class_dir.is_dir():
            raise DataError(f"class folder {class_dir} is missing (site {spec.name} expects {sorted(spec.classes)}).")
        if spec.patients.kind == "folder":
            entries = sorted(p for p in class_dir.iterdir() if not p.name.startswith("."))
            loose = [p for p in entries if p.is_file()]
            if loose:
                raise DataError(
                    f"{loose[0]} lies directly in {class_dir}, but site {spec.name}'s patients are folders "
                    "(patients.kind: folder): move each patient's images into a folder of their own."
                )
            unread += [f"{_shown(root, p)} is a broken symlink: not read" for p in entries if not p.exists()]
            patients = [p for p in entries if p.is_dir()]
            images = [image for patient in patients for image in _patient_images(patient, root, unread)]
        else:
            images = _image_files(class_dir, root, unread)
        if not images:
            raise DataError(f"class folder {class_dir} holds no images; re-download site {spec.name}.")
        items.extend((p, label) for p in images)
    return SiteListing(items, unread)


def load_image(path: Path, ct_window: Sequence[float] = LUNG_WINDOW) -> np.ndarray:
    """Decode any mode (L, RGB, RGBA, P, I;16) to HxWx3 uint8; the format comes from content, not name. A
    DICOM CT slice is converted to Hounsfield units and shown through `ct_window` (data/dicom.py)."""
    if is_dicom(path):
        return load_ct_slice(path, ct_window)
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


def _optional_patient_ids(spec: SiteSpec, root: Path) -> dict[str, str]:
    """Patient ids for patient-level results under image-level folds, which do not need them: a missing or
    malformed table only costs the patient-level results (a warning, and `data check` says why)."""
    try:
        return read_patient_table(spec, root)
    except DataError as err:
        log.warning("no patient-level results for site %s: %s", spec.name, err)
        return {}


def _patient_ids(spec: SiteSpec, root: Path, items: Sequence[tuple[Path, int]], required: bool) -> dict[Path, str]:
    """Each image's patient id, where the site gives one."""
    kind = spec.patients.kind
    if kind == "folder":  # the first folder under the class folder, whatever studies or series lie below it
        site_dir = spec.site_dir(root)
        return {p: ":".join(p.relative_to(site_dir).parts[:2]) for p, _ in items}
    if kind == "regex":
        return {p: regex_patient(spec, p, required) for p, _ in items}
    if kind == "csv":
        table = read_patient_table(spec, root) if required else _optional_patient_ids(spec, root)
        site_dir = spec.site_dir(root)
        return {p: table[key] for p, _ in items if (key := p.relative_to(site_dir).as_posix()) in table}
    return {}


def patient_folders(spec: SiteSpec, name: str) -> list[str]:
    """The parts of an image's name (its path under the site folder) that name its patient: the patient folder of
    a site whose patients are folders, so outputs can hide it with the id (covidct/pseudonyms.py)."""
    parts = Path(name).parts
    return [parts[1]] if spec.patients.kind == "folder" and len(parts) > 2 else []


def scan_site(
    root: Path, site: str | SiteSpec, group_by: str = "patient", listing: SiteListing | None = None
) -> list[Sample]:
    """All samples of a site with the groups folds must respect (a group is '<site>:<patient or image>').

    By the site's patients (sites.py): ids from a table, a file-name pattern or folders; a table's unmapped
    images grouped as its `unmapped` rule says (or refused); no ids: each image its own group, byte-identical
    files together where the site asks. Patient ids are read for patient-level results with either grouping.
    `listing` is the site's walk (list_site) where the caller has made it.
    """
    check_grouping(group_by)
    spec = _spec(site)
    root = Path(root)
    items = (listing or list_site(root, spec)).images
    site_dir = spec.site_dir(root)
    patients = _patient_ids(spec, root, items, required=group_by == "patient")
    samples = []
    first_of_digest: dict[str, str] = {}
    unmapped = []
    for p, y in items:
        name = p.relative_to(site_dir).as_posix()
        patient = patients.get(p, "")
        group = name
        if group_by == "patient" and spec.patients.kind == "csv" and not patient:
            if not spec.patients.unmapped:
                unmapped.append(name)
            else:
                group = unmapped_group(spec, name)
        elif group_by == "patient" and patient:
            group = patient
        elif group_by == "patient" and spec.patients.duplicates == "together":
            group = first_of_digest.setdefault(file_digest(p), name)
        samples.append(Sample(spec.name, p, y, f"{spec.name}:{group}", name, patient))
    if unmapped:
        raise DataError(
            f"{len(unmapped)} image(s) of site {spec.name} are not in {site_dir / spec.patients.file} (first: "
            f"{unmapped[0]}): add them, set patients.unmapped in {spec.source}, or use data.group_by=image."
        )
    return samples
