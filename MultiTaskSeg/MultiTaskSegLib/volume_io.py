"""Reading and writing volumes with SimpleITK, with checks that give clear errors."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import InputVolumeError

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
                raise InputVolumeError(f"{path}: folder holds no DICOM series")
            reader = sitk.ImageSeriesReader()
            # the largest series is the one a user means when giving a folder
            files = max((reader.GetGDCMSeriesFileNames(str(path), s) for s in series), key=len)
            reader.SetFileNames(files)
            image = reader.Execute()
        else:
            image = sitk.ReadImage(str(path))
    except InputVolumeError:
        raise
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        detail = next((line for line in first if "ERROR" in line or "rror" in line), first[-1] if first else "")
        raise InputVolumeError(f"{path}: cannot read the file (unreadable or truncated?): {detail.strip()[:200]}") from None
    validate_volume(image, str(path))
    return squeeze_4d(image)


def validate_volume(image: sitk.Image, name: str = "input") -> None:
    """Refuse images that cannot be segmented, with a message naming the problem."""
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputVolumeError(
            f"{name}: image has {image.GetNumberOfComponentsPerPixel()} components per voxel; "
            "a single-channel (scalar) volume is needed — extract one channel first")
    dim = image.GetDimension()
    size = image.GetSize()
    if dim == 4 and size[3] == 1:
        pass  # a 4D file with one time point is a 3D volume in disguise; handled by squeeze_4d
    elif dim != 3:
        raise InputVolumeError(f"{name}: image is {dim}D (size {size}); a 3D volume is needed")
    if min(size[:3]) < 2:
        raise InputVolumeError(f"{name}: image size {size[:3]} is a single slice; a 3D volume with several slices is needed")
    if np.prod(size) == 0:
        raise InputVolumeError(f"{name}: image is empty (size {size})")
    array = sitk.GetArrayViewFromImage(image)
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        bad = int((~np.isfinite(array)).sum())
        raise InputVolumeError(f"{name}: image has {bad} NaN/Inf voxels; replace them (e.g. with the background value) first")
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
    tmp = path.with_name(f".{path.name}.partial{suffix}")
    sitk.WriteImage(image, str(tmp), useCompression=True)
    os.replace(tmp, path)


def array_to_image(array: np.ndarray, reference: sitk.Image) -> sitk.Image:
    """Array (z, y, x) → image carrying the reference geometry."""
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(reference)
    return image
