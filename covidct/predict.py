"""Classify a folder of CT images with a trained checkpoint.

`python -m covidct.predict ckpt=PATH images=DIR site=A|B|NAME [recursive=false] [out=predictions.csv]
[unseen_norm=adabn|mean|site:<name>] [window=[-600,1500]] [batch_size=32] [device=cpu|cuda|auto] [threshold=0.5]`

Images go through exactly the evaluation path of training (the checkpoint's image size, mean and std;
square resize, then normalisation) and the chosen site's branch (its norms, adapters or network).
DICOM CT slices (one folder per series) are read in Hounsfield units through the lung window, listed along
the body, and summarised per patient in a second file, `<out>_patients.csv`. A site the model never saw
needs `unseen_norm` where the model's norms are per site (models/unseen.py); `adabn` estimates that site's
BatchNorm statistics on the folder's own images.
"""

from __future__ import annotations

import csv
import io
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import MISSING

from covidct.atomic import atomic_write_text
from covidct.cli import cli_errors, parse_args
from covidct.data.dicom import ct_series, is_dicom
from covidct.data.sources import IMAGE_SUFFIXES
from covidct.errors import ConfigError, DataError
from covidct.inference import TrainedModel
from covidct.metrics import DECISION_THRESHOLD

CSV_COLUMNS = ("file", "prob_covid", "prediction", "error")
PATIENT_COLUMNS = ("patient", "series", "slices", "unreadable", "prob_mean", "prob_max", "prediction")
USAGE = (
    "python -m covidct.predict ckpt=PATH images=DIR site=A|B|NAME [recursive=false] [out=predictions.csv] "
    "[unseen_norm=adabn|mean|site:<name>] [window=[-600,1500]] [batch_size=32] [device=cpu|cuda|auto] [threshold=0.5]"
)


@dataclass
class PredictArgs:
    ckpt: str = MISSING
    images: str = MISSING
    site: str = MISSING
    recursive: bool = False  # also the images in subfolders (e.g. one folder per class or patient)
    out: str = "predictions.csv"
    batch_size: int = 32
    device: str = "auto"
    threshold: float = DECISION_THRESHOLD
    unseen_norm: str | None = None  # for a site the model never saw: adabn, mean or site:<trained site>
    window: list[float] | None = None  # DICOM [centre, width] in HU (default: the site's, else the lung window)


def image_files(folder: Path, recursive: bool = False) -> list[Path]:
    """Image files in `folder` (by suffix; with `recursive`, in its subfolders too), sorted; anything else is
    ignored."""
    if not folder.is_dir():
        raise ConfigError(f"image folder {folder} does not exist or is not a folder.")
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    files = sorted(p for p in candidates if p.is_file() and (p.suffix.lower() in IMAGE_SUFFIXES or is_dicom(p)))
    if files:
        return files
    subfolders = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if subfolders and not recursive:
        shown = ", ".join(f"{name}/" for name in subfolders[:3]) + (", ..." if len(subfolders) > 3 else "")
        raise DataError(
            f"{folder} holds no image files itself, but {len(subfolders)} subfolder(s) ({shown}); add "
            "recursive=true to classify the images in them."
        )
    raise DataError(f"{folder} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))}).")


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
) -> list[dict[str, Any]]:
    """One row per image file: file (its path under `images`), prob_covid, prediction and error (set, with no
    prob, if unreadable).

    An unreadable file does not stop the others: a folder of scans often holds a few damaged ones.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}.")
    if not 0.0 <= threshold <= 1.0:
        raise ConfigError(f"threshold must be in [0, 1], got {threshold}.")
    folder = Path(images)
    files, patients = along_the_body(image_files(folder, recursive))
    model = TrainedModel(ckpt, device)
    site = model.site_name(site)
    if window is not None and (len(window) != 2 or window[1] <= 0):
        raise ConfigError(f"window must be [centre, width] in Hounsfield units, width > 0; got {list(window)}.")
    ct_window = tuple(window) if window is not None else model.window(site)
    used = 0
    if unseen_norm is not None:
        used = model.add_unseen_site(site, unseen_norm, _batches(model, files, batch_size, ct_window))
        if unseen_norm == "adabn" and site in model.unseen and used < 2:
            raise DataError(f"unseen_norm=adabn needs at least 2 readable images in {folder} to estimate site {site}.")
    model.check_site(site)
    note = model.unseen_note(site)
    if note:
        if used:
            note += f", its BatchNorm statistics estimated on {used} image(s) here"
        print(f"site {site} was not seen in training ({', '.join(model.method.sites)}): {note}", file=sys.stderr)
    rows: list[dict[str, Any]] = []
    for start in range(0, len(files), batch_size):
        readable: list[tuple[dict[str, Any], np.ndarray]] = []
        for path in files[start : start + batch_size]:
            row = {"file": path.relative_to(folder).as_posix(), "prob_covid": None, "prediction": None, "error": None}
            if path in patients:
                row["patient"] = patients[path]
            rows.append(row)
            try:
                readable.append((row, model.load(path, ct_window)))
            except DataError as err:
                row["error"] = f"cannot read image: {err.__cause__ or err}"
        if readable:
            probs = model.prob_covid(model.batch([image for _, image in readable]), site)
            for (row, _), prob in zip(readable, probs.tolist()):
                row["prob_covid"] = prob
                row["prediction"] = "COVID" if prob >= threshold else "non-COVID"
    return rows


def along_the_body(files: Sequence[Path]) -> tuple[list[Path], dict[Path, str]]:
    """The files, with each folder's DICOM slices in their series' order (a folder mixing series is refused),
    and each slice's patient (PatientID, else its series folder's name), from one read of the headers."""
    series = {folder: ct_series(folder) for folder in sorted({p.parent for p in files if is_dicom(p)})}
    patients = {s.path: s.patient or folder.name for folder, slices in series.items() for s in slices}
    ordered: list[Path] = []
    for path in files:
        if path.parent in series:
            ordered.extend(s.path for s in series.pop(path.parent))
        elif not is_dicom(path):
            ordered.append(path)
    return ordered, patients


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
                "prediction": None if mean is None else ("COVID" if mean >= threshold else "non-COVID"),
            }
        )
    return summary


def _write_csv(rows: Sequence[dict[str, Any]], columns: Sequence[str], path: Path) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: "" if row[key] is None else row[key] for key in columns})
    atomic_write_text(path, buffer.getvalue())


def _batches(
    model: TrainedModel, files: Sequence[Path], batch_size: int, ct_window: Sequence[float]
) -> Iterator[torch.Tensor]:
    """The readable images of `files` as normalised batches (AdaBN's statistics count every image, however batched)."""
    for start in range(0, len(files), batch_size):
        loaded = []
        for path in files[start : start + batch_size]:
            try:
                loaded.append(model.load(path, ct_window))
            except DataError:
                continue  # listed as unreadable when classified
        if loaded:
            yield model.batch(loaded)


def write_predictions(rows: Sequence[dict[str, Any]], path: Path) -> None:
    _write_csv(rows, CSV_COLUMNS, path)


def patients_file(out: Path) -> Path:
    return out.with_name(f"{out.stem}_patients.csv")


@cli_errors
def main(argv: Sequence[str] | None = None) -> int:
    """0: predictions written; 1: no image could be read; 2: bad arguments, checkpoint or folder."""
    args: PredictArgs = parse_args(PredictArgs, argv, USAGE)
    rows = predict_folder(
        args.ckpt,
        args.images,
        args.site,
        args.batch_size,
        args.device,
        args.threshold,
        args.recursive,
        args.unseen_norm,
        args.window,
    )
    out = Path(args.out)
    write_predictions(rows, out)
    patients = patient_summary(rows, Path(args.images), args.threshold)
    if patients:
        _write_csv(patients, PATIENT_COLUMNS, patients_file(out))
        print(f"{len(patients)} DICOM series summarised per patient in {patients_file(out)}")
    unreadable = [row for row in rows if row["error"]]
    for row in unreadable:
        print(f"unreadable: {row['file']}: {row['error']}", file=sys.stderr)
    classified = len(rows) - len(unreadable)
    print(f"{classified} image(s) classified, {len(unreadable)} unreadable; predictions written to {out}")
    if not classified:
        print(f"error: none of the {len(rows)} image files in {args.images} could be read.", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
