"""Volume I/O: formats, geometry kept exactly, and clear refusals of unsegmentable inputs."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

import phantoms
from MultiTaskSegLib.errors import InputVolumeError
from MultiTaskSegLib.volume_io import (
    array_to_image,
    case_name,
    is_volume_file,
    read_volume,
    validate_volume,
    write_volume,
)

OBLIQUE = phantoms.oblique_lps_direction()
ANISO = (2.5, 3.0, 6.0)


def _assert_same_geometry(a: sitk.Image, b: sitk.Image, tol: float = 1e-5) -> None:
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), rtol=0, atol=tol)
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), rtol=0, atol=1e-4)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), rtol=0, atol=tol)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_round_trip_keeps_voxels_and_oblique_geometry(tmp_path, suffix):
    image, _ = phantoms.ct_phantom((20, 18, 10), ANISO, seed=3, direction=OBLIQUE, origin=(-31.5, 12.25, 140.0))
    path = tmp_path / f"case{suffix}"
    write_volume(image, path)
    assert not list(tmp_path.glob(".*partial*")), "the temporary file of the atomic write was left behind"
    back = read_volume(path)
    _assert_same_geometry(back, image)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(image))


def test_single_time_point_4d_is_read_as_3d(tmp_path):
    image, _ = phantoms.ct_phantom((12, 12, 6), seed=1)
    array = sitk.GetArrayFromImage(image)[None]  # (t=1, z, y, x)
    four = sitk.GetImageFromArray(array, isVector=False)
    path = phantoms.write(four, tmp_path / "t1.nii.gz")
    back = read_volume(path)
    assert back.GetDimension() == 3 and back.GetSize() == image.GetSize()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(image))


EXPECTED_PROBLEM = {
    "2d": "2D",
    "4d": "4D with 3 volumes",
    "vector": "components",
    "unreadable": "cannot read",
    "truncated": "truncated",
    "nan": "NaN/Inf",
    "inf": "NaN/Inf",
    "constant": "empty",
}


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
@pytest.mark.parametrize("kind", phantoms.BAD_INPUTS)
def test_bad_inputs_are_refused_naming_file_and_problem(tmp_path, kind, suffix):
    path = phantoms.write_bad_input(kind, tmp_path, suffix)
    with pytest.raises(InputVolumeError) as info:
        read_volume(path)
    message = str(info.value)
    assert message.startswith(str(path)), message
    assert EXPECTED_PROBLEM[kind] in message, message
    if kind == "4d":  # what to do, not only what is wrong
        assert "extract one volume first" in message, message
    assert "\n" not in message


def test_truncated_nifti_is_not_silently_zero_padded(tmp_path):
    # ITK's NIfTI reader pads a truncated file with zeros without an error; read_volume must not.
    image, _ = phantoms.ct_phantom((16, 16, 8), seed=2)
    for suffix in (".nii", ".nii.gz"):
        path = phantoms.write(image, tmp_path / f"cut{suffix}")
        data = path.read_bytes()
        path.write_bytes(data[:-7])  # only a few bytes missing
        with pytest.raises(InputVolumeError, match="truncated"):
            read_volume(path)


@pytest.mark.parametrize("inflater", ["isal", "zlib"])
def test_nifti_voxels_from_memory_equal_itks_read(tmp_path, inflater, monkeypatch):
    """read_volume inflates a NIfTI once and takes the voxels from memory: the image must be ITK's own
    (type, geometry, voxels), for every scalar type, with ISA-L or with the zlib fallback when isal is
    absent; a corrupt stream is refused. A scaled file (scl_slope) goes through ITK: the fraction-map test."""
    import gzip

    from MultiTaskSegLib import volume_io

    if inflater == "zlib":
        monkeypatch.setattr(volume_io, "_gzip", gzip)
    else:
        pytest.importorskip("isal")
        assert volume_io._gzip is not gzip
    image, _ = phantoms.ct_phantom((20, 18, 10), ANISO, seed=3, direction=OBLIQUE, origin=(-31.5, 12.25, 140.0))
    values = sitk.GetArrayFromImage(image)
    for dtype in (np.uint8, np.int8, np.uint16, np.int16, np.int32, np.float32, np.float64):
        typed = sitk.GetImageFromArray(values.astype(dtype))
        typed.CopyInformation(image)
        for suffix in (".nii", ".nii.gz"):
            path = tmp_path / f"{np.dtype(dtype).name}{suffix}"
            sitk.WriteImage(typed, str(path), useCompression=True)
            back, itk = read_volume(path), sitk.ReadImage(str(path))
            assert back.GetPixelID() == itk.GetPixelID() == typed.GetPixelID()
            assert (back.GetSpacing(), back.GetOrigin(), back.GetDirection()) == (
                itk.GetSpacing(),
                itk.GetOrigin(),
                itk.GetDirection(),
            )
            np.testing.assert_array_equal(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(itk))
    data = bytearray((tmp_path / "int16.nii.gz").read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)  # a damaged block in the middle of the stream
    (tmp_path / "corrupt.nii.gz").write_bytes(bytes(data))
    with pytest.raises(InputVolumeError, match="cannot read"):
        read_volume(tmp_path / "corrupt.nii.gz")


def test_missing_file_and_empty_folder(tmp_path):
    with pytest.raises(InputVolumeError, match="not found"):
        read_volume(tmp_path / "nope.nii.gz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputVolumeError, match="no DICOM series"):
        read_volume(tmp_path / "empty")


def test_single_slice_volume_is_refused():
    image = sitk.GetImageFromArray(np.arange(2 * 3 * 1, dtype=np.float32).reshape(1, 3, 2) + np.zeros((1, 3, 2)))
    with pytest.raises(InputVolumeError, match="single slice"):
        validate_volume(sitk.Cast(image, sitk.sitkFloat32), "x")


def test_dicom_series_folder(tmp_path):
    image, _ = phantoms.ct_phantom((20, 18, 8), (2.0, 2.5, 5.0), seed=4, direction=OBLIQUE)
    folder = phantoms.write_dicom_series(image, tmp_path / "series")
    back = read_volume(folder)
    _assert_same_geometry(back, image, tol=1e-4)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back).astype(np.int16), sitk.GetArrayFromImage(image))


def test_case_names_and_volume_files(tmp_path):
    assert case_name(tmp_path / "ct_01.nii.gz") == "ct_01"
    assert case_name(tmp_path / "A.B.NRRD") == "A.B"
    assert case_name(tmp_path / "x.mha") == "x"
    (tmp_path / "a.nii.gz").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("", encoding="utf-8")
    assert is_volume_file(tmp_path / "a.nii.gz") and not is_volume_file(tmp_path / "notes.txt")


def test_array_to_image_copies_reference_geometry():
    image, _ = phantoms.ct_phantom((10, 9, 8), ANISO, direction=OBLIQUE)
    out = array_to_image(np.zeros((8, 9, 10), np.uint8), image)
    _assert_same_geometry(out, image)


@pytest.mark.parametrize(
    "suffix,member_bytes,deflater",
    [(".nii.gz", None, "isal"), (".nii.gz", 1000, "isal"), (".nii.gz", 1000, "zlib"), (".nii", None, "isal")],
)
def test_fraction_map_is_uint8_with_a_slope_and_reads_back_as_floats(
    tmp_path, suffix, member_bytes, deflater, monkeypatch
):
    """The uncertainty file: uint8 steps, scl_slope 1/255 in the header; readers get [0, 1] floats back,
    also from a file of several gzip members (compressed in parallel), by ISA-L or by zlib when isal is absent."""
    import gzip
    import struct
    import zlib

    from MultiTaskSegLib import volume_io
    from MultiTaskSegLib.volume_io import write_fraction_map

    if member_bytes:
        monkeypatch.setattr(volume_io, "_MEMBER_BYTES", member_bytes)
    if deflater == "zlib":
        monkeypatch.setattr(volume_io, "_deflate", zlib)

    image, _ = phantoms.ct_phantom((20, 18, 10), ANISO, seed=3, direction=OBLIQUE, origin=(-31.5, 12.25, 140.0))
    rng = np.random.default_rng(0)
    values = np.clip(rng.random(sitk.GetArrayViewFromImage(image).shape, dtype=np.float32) * 1.2 - 0.1, 0, 1)
    fraction = array_to_image(values, image)
    path = tmp_path / f"uncertainty{suffix}"
    write_fraction_map(fraction, path)
    assert not list(tmp_path.glob(".*partial*"))
    header = (gzip.open if suffix == ".nii.gz" else open)(path, "rb").read(348)
    (datatype,) = struct.unpack("<h", header[70:72])
    slope, inter = struct.unpack("<2f", header[112:120])
    assert datatype == 2 and abs(slope - 1 / 255) < 1e-9 and inter == 0.0  # NIfTI uint8
    back = read_volume(path)
    _assert_same_geometry(back, image)
    assert back.GetPixelID() == sitk.sitkFloat32
    assert np.abs(sitk.GetArrayFromImage(back) - values).max() <= 1 / 510 + 1e-6
    if member_bytes:  # several members, and Python's gzip reads them as one stream too
        data = path.read_bytes()
        assert data.count(b"\x1f\x8b\x08") >= 3
        assert len(gzip.decompress(data)) == 352 + values.size


def test_implausible_field_of_view_is_refused_before_resampling():
    """50 mm voxels (a spacing in cm or a lost scale) would make a canonical grid of billions of voxels."""
    array = np.random.default_rng(0).normal(size=(10, 64, 64)).astype(np.float32)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((50.0, 50.0, 50.0))
    with pytest.raises(InputVolumeError, match=r"spans 3200 × 3200 × 500 mm.*check the voxel spacing"):
        validate_volume(image, "x")
    image.SetSpacing((1.5, 1.5, 10.0))  # the same array at a real spacing passes
    validate_volume(image, "x")
