"""Fetch the two sites' public data into the layout `covidct.data.sources` reads.

Site B (UCSD-AI4H/COVID-CT) is public on GitHub and downloads with the standard library alone. Site A
(Kaggle plameneduardo/sarscov2-ctscan-dataset) needs a Kaggle account: it downloads through the optional
`kaggle` package when credentials exist and otherwise comes with exact instructions for the manual step.
"""

from __future__ import annotations

import http.client
import os
import shlex
import shutil
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath

from covidct.atomic import atomic_write
from covidct.data.sites import PAPER_SITES, paper_site
from covidct.data.sources import IMAGE_SUFFIXES
from covidct.errors import DataError

DEFAULT_BASE_URL = "https://github.com/UCSD-AI4H/COVID-CT/raw/master"
KAGGLE_DATASET = "plameneduardo/sarscov2-ctscan-dataset"
KAGGLE_URL = f"https://www.kaggle.com/datasets/{KAGGLE_DATASET}"
SITE_B_ZIPS = {
    "CT_COVID": "Images-processed/CT_COVID.zip",
    "CT_NonCOVID": "Images-processed/CT_NonCOVID.zip",
}
SITE_B_METADATA = tuple(
    f"Data-split/{group}/{split}CT_{group}.txt" for group in ("COVID", "NonCOVID") for split in ("train", "val", "test")
)
_TIMEOUT_S = 60


def _download_command(root: Path) -> str:
    return f"python -m covidct.data download --root {shlex.quote(str(root))}"


def _has_images(folder: Path) -> bool:
    return folder.is_dir() and any(
        p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES for p in folder.iterdir()
    )


def _fetch(url: str, dest: Path) -> None:
    """Download atomically, so an interrupted run leaves no half file."""

    def download(temp: Path) -> None:
        request = urllib.request.Request(url, headers={"User-Agent": "covidct-downloader"})
        # A fresh opener reads the proxy settings of the environment at call time.
        with temp.open("wb") as out, urllib.request.build_opener().open(request, timeout=_TIMEOUT_S) as resp:
            shutil.copyfileobj(resp, out)

    try:
        atomic_write(dest, download)
    except urllib.error.HTTPError as err:
        raise DataError(f"downloading {url} failed: HTTP {err.code} {err.reason}") from err
    except (urllib.error.URLError, http.client.HTTPException, OSError) as err:
        reason = getattr(err, "reason", None) or err
        raise DataError(f"downloading {url} failed: {reason}") from err


def _archive_members(archive: Path) -> list[zipfile.ZipInfo]:
    """All members, after refusing any whose name could write outside the destination (zip-slip)."""
    try:
        with zipfile.ZipFile(archive) as zf:
            members = zf.infolist()
    except zipfile.BadZipFile as err:
        raise DataError(f"{archive} is not a zip archive ({err}); the download may be an error page.") from err
    for info in members:
        name = info.filename.replace("\\", "/")
        if name.startswith("/") or (len(name) > 1 and name[1] == ":") or ".." in name.split("/"):
            raise DataError(
                f"{archive} holds the unsafe member {info.filename!r} (absolute path or '..'); refusing to unpack it."
            )
    return members


def _unpack(archive: Path, site_dir: Path, folders: dict[str, str], fallback: str | None) -> dict[str, int]:
    """Unpack the images of `archive` into class folders of `site_dir`; returns images per class folder.

    An image goes to `folders[name]` for the nearest enclosing archive folder `name` that `folders` knows,
    else to `fallback` (zips without a top-level folder), else it is skipped. Junk (`__MACOSX/`,
    dot-files, non-images) is skipped. Images are unpacked into a staging folder first, so a class
    folder never holds a partial archive that a later run would take as complete.
    """
    members = _archive_members(archive)
    staging = Path(tempfile.mkdtemp(dir=site_dir, prefix=".unpack-"))
    counts = dict.fromkeys(sorted({*folders.values(), *([fallback] if fallback else [])}), 0)
    try:
        with zipfile.ZipFile(archive) as zf:
            for info in members:
                parts = PurePosixPath(info.filename.replace("\\", "/")).parts
                if info.is_dir() or any(p == "__MACOSX" or p.startswith(".") for p in parts):
                    continue
                if PurePosixPath(parts[-1]).suffix.lower() not in IMAGE_SUFFIXES:
                    continue
                target = next((folders[p] for p in reversed(parts[:-1]) if p in folders), fallback)
                if target is None:
                    continue
                out = staging / target / parts[-1]
                out.parent.mkdir(exist_ok=True)
                with zf.open(info) as src, out.open("wb") as dst:
                    shutil.copyfileobj(src, dst)
                counts[target] += 1
        empty = [name for name, n in counts.items() if n == 0]
        if empty:
            raise DataError(
                f"{archive} holds no images for {', '.join(empty)} "
                f"(expected images under the archive folders {sorted(folders)})."
            )
        for name in counts:
            dest = site_dir / name
            if not dest.exists():
                os.replace(staging / name, dest)
                continue
            for image in (staging / name).iterdir():
                os.replace(image, dest / image.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return counts


def _patients_csv(root: Path) -> Path:
    spec = paper_site("B")
    return spec.site_dir(Path(root)) / spec.patients.file


def download_site_b(root: Path, base_url: str = DEFAULT_BASE_URL, force: bool = False) -> None:
    """Fetch site B's image zips and split lists into `<root>/covid-ct/`.

    Class folders that already hold images and split lists already on disk are skipped unless `force`,
    so a rerun after an interruption only fetches what is missing.
    """
    site_dir = Path(root) / paper_site("B").folder
    site_dir.mkdir(parents=True, exist_ok=True)
    base_url = base_url.rstrip("/")
    for class_folder, rel_url in SITE_B_ZIPS.items():
        class_dir = site_dir / class_folder
        if not force and _has_images(class_dir):
            print(f"site B: {class_dir} already holds images; skipping (--force re-downloads).")
            continue
        url = f"{base_url}/{rel_url}"
        archive = site_dir / PurePosixPath(rel_url).name
        print(f"site B: downloading {url}")
        try:
            _fetch(url, archive)
            counts = _unpack(archive, site_dir, {class_folder: class_folder}, fallback=class_folder)
        except DataError as err:
            raise DataError(
                f"{err}\nDownload {url} by hand and unpack it so that its images lie directly in {class_dir}/"
            ) from err
        finally:
            archive.unlink(missing_ok=True)
        print(f"site B: unpacked {counts[class_folder]} images into {class_dir}")
    for rel_url in SITE_B_METADATA:
        dest = site_dir / rel_url
        if dest.is_file() and not force:
            continue
        try:
            _fetch(f"{base_url}/{rel_url}", dest)
        except DataError as err:
            print(f"warning: site B split list not fetched: {err}", file=sys.stderr)
    if not _patients_csv(root).is_file():
        print(
            f"note: site B's patient-grouped folds need {_patients_csv(root)} (columns folder,file,"
            "patient_id), which the download does not provide; data.group_by=image works without it."
        )


def site_a_instructions(root: Path) -> str:
    """The manual steps for site A, whose Kaggle download needs an account."""
    site_dir = Path(root) / paper_site("A").folder
    return (
        f"Site A must be downloaded from Kaggle (a free account is needed):\n"
        f"  1. Download the Kaggle dataset {KAGGLE_DATASET} from\n"
        f"     {KAGGLE_URL}\n"
        f"     (or run: kaggle datasets download -d {KAGGLE_DATASET}).\n"
        f"  2. Unpack it so that these exist:\n"
        f"     {site_dir / 'COVID'}/*.png\n"
        f"     {site_dir / 'non-COVID'}/*.png\n"
        f"  To automate this instead: pip install kaggle, put your API token in ~/.kaggle/kaggle.json\n"
        f"  (or set KAGGLE_USERNAME and KAGGLE_KEY) and run: {_download_command(root)} --sites A"
    )


def _kaggle_credentials() -> bool:
    if os.environ.get("KAGGLE_USERNAME") and os.environ.get("KAGGLE_KEY"):
        return True
    config_dir = os.environ.get("KAGGLE_CONFIG_DIR")
    return (Path(config_dir) if config_dir else Path.home() / ".kaggle").joinpath("kaggle.json").is_file()


def download_site_a(root: Path, force: bool = False) -> str | None:
    """Fetch site A through the Kaggle API when it can; None when the data is in place.

    Without credentials or the `kaggle` package it returns the manual instructions instead of failing,
    because site A is meant to be a manual step for most users.
    """
    site_dir = Path(root) / paper_site("A").folder
    classes = list(paper_site("A").classes)
    if not force and all(_has_images(site_dir / c) for c in classes):
        print(f"site A: {site_dir} already holds images; skipping (--force re-downloads).")
        return None
    if not _kaggle_credentials():
        return f"site A: no Kaggle credentials found.\n{site_a_instructions(root)}"
    try:
        import kaggle  # optional, and it authenticates on import: only imported here
    except ImportError:
        return f"site A: the `kaggle` package is not installed.\n{site_a_instructions(root)}"
    except Exception as err:  # kaggle raises assorted errors when authentication fails
        raise DataError(f"Kaggle authentication failed: {err}\n{site_a_instructions(root)}") from err
    site_dir.mkdir(parents=True, exist_ok=True)
    download_dir = Path(tempfile.mkdtemp(dir=site_dir, prefix=".kaggle-"))
    try:
        print(f"site A: downloading Kaggle dataset {KAGGLE_DATASET}")
        try:
            kaggle.api.dataset_download_files(KAGGLE_DATASET, path=str(download_dir), force=True, unzip=False)
        except Exception as err:  # network, HTTP 403 for unaccepted terms, quota: all end here
            raise DataError(
                f"downloading Kaggle dataset {KAGGLE_DATASET} failed: {err}\n{site_a_instructions(root)}"
            ) from err
        archives = sorted(download_dir.glob("*.zip"))
        if not archives:
            raise DataError(f"the Kaggle download left no zip in {download_dir}.\n{site_a_instructions(root)}")
        counts = _unpack(archives[0], site_dir, {c: c for c in classes}, fallback=None)
    finally:
        shutil.rmtree(download_dir, ignore_errors=True)
    print(f"site A: unpacked {', '.join(f'{n} images into {site_dir / c}' for c, n in counts.items())}")
    return None


def missing_data_message(root: Path) -> str | None:
    """None when every class folder of both sites holds images; else what is missing and how to get it."""
    root = Path(root)
    missing: list[str] = []
    sites_missing: set[str] = set()
    for site, layout in ((name, paper_site(name)) for name in PAPER_SITES):
        for class_folder in layout.classes:
            folder = root / layout.folder / class_folder
            if not _has_images(folder):
                state = "holds no images" if folder.is_dir() else "is missing"
                missing.append(f"  - site {site}: {folder} {state}")
                sites_missing.add(site)
    if not missing:
        return None
    lines = [f"The COVID-CT data under {root} is incomplete:", *missing, "To get it:"]
    lines.append(f"  - Download site B (and site A, given Kaggle credentials): {_download_command(root)}")
    if "A" in sites_missing:
        first, *rest = site_a_instructions(root).splitlines()
        lines.extend([f"  - {first}", *(f"  {line}" for line in rest)])
    lines.append(
        "  - If the data already exists elsewhere, point the project at it with data.root=DIR "
        "or the environment variable COVIDCT_DATA=DIR."
    )
    return "\n".join(lines)
