"""Reading and writing volumes with SimpleITK, with checks that give clear errors."""

from __future__ import annotations

import gzip
import os
import struct
import types
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .atomic import atomic_path
from .errors import InputVolumeError

_gzip: types.ModuleType = gzip  # the inflater for .nii.gz
_InflateError: type[Exception] = zlib.error
_deflate: types.ModuleType = zlib  # the deflater of the uncertainty file
try:  # ISA-L's: inflates ~2.5× and deflates at level 1 ~4× faster than zlib; zlib where isal is absent
    from isal import igzip as _gzip
    from isal import isal_zlib as _deflate
    from isal.isal_zlib import error as _InflateError  # type: ignore[assignment]
except ImportError:  # (Slicer's Python may lack it)
    pass

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


def is_volume_file(path: Path) -> bool:
    name = path.name.lower()
    return path.is_file() and name.endswith(VOLUME_SUFFIXES)


def case_name(path: Path) -> str:
    """File name without the volume suffix (``ct_01.nii.gz`` → ``ct_01``)."""
    name = path.name
    for suffix in VOLUME_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _is_dicom_folder(path: Path) -> bool:
    return path.is_dir() and bool(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path)))


def read_volume(path: str | os.PathLike) -> sitk.Image:
    """Read a 3D scalar volume (NIfTI, NRRD, MHA or a DICOM series folder) and validate it."""
    path = Path(path)
    if not path.exists():
        raise InputVolumeError(f"{path}: file not found")
    try:
        if path.is_dir():
            series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path))
            if not series:
                raise InputVolumeError(
                    f"{path}: folder holds no volume file (NIfTI, NRRD, MHA) and no DICOM series; "
                    "give a volume file or a folder of DICOM slices"
                )
            reader = sitk.ImageSeriesReader()
            # the largest series is the one a user means when giving a folder
            files = max((reader.GetGDCMSeriesFileNames(str(path), s) for s in series), key=len)
            reader.SetFileNames(files)
            image = reader.Execute()
        elif path.name.lower().endswith((".nii", ".nii.gz")):
            image = _read_nifti(path)
        else:
            image = sitk.ReadImage(str(path))
    except InputVolumeError:
        raise
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        detail = next((line for line in first if "ERROR" in line or "rror" in line), first[-1] if first else "")
        raise InputVolumeError(
            f"{path}: cannot read the file (unreadable or truncated?): {detail.strip()[:200]}"
        ) from None
    validate_volume(image, str(path))
    return squeeze_4d(image)


# NIfTI datatype code → numpy type of the voxels (scalar types only; others go through ITK)
_NIFTI_TYPES = {2: "u1", 4: "i2", 8: "i4", 16: "f4", 64: "f8", 256: "i1", 512: "u2", 768: "u4", 1024: "i8", 1280: "u8"}


def _read_nifti(path: Path) -> sitk.Image:
    """A NIfTI file, inflated once: checked for what ITK's reader would hide (``_nifti_problem``), then
    its voxels taken from the bytes in memory with ITK's geometry (read from the header alone).

    ITK would inflate the file a second time (on a 512×512×300 CT 0.8 s of the 1.9 s a read took);
    scaled (scl_slope), vector or 4-D files and any header ITK reads differently still go through
    ``sitk.ReadImage``.
    """
    try:
        with open(path, "rb") as f:
            compressed = f.read(2) == b"\x1f\x8b"
        with (_gzip.open if compressed else open)(path, "rb") as f:
            data = f.read()
    except (EOFError, OSError, zlib.error, _InflateError) as exc:
        raise InputVolumeError(f"{path}: cannot read the file (truncated or corrupt: {exc})") from None
    header = _nifti_header(data)
    problem = _nifti_problem(data, header) if header else None
    if problem:
        raise InputVolumeError(f"{path}: {problem}")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    if header is None or header["datatype"] is None:
        return reader.Execute()
    dtype = np.dtype(header["order"] + _NIFTI_TYPES[header["datatype"]])
    plain = (
        header["ndim"] == 3
        and header["slope"] in (0.0, 1.0)  # 0: no scaling (NIfTI rule)
        and header["inter"] == 0.0
        and reader.GetDimension() == 3
        and reader.GetNumberOfComponents() == 1
        and reader.GetSize() == tuple(header["dims"][1:4])
    )
    if not plain:
        return reader.Execute()
    size = reader.GetSize()
    voxels = np.frombuffer(data, dtype, int(np.prod(size)), header["start"]).reshape(size[::-1])
    image = sitk.GetImageFromArray(voxels.astype(dtype.newbyteorder("="), copy=False))
    if image.GetPixelID() != reader.GetPixelID():  # ITK maps this type differently: let it read the file
        return reader.Execute()
    image.SetSpacing(reader.GetSpacing())
    image.SetOrigin(reader.GetOrigin())
    image.SetDirection(reader.GetDirection())
    return image


def _nifti_header(data: bytes) -> dict | None:
    """The fields of a NIfTI-1/2 header the checks and the reader need; None if ``data`` is no NIfTI."""
    head = data[:540]
    if len(head) < 348:
        return None  # not a NIfTI header; let ITK report what it is
    for order in "<>":
        size = struct.unpack(order + "i", head[:4])[0]
        if size in (348, 540):
            break
    else:
        return None
    if size == 348:
        dims = struct.unpack(order + "8h", head[40:56])
        datatype, bitpix = struct.unpack(order + "2h", head[70:74])
        offset = int(struct.unpack(order + "f", head[108:112])[0])
        slope, inter = struct.unpack(order + "2f", head[112:120])
    else:
        if len(head) < 540:
            return None
        datatype, bitpix = struct.unpack(order + "2h", head[12:16])
        dims = struct.unpack(order + "8q", head[16:80])
        offset = int(struct.unpack(order + "q", head[168:176])[0])
        slope, inter = struct.unpack(order + "2d", head[176:192])
    ndim = dims[0]
    if not 1 <= ndim <= 7 or bitpix <= 0:
        return None
    start = max(offset, 352 if size == 348 else 544)
    return {
        "order": order,
        "ndim": ndim,
        "dims": dims,
        "datatype": datatype if datatype in _NIFTI_TYPES else None,
        "slope": slope,
        "inter": inter,
        "start": start,
        "end": start + int(np.prod(dims[1 : ndim + 1], dtype=np.int64)) * bitpix // 8,
    }


def _nifti_problem(data: bytes, header: dict) -> str | None:
    """What ITK's NIfTI reader would hide: a truncated file (it pads with zeros) or NaN/Inf voxels
    (it turns them into 0). None when the file is complete and finite."""
    if len(data) < header["end"]:
        return f"the file is truncated ({len(data)} of {header['end']} bytes); re-export or re-download it"
    if header["datatype"] in (16, 64):
        dtype = np.dtype(header["order"] + _NIFTI_TYPES[header["datatype"]])
        values = np.frombuffer(data, dtype, (header["end"] - header["start"]) // dtype.itemsize, header["start"])
        step = 1 << 22  # chunks: no full-size boolean temporary
        bad = sum(int((~np.isfinite(values[i : i + step])).sum()) for i in range(0, values.size, step))
        if bad:
            return f"image has {bad} NaN/Inf voxels; replace them (e.g. with the background value) first"
    return None


MAX_EXTENT_MM = 3000.0  # a whole-body CT is about 2 m long: anything larger has a wrong spacing


def validate_volume(image: sitk.Image, name: str = "input") -> None:
    """Refuse images that cannot be segmented, with a message naming the problem."""
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputVolumeError(
            f"{name}: image has {image.GetNumberOfComponentsPerPixel()} components per voxel; "
            "a single-channel (scalar) volume is needed — extract one channel first"
        )
    dim = image.GetDimension()
    size = image.GetSize()
    if dim == 4 and size[3] == 1:
        pass  # a 4D file with one time point is a 3D volume in disguise; handled by squeeze_4d
    elif dim == 4:  # a series (cine frames, diffusion directions …): which volume to segment is the user's call
        raise InputVolumeError(
            f"{name}: image is 4D with {size[3]} volumes (size {size}); a 3D volume is needed — "
            "extract one volume first (e.g. a cine MR's end-diastolic frame)"
        )
    elif dim != 3:
        raise InputVolumeError(f"{name}: image is {dim}D (size {size}); a 3D volume is needed")
    if min(size[:3]) < 2:
        raise InputVolumeError(
            f"{name}: image size {size[:3]} is a single slice; a 3D volume with several slices is needed"
        )
    if np.prod(size) == 0:
        raise InputVolumeError(f"{name}: image is empty (size {size})")
    extent = [n * s for n, s in zip(size[:3], image.GetSpacing()[:3])]
    if max(extent) > MAX_EXTENT_MM:
        # A wrong spacing (metres or cm written as mm, a scale lost in conversion) would otherwise
        # build a resampling grid of billions of voxels and end in an out-of-memory error.
        raise InputVolumeError(
            f"{name}: image spans {' × '.join(f'{e:.0f}' for e in extent)} mm (size {size[:3]}, spacing "
            f"{tuple(round(s, 4) for s in image.GetSpacing()[:3])} mm); no patient scan is larger than "
            f"{MAX_EXTENT_MM:.0f} mm along an axis — check the voxel spacing in the file's header (is it in mm?)"
        )
    array = sitk.GetArrayViewFromImage(image)
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        bad = int((~np.isfinite(array)).sum())
        raise InputVolumeError(
            f"{name}: image has {bad} NaN/Inf voxels; replace them (e.g. with the background value) first"
        )
    if array.min() == array.max():
        raise InputVolumeError(f"{name}: image is empty (every voxel is {array.flat[0]}); nothing to segment")


def squeeze_4d(image: sitk.Image) -> sitk.Image:
    if image.GetDimension() == 4:
        size = list(image.GetSize())
        size[3] = 0
        return sitk.Extract(image, size, [0, 0, 0, 0])
    return image


def write_volume(image: sitk.Image, path: str | os.PathLike) -> None:
    """Write atomically (temporary file then rename) so an interrupted run leaves no half file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    with atomic_path(path, suffix) as tmp:  # ITK picks the format by the extension
        sitk.WriteImage(image, str(tmp), useCompression=True)


FRACTION_STEPS = 255  # a [0, 1] map on disk: uint8 k means k / 255 (scl_slope), error at most 1/510


def write_fraction_map(image: sitk.Image, path: str | os.PathLike, level: int = 1) -> None:
    """A float map with values in [0, 1] (the uncertainty) written as uint8 NIfTI with scl_slope 1/255.

    Every NIfTI reader (ITK and so Slicer, nibabel) applies the slope and gets floats in [0, 1] back,
    within 1/510 (+ float rounding) of the values in memory; the file is a quarter of float32 and gzip ``level`` 1
    compresses it several times faster than ITK's default. Other formats are written as float32.
    """
    path = Path(path)
    if not path.name.lower().endswith((".nii", ".nii.gz")):
        write_volume(image, path)
        return
    values = sitk.GetArrayViewFromImage(image)
    steps = np.empty(values.shape, np.uint8)
    flat, out = values.reshape(-1), steps.reshape(-1)
    chunk = np.empty(min(flat.size, 1 << 22), np.float32)  # no full-size float temporary
    for i in range(0, flat.size, chunk.size):
        part = chunk[: min(chunk.size, flat.size - i)]
        np.clip(flat[i : i + part.size], 0.0, 1.0, out=part)
        part *= FRACTION_STEPS
        np.rint(part, out=part)
        out[i : i + part.size] = part
    quantised = sitk.GetImageFromArray(steps)
    quantised.CopyInformation(image)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.name.lower().endswith(".gz"):
        with atomic_path(path, ".nii") as tmp:
            _write_scaled_nifti(quantised, tmp)
        return
    raw = path.with_name(f".{path.name}.{os.getpid()}.raw.nii")
    try:
        _write_scaled_nifti(quantised, raw)
        data = memoryview(raw.read_bytes())
        with atomic_path(path) as tmp, open(tmp, "wb") as dst:
            for member in _gzip_members(data, level):
                dst.write(member)
    finally:
        raw.unlink(missing_ok=True)


_MEMBER_BYTES = 16 << 20


def _gzip_members(data: memoryview, level: int) -> list[bytes]:
    """``data`` as consecutive gzip members of 16 MB, compressed on all cores (zlib and ISA-L release the GIL).

    A gzip file may hold several members; every reader (zlib's gzread in ITK and so Slicer,
    Python's gzip in nibabel) reads them as one stream. ISA-L deflates levels 0–3 (its level 1 on
    the CT's uncertainty: 0.27 s instead of 1.2 s, a 6 % larger file); higher levels are zlib's.
    """
    chunks = [data[i : i + _MEMBER_BYTES] for i in range(0, len(data), _MEMBER_BYTES)] or [data]
    deflate = _deflate if level <= 3 else zlib

    def member(chunk: memoryview) -> bytes:
        z = deflate.compressobj(level, zlib.DEFLATED, 31)  # wbits 31: a gzip header and trailer
        return z.compress(chunk) + z.flush()

    with ThreadPoolExecutor(min(len(chunks), os.cpu_count() or 1)) as pool:
        return list(pool.map(member, chunks))


def _write_scaled_nifti(steps: sitk.Image, path: Path) -> None:
    """Uncompressed NIfTI of the uint8 steps with scl_slope 1/255 (ITK writes the geometry)."""
    sitk.WriteImage(steps, str(path), useCompression=False)
    with open(path, "r+b") as f:
        order = "<" if struct.unpack("<i", f.read(4))[0] == 348 else ">"
        f.seek(112)  # scl_slope, scl_inter, then (after slice_end/code, xyzt_units) cal_max, cal_min
        f.write(struct.pack(order + "2f", 1.0 / FRACTION_STEPS, 0.0))
        f.seek(124)
        f.write(struct.pack(order + "2f", 1.0, 0.0))


def array_to_image(array: np.ndarray, reference: sitk.Image) -> sitk.Image:
    """Array (z, y, x) → image carrying the reference geometry."""
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(reference)
    return image
