"""DICOM CT input against its definition, on the CT that pydicom ships and on small DICOMs written here."""

from pathlib import Path

import gdcm
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate
from pydicom.uid import (
    MPEG2MPML,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from covidct.data.dicom import ct_series, is_dicom, load_ct_slice, window
from covidct.data.sources import load_image
from covidct.errors import DataError

CT = Path(get_testdata_file("CT_small.dcm"))  # 128 x 128, RescaleSlope 1, RescaleIntercept -1024
MR = Path(get_testdata_file("MR_small.dcm"))


def _ct() -> pydicom.Dataset:
    return pydicom.dcmread(CT)


def test_a_ct_slice_is_rescaled_to_hounsfield_units_and_shown_through_the_lung_window():
    ds = _ct()
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    expected = np.clip(np.rint((hu - (-600 - 750)) / 1500 * 255), 0, 255).astype(np.uint8)
    image = load_ct_slice(CT)
    assert image.shape == (128, 128, 3) and image.dtype == np.uint8
    assert (image == expected[:, :, None]).all()  # grey in every channel
    assert 0 < image.mean() < 255 and len(np.unique(image)) > 50  # not saturated by a wrong rescale
    assert (load_image(CT) == image).all()  # the loader every dataset and predict use reads it the same way


def test_the_window_maps_its_edges_to_0_and_255_and_another_window_shows_other_pixels():
    assert window(np.array([-1350.0, -600.0, 150.0, -2000.0, 900.0]), -600, 1500).tolist() == [0, 128, 255, 0, 255]
    assert not (load_ct_slice(CT, (40, 400)) == load_ct_slice(CT)).all()  # a soft-tissue window


def test_files_without_a_suffix_are_recognised_by_their_dicom_magic(tmp_path: Path):
    plain = tmp_path / "IM0001"
    plain.write_bytes(CT.read_bytes())
    assert is_dicom(plain) and not is_dicom(Path(get_testdata_file("CT_small.dcm")).with_suffix(".txt"))
    assert (load_image(plain) == load_ct_slice(CT)).all()


def test_a_non_ct_modality_is_refused_in_one_line():
    with pytest.raises(DataError, match=r"MR_small.dcm is a MR DICOM, not CT"):
        load_ct_slice(MR)


@pytest.mark.parametrize("tag", ["RescaleSlope", "RescaleIntercept"])
def test_missing_rescale_tags_are_named(tmp_path: Path, tag: str):
    ds = _ct()
    delattr(ds, tag)
    path = tmp_path / "no_rescale.dcm"
    ds.save_as(path)
    with pytest.raises(DataError, match=rf"no_rescale.dcm has no {tag}: .* Hounsfield"):
        load_ct_slice(path)


def compress(path: Path) -> None:
    """Rewrite a slice as JPEG 2000, with a codestream no decoder accepts."""
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + bytes(60)])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)


def transcode(source: Path, target: Path, syntax: str) -> Path:
    """`source` rewritten by GDCM in a gdcm.TransferSyntax (e.g. 'JPEGLosslessProcess14_1': what PACS export,
    and what pydicom cannot write)."""
    reader = gdcm.ImageReader()
    reader.SetFileName(str(source))
    assert reader.Read(), source
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(getattr(gdcm.TransferSyntax, syntax)))
    change.SetInput(reader.GetImage())
    assert change.Change(), syntax
    writer = gdcm.ImageWriter()
    writer.SetFileName(str(target))
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    assert writer.Write(), target
    return target


LOSSLESS = {  # gdcm.TransferSyntax name -> the DICOM transfer syntax it writes
    "JPEGLosslessProcess14_1": JPEGLosslessSV1,
    "JPEGLosslessProcess14": JPEGLossless,
    "JPEGLSLossless": JPEGLSLossless,
    "JPEG2000Lossless": JPEG2000Lossless,
    "RLELossless": RLELossless,
}


@pytest.mark.parametrize("syntax", LOSSLESS)
def test_every_lossless_syntax_pacs_export_reads_as_the_uncompressed_slice(tmp_path: Path, syntax: str):
    path = transcode(CT, tmp_path / "slice", syntax)  # no suffix, as exports are
    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == LOSSLESS[syntax]
    assert is_dicom(path) and (load_image(path) == load_ct_slice(CT)).all()


def test_lossy_jpeg_baseline_reads_close_to_the_original(tmp_path: Path):
    ds = _ct()  # JPEG baseline holds 8 bits: the stored values (0..255 here) with a rescale back to HU
    stored = np.clip(ds.pixel_array.astype(np.int32) // 8, 0, 255).astype(np.uint8)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData, ds.RescaleSlope = stored.tobytes(), 8
    ds.save_as(tmp_path / "eight_bit.dcm", enforce_file_format=True)
    path = transcode(tmp_path / "eight_bit.dcm", tmp_path / "baseline", "JPEGBaselineProcess1")
    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == JPEGBaseline8Bit
    difference = np.abs(load_image(path).astype(int) - load_ct_slice(tmp_path / "eight_bit.dcm").astype(int))
    assert difference.mean() < 2 and difference.max() < 40  # lossy, but the same slice


def test_a_damaged_compressed_slice_is_named_as_damaged(tmp_path: Path):
    path = tmp_path / "compressed.dcm"
    _ct().save_as(path)
    compress(path)
    with pytest.raises(DataError, match=r"compressed.dcm: its JPEG 2000 .*pixel data cannot be decoded .*damaged"):
        load_ct_slice(path)


def test_a_compression_no_decoder_reads_names_it_and_what_to_do(tmp_path: Path):
    ds = _ct()
    ds.file_meta.TransferSyntaxUID = MPEG2MPML
    ds.PixelData = encapsulate([bytes(64)])
    ds["PixelData"].VR = "OB"
    ds.save_as(tmp_path / "video.dcm", enforce_file_format=True)
    with pytest.raises(DataError, match=r"video.dcm: its pixel data is compressed \(MPEG2 .*no installed decoder"):
        load_ct_slice(tmp_path / "video.dcm")


def test_a_ct_dicom_without_pixel_data_is_refused_in_one_line(tmp_path: Path):
    ds = _ct()
    del ds.PixelData
    ds.save_as(tmp_path / "header_only.dcm", enforce_file_format=True)
    with pytest.raises(DataError, match=r"header_only.dcm is a CT DICOM without pixel data .* Move it out"):
        load_ct_slice(tmp_path / "header_only.dcm")


def test_a_file_that_is_not_dicom_is_named(tmp_path: Path):
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(b"not a dicom file at all")
    with pytest.raises(DataError, match=r"cannot read DICOM file .*broken.dcm"):
        load_ct_slice(broken)


def write_series(folder: Path, positions: list[float], series: str | None = None, patient: str = "") -> list[Path]:
    """Slices of one series at the given heights, written in reverse name order to the heights, each slice's
    HU shifted by 150 from the last (so their pixels differ)."""
    folder.mkdir(parents=True, exist_ok=True)
    series = series or generate_uid()
    paths = []
    for k, z in enumerate(positions):
        ds = _ct()
        ds.SeriesInstanceUID = series
        ds.RescaleIntercept = float(ds.RescaleIntercept) + 150 * k
        if patient:
            ds.PatientID = patient
        ds.ImagePositionPatient = [0.0, 0.0, z]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        path = folder / f"slice{len(positions) - k:03d}.dcm"
        ds.save_as(path)
        paths.append(path)
    return paths


def test_a_series_is_ordered_along_the_body_not_by_file_name(tmp_path: Path):
    paths = write_series(tmp_path / "series", [30.0, -10.0, 12.5])
    (tmp_path / "series" / "notes.txt").write_text("not a slice")
    slices = ct_series(tmp_path / "series")
    assert [s.position for s in slices] == [-10.0, 12.5, 30.0]
    assert [s.path for s in slices] == [paths[1], paths[2], paths[0]]
    assert {s.patient for s in slices} == {str(_ct().PatientID)}


def test_a_folder_mixing_series_is_refused_naming_them(tmp_path: Path):
    write_series(tmp_path / "mixed", [0.0, 5.0], series="1.2.3.1")
    extra = _ct()
    extra.SeriesInstanceUID = "1.2.3.2"
    extra.save_as(tmp_path / "mixed" / "other.dcm")
    with pytest.raises(DataError, match=r"mixes 2 series: 1.2.3.1 \(2 files\), 1.2.3.2 \(1 files\)"):
        ct_series(tmp_path / "mixed")


def test_predict_lists_dicom_files_without_a_suffix(tmp_path: Path):
    from covidct.inference.prediction import image_files

    (tmp_path / "IM0001").write_bytes(CT.read_bytes())
    (tmp_path / "1.2.840.10008.5").write_bytes(CT.read_bytes())
    (tmp_path / "notes.txt").write_text("not an image")
    assert [p.name for p in image_files(tmp_path)] == ["1.2.840.10008.5", "IM0001"]
