"""A folder of CT images (or DICOM series) classified with a trained checkpoint (`covidct.predict`).

Images go through exactly the evaluation path of training (the checkpoint's image size, mean and std; square
resize, then normalisation) and the chosen site's branch (its norms, adapters or network). DICOM CT slices (one
folder per series) are read in Hounsfield units through the lung window, listed along the body, and summarised
per patient. A site the model never saw needs `unseen_norm` where the model's norms are per site
(models/unseen.py); `adabn` estimates that site's BatchNorm statistics on the folder's own images.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from covidct.atomic import atomic_write_text
from covidct.csvfiles import csv_text
from covidct.data.decoding import Decoded, DecodedImages, chunks
from covidct.data.dicom import CtSlice, ct_series, is_dicom
from covidct.data.sources import IMAGE_SUFFIXES
from covidct.errors import ConfigError, DataError
from covidct.inference.trained import TrainedModel
from covidct.metrics import DECISION_THRESHOLD, predicts_covid
from covidct.outputs import check_outputs
from covidct.pseudonyms import Pseudonyms

CSV_COLUMNS = ("file", "prob_covid", "prediction", "error")
PATIENT_COLUMNS = ("patient", "series", "slices", "unreadable", "prob_mean", "prob_max", "prediction")


def image_files(folder: Path, recursive: bool = False) -> list[Path]:
    """Image files in `folder` (by suffix or DICOM magic; with `recursive`, in its subfolders too), sorted, a
    broken link among them (listed, to be reported unreadable); anything else is ignored, and said."""
    if not folder.is_dir():
        raise ConfigError(f"image folder {folder} does not exist or is not a folder.")
    candidates = sorted(folder.rglob("*") if recursive else folder.iterdir())
    files = [p for p in candidates if _looks_like_image(p)]
    ignored = [p for p in candidates if not p.is_dir() and not p.name.startswith(".") and p not in set(files)]
    if ignored:
        print(
            f"ignored {len(ignored)} file(s) in {folder} that are not images (first: {ignored[0].name})",
            file=sys.stderr,
        )
    if files:
        return files
    subfolders = [p for p in folder.iterdir() if p.is_dir()]
    if subfolders and not recursive:  # not named: a hospital export names its folders by patient
        raise DataError(
            f"{folder} holds no image files itself, but {len(subfolders)} subfolder(s); add recursive=true to "
            "classify the images in them."
        )
    raise DataError(f"{folder} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))}).")


def _looks_like_image(path: Path) -> bool:
    """An image by suffix, a DICOM by its magic, or a broken link named like an image (so it is reported)."""
    if path.is_symlink() and not path.exists():
        return path.suffix.lower() in IMAGE_SUFFIXES
    return path.is_file() and (path.suffix.lower() in IMAGE_SUFFIXES or is_dicom(path))


def predict_folder(
    ckpt: str | Path,
    images: str | Path,
    site: str,
    batch_size: int = 32,
    device: str = "auto",
    threshold: float = DECISION_THRESHOLD,
    recursive: bool = False,
    unseen_norm: str | None = None,
    window: Sequence[float] | None = None,
    workers: int = 0,
) -> list[dict[str, Any]]:
    """One row per image file: file (its path under `images`), prob_covid, prediction and error (set, with no
    prob, if unreadable); a DICOM slice's row also has its patient (PatientID, else its series folder's name)
    and `aliases` (its PatientName: what an export may name the patient's folder by, hidden with the id).

    An unreadable file does not stop the others: a folder of scans often holds a few damaged ones. `workers`
    processes decode while the model classifies (0: decode in this process).
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}.")
    if workers < 0:
        raise ConfigError(f"workers must be 0 (decode in this process) or more, got {workers}.")
    if not 0.0 <= threshold <= 1.0:
        raise ConfigError(f"threshold must be in [0, 1], got {threshold}.")
    folder = Path(images)
    files, slices = along_the_body(image_files(folder, recursive))
    model = TrainedModel(ckpt, device)
    site = model.site_name(site)
    if window is not None and (len(window) != 2 or window[1] <= 0):
        raise ConfigError(f"window must be [centre, width] in Hounsfield units, width > 0; got {list(window)}.")
    decoded: Iterable[Decoded] = DecodedImages(model.load, folder, files, window or model.window(site), workers)
    used = 0
    if unseen_norm is not None:
        decoded = list(decoded)  # AdaBN reads the images before they are classified: decode them once
        used = model.add_unseen_site(site, unseen_norm, _Batches(model, decoded, batch_size))
        if unseen_norm == "adabn" and site in model.unseen and used < 2:
            raise DataError(f"unseen_norm=adabn needs at least 2 readable images in {folder} to estimate site {site}.")
    model.check_site(site)
    note = model.unseen_note(site)
    if note:
        if used:
            note += f", its BatchNorm statistics estimated on {used} image(s) here"
        print(f"site {site} was not seen in training ({', '.join(model.method.sites)}): {note}", file=sys.stderr)
    rows: list[dict[str, Any]] = []
    for chunk in chunks(decoded, batch_size):
        readable: list[tuple[dict[str, Any], np.ndarray]] = []
        for path, image, error in chunk:
            row = {"file": path.relative_to(folder).as_posix(), "prob_covid": None, "prediction": None, "error": error}
            if path in slices:
                named_by_folder = not slices[path].patient  # no PatientID: its series folder names the patient
                row["patient"] = path.parent.name if named_by_folder else slices[path].patient
                row["aliases"] = [slices[path].patient_name]
            rows.append(row)
            if image is not None:
                readable.append((row, image))
        if readable:
            probs = model.prob_covid(model.batch([image for _, image in readable]), site)
            for (row, _), prob in zip(readable, probs.tolist()):
                row["prob_covid"] = prob
                row["prediction"] = verdict(prob, threshold)
    return rows


class _Batches:
    """The readable images of decoded files as normalised batches (AdaBN's statistics count every image, however
    batched); iterable again, for estimates that read the images more than once."""

    def __init__(self, model: TrainedModel, decoded: Sequence[Decoded], batch_size: int):
        self.model, self.decoded, self.batch_size = model, decoded, batch_size

    def __iter__(self) -> Iterator[torch.Tensor]:
        for chunk in chunks(self.decoded, self.batch_size):
            images = [image for _, image, _ in chunk if image is not None]
            if images:
                yield self.model.batch(images)


def verdict(prob_covid: float, threshold: float) -> str:
    """A prediction in words, by the metrics' own decision rule."""
    return "COVID" if predicts_covid(prob_covid, threshold) else "non-COVID"


def along_the_body(files: Sequence[Path]) -> tuple[list[Path], dict[Path, CtSlice]]:
    """The files, with each folder's DICOM slices in their series' order (a folder mixing series is refused) and
    every other file where it sorts, and each slice's header facts (data/dicom.py), from one read of the headers."""
    readable = [p for p in files if p.exists()]
    series = {folder: ct_series(folder) for folder in sorted({p.parent for p in readable if is_dicom(p)})}
    slices = {s.path: s for folder_slices in series.values() for s in folder_slices}
    ordered: list[Path] = []
    for path in files:
        if path not in slices:
            ordered.append(path)
        elif path.parent in series:
            ordered.extend(s.path for s in series.pop(path.parent))
    return ordered, slices


def patient_summary(
    rows: Sequence[dict[str, Any]], folder: Path, threshold: float = DECISION_THRESHOLD
) -> list[dict[str, Any]]:
    """One row per patient of predict_folder's DICOM rows (those with a patient): its series folders under
    `folder`, slices and how many could not be read, and the slices' mean and max probability; the prediction
    pools by the mean, as the run records' patient-level results do."""
    groups: dict[str, list[tuple[Path, dict[str, Any]]]] = {}
    for row in rows:
        if "patient" in row:
            groups.setdefault(row["patient"], []).append((folder / row["file"], row))
    summary = []
    for patient, items in groups.items():
        probs = [row["prob_covid"] for _, row in items if row["prob_covid"] is not None]
        mean = sum(probs) / len(probs) if probs else None
        folders = sorted({path.parent.relative_to(folder).as_posix() for path, _ in items})
        summary.append(
            {
                "patient": patient,
                "series": ";".join(folders),
                "slices": len(items),
                "unreadable": len(items) - len(probs),
                "prob_mean": mean,
                "prob_max": max(probs) if probs else None,
                "prediction": None if mean is None else verdict(mean, threshold),
            }
        )
    return summary


def write_predictions(rows: Sequence[dict[str, Any]], path: Path) -> None:
    atomic_write_text(path, csv_text(rows, CSV_COLUMNS))


def patients_file(out: Path) -> Path:
    return out.with_name(f"{out.stem}_patients.csv")


def shown_rows(rows: Sequence[dict[str, Any]], pseudonyms: Pseudonyms) -> list[dict[str, Any]]:
    """predict_folder's rows as the outputs show them: patient ids, and the folders and messages naming them, as
    pseudonyms (unless patient_ids=raw)."""
    shown = []
    for row, out in zip(rows, pseudonyms.rows(rows, {r["patient"]: r["aliases"] for r in rows if "patient" in r})):
        if row["error"] and out["file"] != row["file"]:
            out["error"] = row["error"].replace(row["file"], out["file"])
        shown.append(out)
    return shown


def _inputs(ckpt: str | Path, images: Path, recursive: bool) -> list[Path]:
    candidates = (images.rglob("*") if recursive else images.iterdir()) if images.is_dir() else []
    return [Path(ckpt), *(p for p in candidates if _looks_like_image(p))]


def predict_to_files(
    ckpt: str | Path,
    images: str | Path,
    site: str,
    out: str | Path = "predictions.csv",
    patient_ids: str = "pseudonym",
    pseudonym_key: str | None = None,
    overwrite: bool = False,
    threshold: float = DECISION_THRESHOLD,
    **options: Any,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """predict_folder's rows (`options`: its other arguments) written to `out`, and, for DICOM series, one row
    per patient to `<out>_patients.csv`; returns both, as written. Patients, and the folders and messages naming
    them, are keyed pseudonyms unless `patient_ids=raw`; every cell is safe to open in a spreadsheet
    (covidct/csvfiles.py). `out` never replaces a run's record, an input, or (without `overwrite`) a file."""
    out, folder = Path(out), Path(images)
    check_outputs([out, patients_file(out)], _inputs(ckpt, folder, bool(options.get("recursive"))), overwrite)
    pseudonyms = Pseudonyms(patient_ids, pseudonym_key)
    rows = shown_rows(predict_folder(ckpt, folder, site, threshold=threshold, **options), pseudonyms)
    write_predictions(rows, out)
    patients = patient_summary(rows, folder, threshold)
    if patients:
        atomic_write_text(patients_file(out), csv_text(patients, PATIENT_COLUMNS))
    return rows, patients
