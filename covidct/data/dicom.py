"""CT slices from DICOM, as hospitals store them: read with pydicom, converted to Hounsfield units with the
file's rescale tags and windowed to 8 bits, so the rest of the pipeline sees them like any PNG slice.

Written by hand where pydicom stops: it decodes pixels and applies the rescale, but which window, which
modality is acceptable, how slices order and which files form one series are choices of this project.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.pixels import get_decoder

from covidct.errors import DataError

DICOM_SUFFIX = ".dcm"
DICOMDIR = "DICOMDIR"  # the name DICOM media give their directory file
LUNG_WINDOW = (-600.0, 1500.0)  # (centre, width) in HU: lung parenchyma, vessels and ground-glass stay apart
_PREAMBLE = 128  # bytes before the "DICM" magic of a DICOM file


def is_dicom(path: Path) -> bool:
    """A .dcm file, or any file with DICOM's magic (hospital exports often have no suffix at all)."""
    path = Path(path)
    if path.name.upper() == DICOMDIR:  # the export's index of its files, no image
        return False
    if path.suffix.lower() == DICOM_SUFFIX:
        return True
    try:
        with path.open("rb") as fh:
            fh.seek(_PREAMBLE)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def _read(path: Path, pixels: bool) -> pydicom.Dataset:
    try:
        return pydicom.dcmread(path, stop_before_pixels=not pixels)
    except (InvalidDicomError, OSError, ValueError, EOFError) as err:
        raise DataError(f"cannot read DICOM file {path}: {err}. Replace the file or remove it.") from None


def _check_ct(ds: pydicom.Dataset, path: Path) -> None:
    modality = ds.get("Modality", "")
    if modality != "CT":
        raise DataError(
            f"{path} is a {modality or 'modality-less'} DICOM, not CT: only CT series can be read (move it out "
            "of the data)."
        )


def hounsfield(ds: pydicom.Dataset, path: Path) -> np.ndarray:
    """The slice in Hounsfield units: stored values x RescaleSlope + RescaleIntercept."""
    missing = [tag for tag in ("RescaleSlope", "RescaleIntercept") if tag not in ds]
    if missing:
        raise DataError(
            f"{path} has no {' or '.join(missing)}: its pixels cannot be converted to Hounsfield units. Export the "
            "series again with its rescale tags."
        )
    if not any(tag in ds for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise DataError(
            f"{path} is a CT DICOM without pixel data (a dose report, a header-only or truncated file): it holds no "
            "slice to classify. Move it out of the series."
        )
    try:
        stored = ds.pixel_array
    except (NotImplementedError, RuntimeError, ValueError, AttributeError) as err:
        raise DataError(_undecodable(ds, path, err)) from None
    if stored.ndim != 2:
        raise DataError(
            f"{path} holds {stored.shape[0]} frames; split multi-frame files into one file per slice first."
        )
    return stored.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def _undecodable(ds: pydicom.Dataset, path: Path, err: Exception) -> str:
    """Why a slice's pixels cannot be decoded, and what to do: no decoder for its compression, or a damaged file."""
    syntax = ds.file_meta.get("TransferSyntaxUID")
    name = getattr(syntax, "name", syntax)
    if syntax is None or not syntax.is_compressed:
        return f"cannot decode the pixels of {path} ({err}); the file is damaged: export it again."
    try:
        decodable = get_decoder(syntax).is_available
    except NotImplementedError:  # pydicom has no decoder at all for it (e.g. the MPEG video syntaxes)
        decodable = False
    if not decodable:
        return (
            f"{path}: its pixel data is compressed ({name}) and no installed decoder reads it. Decompress the series "
            "(e.g. gdcmconv --raw, or dcmdjpeg from DCMTK), or install a decoder pydicom supports for it."
        )
    reason = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
    return f"{path}: its {name} pixel data cannot be decoded ({reason}); the file is damaged: export it again."


def window(hu: np.ndarray, centre: float, width: float) -> np.ndarray:
    """Hounsfield units to 8 bits: [centre - width/2, centre + width/2] spread linearly over 0..255."""
    if width <= 0:
        raise DataError(f"a window's width must be positive, got {width}.")
    low = centre - width / 2
    return np.clip(np.rint((hu - low) / width * 255.0), 0, 255).astype(np.uint8)


def load_ct_slice(path: Path, lung_window: Sequence[float] = LUNG_WINDOW) -> np.ndarray:
    """One CT slice as HxWx3 uint8 (grey in every channel), as load_image returns any image."""
    path = Path(path)
    ds = _read(path, pixels=True)
    _check_ct(ds, path)
    grey = window(hounsfield(ds, path), *lung_window)
    return np.repeat(grey[:, :, None], 3, axis=2)


@dataclass(frozen=True)
class CtSlice:
    """A slice's file and where it sits: its series, its patient (PatientID, and PatientName: what an export may
    name the patient's folder by, so outputs can hide both), and its position along the slice normal."""

    path: Path
    series: str
    patient: str
    position: float
    patient_name: str = ""


def _position(ds: pydicom.Dataset, path: Path) -> float:
    """Distance along the slice normal (ImagePositionPatient . normal of ImageOrientationPatient), else
    SliceLocation, else InstanceNumber: file names do not order slices."""
    if "ImagePositionPatient" in ds and "ImageOrientationPatient" in ds:
        orientation = np.asarray(ds.ImageOrientationPatient, float)
        normal = np.cross(orientation[:3], orientation[3:])
        return float(np.dot(np.asarray(ds.ImagePositionPatient, float), normal))
    for tag in ("SliceLocation", "InstanceNumber"):
        if tag in ds:
            return float(ds.get(tag))
    raise DataError(
        f"{path} has no ImagePositionPatient, SliceLocation or InstanceNumber: its place in the series is unknown."
    )


def ct_series(folder: Path) -> list[CtSlice]:
    """The CT slices of one series folder, ordered along the body; a folder mixing series is refused."""
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and is_dicom(p))
    if not files:
        raise DataError(f"{folder} holds no DICOM files.")
    slices = []
    for path in files:
        ds = _read(path, pixels=False)
        _check_ct(ds, path)
        series = str(ds.get("SeriesInstanceUID", ""))
        patient, name = str(ds.get("PatientID", "")), str(ds.get("PatientName", ""))
        slices.append(CtSlice(path, series, patient, _position(ds, path), name))
    found = sorted({s.series for s in slices})
    if len(found) > 1:
        counts = ", ".join(f"{uid} ({sum(s.series == uid for s in slices)} files)" for uid in found)
        raise DataError(f"{folder} mixes {len(found)} series: {counts}. Put each series in a folder of its own.")
    return sorted(slices, key=lambda s: (s.position, s.path.name))
