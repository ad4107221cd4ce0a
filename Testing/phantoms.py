"""Small synthetic multi-context phantoms, for tests only (the science uses ../shared/data).

Everything here is written as real volumes with real geometry (spacing, origin, direction),
so tests exercise the same I/O and resampling paths as real scans:

- :func:`ct_phantom` — a CT-like volume in Hounsfield units: air (-1000) around an elliptic
  body of fat (-100) and soft tissue (~40), a spine (~400) and organ-like ellipsoids with
  organ HU values, Gaussian noise of a few tens of HU; ``int16`` like scanner output.
- :func:`mr_phantom` — an MR-like volume on an arbitrary intensity scale (``scale``) with a
  smooth multiplicative bias field and Rician-like (magnitude) noise; ``float32``.
- :func:`checkerboard_volume`, :func:`noise_volume`, :func:`gradient_volume` — foreign
  volumes for out-of-distribution checks.
- :func:`sphere_phantom` — one bright off-centre sphere and its label: an exact geometric
  reference for round-trip tests.
- :func:`make_msd_dataset` — a Medical Segmentation Decathlon folder (``dataset.json``,
  ``imagesTr/``, ``labelsTr/``) of such phantoms, for the training and evaluation tests.

Sizes are (x, y, z) in voxels and spacings (x, y, z) in mm, as SimpleITK reports them;
arrays are (z, y, x) as ``sitk.GetArrayFromImage`` returns them. Every generator takes a
``seed`` and is deterministic.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk

# Mean intensities of known structures. CT in HU; MR relative to soft tissue (= 1).
CT_HU = {
    "liver": 60.0,
    "spleen": 45.0,
    "kidney": 150.0,
    "left kidney": 150.0,
    "right kidney": 150.0,
    "pancreas": 35.0,
    "aorta": 200.0,
    "tumour": 20.0,
    "lesion": 20.0,
    "bladder": 10.0,
}
MR_RELATIVE = {
    "left ventricle": 2.2,
    "myocardium": 0.6,
    "right ventricle": 2.0,
    "hippocampus": 1.4,
    "anterior": 1.4,
    "posterior": 1.6,
    "prostate": 1.5,
    "tumour": 1.8,
}
CT_NOISE_HU = 15.0

DEFAULT_LABELS = {"CT": ("liver", "spleen"), "MR": ("left ventricle", "myocardium")}


# --- geometry ----------------------------------------------------------------------------
def rotation(angles_deg: Sequence[float] = (20.0, -10.0, 15.0)) -> np.ndarray:
    """A 3×3 rotation matrix from rotations (degrees) about x, then y, then z."""
    ax, ay, az = np.deg2rad(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


#: Direction of a volume stored "RAS-style" (x towards patient right-to-left flipped, y
#: flipped) and slightly oblique: not the identity, with a negative determinant part, so
#: a mistake in reorientation or in mapping back shows up as a displaced structure.
def oblique_lps_direction(angles_deg: Sequence[float] = (12.0, -8.0, 20.0)) -> np.ndarray:
    flip = np.diag([-1.0, -1.0, 1.0])
    return rotation(angles_deg) @ flip


def make_image(
    array_zyx: np.ndarray,
    spacing: Sequence[float] = (4.0, 4.0, 4.0),
    origin: Sequence[float] | None = None,
    direction: np.ndarray | None = None,
) -> sitk.Image:
    """Image from a (z, y, x) array with the given geometry (origin defaults to centring it at 0)."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(array_zyx))
    image.SetSpacing([float(s) for s in spacing])
    d = np.eye(3) if direction is None else np.asarray(direction, dtype=float)
    image.SetDirection(d.ravel().tolist())
    if origin is None:
        size = np.array(image.GetSize(), dtype=float)
        centre_index = (size - 1) / 2.0
        origin = -(d @ (centre_index * np.asarray(spacing, dtype=float)))
    image.SetOrigin([float(o) for o in origin])
    return image


def physical_coordinates(
    size_xyz: Sequence[int], spacing: Sequence[float], origin: Sequence[float], direction: np.ndarray
) -> np.ndarray:
    """Physical (x, y, z) coordinates of every voxel centre, shape (3, z, y, x)."""
    k, j, i = np.meshgrid(*(np.arange(n) for n in size_xyz[::-1]), indexing="ij")
    idx = np.stack([i, j, k]).reshape(3, -1).astype(float) * np.asarray(spacing, dtype=float)[:, None]
    pts = np.asarray(direction, dtype=float) @ idx + np.asarray(origin, dtype=float)[:, None]
    return pts.reshape(3, *size_xyz[::-1])


def _geometry(size, spacing, direction, origin):
    d = np.eye(3) if direction is None else np.asarray(direction, dtype=float)
    if origin is None:
        centre_index = (np.asarray(size, dtype=float) - 1) / 2.0
        origin = -(d @ (centre_index * np.asarray(spacing, dtype=float)))
    return d, np.asarray(origin, dtype=float)


def _centred_coordinates(size, spacing, origin, direction) -> np.ndarray:
    """Voxel-centre coordinates relative to the volume's physical centre (body and organs sit there)."""
    pts = physical_coordinates(size, spacing, origin, direction)
    centre = origin + direction @ ((np.asarray(size, dtype=float) - 1) / 2.0 * np.asarray(spacing, dtype=float))
    return pts - centre[:, None, None, None]


def _ellipsoid(pts: np.ndarray, centre, radii) -> np.ndarray:
    c = np.asarray(centre, dtype=float)[:, None, None, None]
    r = np.asarray(radii, dtype=float)[:, None, None, None]
    return (((pts - c) / r) ** 2).sum(0) <= 1.0


def _structure_layout(n: int, body_r: np.ndarray, half_z: float, rng: np.random.Generator):
    """Centres and radii (mm) of ``n`` non-overlapping organ-like ellipsoids inside the body.

    ``body_r``: the body's (x, y) half-axes; ``half_z``: half the volume's z extent.
    """
    out = []
    ring = 0.45 * min(body_r[0], body_r[1])
    radius = max(0.34 * min(body_r[0], body_r[1]), 6.0) * (1.0 if n <= 3 else 3.0 / n)
    for k in range(n):
        angle = 2 * np.pi * k / max(n, 1) + 0.3 + rng.uniform(-0.15, 0.15)
        centre = np.array([ring * np.cos(angle), ring * np.sin(angle), rng.uniform(-0.1, 0.1) * half_z])
        radii = radius * rng.uniform(0.8, 1.1, size=3)
        radii[2] = min(radii[2] * 1.3, 0.7 * half_z)
        out.append((centre, radii))
    return out


# --- context phantoms ----------------------------------------------------------------------
def _body(size, spacing, seed, direction, origin, width: float):
    """Shared set-up of the body phantoms: rng, geometry, voxel coordinates and an elliptic body
    ``width`` × the half-extent wide (slightly varied by the seed)."""
    rng = np.random.default_rng(seed)
    d, o = _geometry(size, spacing, direction, origin)
    pts = _centred_coordinates(size, spacing, o, d)
    half = np.asarray(size, dtype=float) * np.asarray(spacing, dtype=float) / 2.0
    body_r = np.array([width * half[0], 0.75 * half[1], 10 * half[2]]) * rng.uniform(0.95, 1.05, 3)
    return rng, d, o, pts, half, body_r, _ellipsoid(pts, (0, 0, 0), body_r)


def ct_phantom(
    size: Sequence[int] = (40, 40, 24),
    spacing: Sequence[float] = (4.0, 4.0, 4.0),
    labels: Sequence[str] = DEFAULT_LABELS["CT"],
    seed: int = 0,
    direction: np.ndarray | None = None,
    origin: Sequence[float] | None = None,
    noise_hu: float = CT_NOISE_HU,
) -> tuple[sitk.Image, sitk.Image]:
    """CT-like abdomen: (int16 image in HU, uint8 label with values 1..len(labels))."""
    rng, d, o, pts, half, body_r, body = _body(size, spacing, seed, direction, origin, width=0.9)
    fat_inner = _ellipsoid(pts, (0, 0, 0), body_r * np.array([0.88, 0.85, 1.0]))
    hu = np.full(pts.shape[1:], -1000.0)
    hu[body] = -100.0  # subcutaneous fat
    hu[fat_inner] = 40.0  # soft tissue
    spine = _ellipsoid(pts, (0, -0.5 * body_r[1], 0), (0.12 * half[0], 0.12 * half[1], 10 * half[2]))
    hu[spine] = 400.0
    label = np.zeros(pts.shape[1:], np.uint8)
    for value, (name, (centre, radii)) in enumerate(
        zip(labels, _structure_layout(len(labels), body_r[:2], half[2], rng)), 1
    ):
        mask = _ellipsoid(pts, centre, radii) & fat_inner & ~spine
        hu[mask] = CT_HU.get(name, 40.0 + 25.0 * value)
        label[mask] = value
    hu += rng.normal(0.0, noise_hu, hu.shape)
    image = make_image(np.clip(np.round(hu), -1024, 3071).astype(np.int16), spacing, o, d)
    return image, _like(label, image)


def bias_field(shape_zyx: Sequence[int], rng: np.random.Generator, strength: float = 0.3) -> np.ndarray:
    """A smooth multiplicative field in about [1 - strength, 1 + strength] (low-order polynomial)."""
    axes = [np.linspace(-1, 1, n) for n in shape_zyx]
    z, y, x = np.meshgrid(*axes, indexing="ij")
    c = rng.uniform(-1, 1, size=6)
    field = c[0] * x + c[1] * y + c[2] * z + 0.5 * (c[3] * x * y + c[4] * y * z + c[5] * x * x)
    field = field / max(np.abs(field).max(), 1e-9)
    return 1.0 + strength * field


def mr_phantom(
    size: Sequence[int] = (40, 40, 24),
    spacing: Sequence[float] = (4.0, 4.0, 4.0),
    labels: Sequence[str] = DEFAULT_LABELS["MR"],
    seed: int = 0,
    scale: float = 800.0,
    direction: np.ndarray | None = None,
    origin: Sequence[float] | None = None,
    bias: float = 0.3,
    noise: float = 0.04,
) -> tuple[sitk.Image, sitk.Image]:
    """MR-like volume on an arbitrary scale: (float32 image ≥ 0, uint8 label).

    Soft tissue has mean intensity ``scale``; structures are brighter or darker by the
    factors in :data:`MR_RELATIVE`; a smooth bias field multiplies everything; noise is
    magnitude (Rician-like) noise of ``noise·scale``, so the background is small but positive.
    """
    rng, d, o, pts, half, body_r, body = _body(size, spacing, seed, direction, origin, width=0.8)
    signal = np.zeros(pts.shape[1:])
    signal[body] = 1.0
    label = np.zeros(pts.shape[1:], np.uint8)
    layout = _structure_layout(len(labels), body_r[:2], half[2], rng)
    for value, (name, (centre, radii)) in enumerate(zip(labels, layout), 1):
        mask = _ellipsoid(pts, centre, radii) & body
        signal[mask] = MR_RELATIVE.get(name, 1.0 + 0.4 * value)
        label[mask] = value
    signal *= bias_field(signal.shape, rng, bias)
    sigma = noise
    real = signal + rng.normal(0.0, sigma, signal.shape)
    imag = rng.normal(0.0, sigma, signal.shape)
    magnitude = np.sqrt(real**2 + imag**2) * scale
    image = make_image(magnitude.astype(np.float32), spacing, o, d)
    return image, _like(label, image)


def sphere_phantom(
    size: Sequence[int] = (40, 40, 24),
    spacing: Sequence[float] = (4.0, 4.0, 4.0),
    centre_mm: Sequence[float] = (18.0, -12.0, 8.0),
    radius_mm: float = 28.0,
    direction: np.ndarray | None = None,
    origin: Sequence[float] | None = None,
    inside: float = 1000.0,
    outside: float = 100.0,
    seed: int = 0,
    noise: float = 0.0,
) -> tuple[sitk.Image, sitk.Image]:
    """One bright sphere at a known physical position (off-centre, so flips show): (float32, uint8)."""
    rng = np.random.default_rng(seed)
    d, o = _geometry(size, spacing, direction, origin)
    pts = physical_coordinates(size, spacing, o, d)
    mask = _ellipsoid(pts, centre_mm, (radius_mm,) * 3)
    array = np.where(mask, inside, outside) + rng.normal(0.0, noise, mask.shape)
    image = make_image(array.astype(np.float32), spacing, o, d)
    return image, _like(mask.astype(np.uint8), image)


def _like(array: np.ndarray, reference: sitk.Image) -> sitk.Image:
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    image.CopyInformation(reference)
    return image


# --- foreign volumes (out of distribution) --------------------------------------------------
def checkerboard_volume(
    size: Sequence[int] = (40, 40, 24),
    spacing: Sequence[float] = (4.0, 4.0, 4.0),
    block: int = 4,
    low: float = -1000.0,
    high: float = 1000.0,
    seed: int = 0,
    noise: float = 10.0,
) -> sitk.Image:
    """A 3D checkerboard of ``block``-voxel cubes alternating between ``low`` and ``high``."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*(np.arange(n) // block for n in size[::-1]), indexing="ij")
    array = np.where((x + y + z) % 2 == 0, low, high) + rng.normal(0.0, noise, x.shape)
    return make_image(array.astype(np.float32), spacing)


def noise_volume(
    size: Sequence[int] = (40, 40, 24),
    spacing: Sequence[float] = (4.0, 4.0, 4.0),
    mean: float = 0.0,
    std: float = 500.0,
    seed: int = 0,
) -> sitk.Image:
    """Pure white Gaussian noise."""
    rng = np.random.default_rng(seed)
    return make_image(rng.normal(mean, std, tuple(size[::-1])).astype(np.float32), spacing)


def gradient_volume(
    size: Sequence[int] = (40, 40, 24),
    spacing: Sequence[float] = (4.0, 4.0, 4.0),
    low: float = 0.0,
    high: float = 1000.0,
) -> sitk.Image:
    """A linear ramp along x: no structure at all."""
    z, y, x = np.meshgrid(*(np.arange(n) for n in size[::-1]), indexing="ij")
    array = low + (high - low) * x / max(size[0] - 1, 1)
    return make_image(array.astype(np.float32), spacing)


# --- files ----------------------------------------------------------------------------------
def write(image: sitk.Image, path: str | Path) -> Path:
    """Write any SimpleITK-supported format, chosen by the suffix (.nii.gz, .nrrd, .mha …)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), useCompression=True)
    return path


def make_msd_dataset(
    root: str | Path,
    name: str,
    modality: str = "CT",
    n_cases: int = 4,
    labels: Sequence[str] | None = None,
    *,
    size: Sequence[int] = (40, 40, 24),
    spacing: Sequence[float] = (4.0, 4.0, 4.0),
    seed: int = 0,
    oblique: bool = False,
    scale: float | None = None,
    description: str | None = None,
) -> Path:
    """Write a Medical Segmentation Decathlon-style dataset of phantoms and return its folder.

    Layout: ``root/name/dataset.json``, ``root/name/imagesTr/<name>_NNN.nii.gz`` and
    ``root/name/labelsTr/<name>_NNN.nii.gz`` (same file name in both, same geometry).

    Args:
        root: parent folder (created if needed).
        name: dataset (context) name, e.g. ``"AbdomenPhantomCT"``; also the folder name and
            the case-id prefix.
        modality: ``"CT"`` (HU, int16) or ``"MR"`` (float32, arbitrary scale, bias field).
        n_cases: number of training cases; each differs in noise, body shape, structure
            position/size and, for MR, intensity scale and bias field.
        labels: structure names in label-value order (value 1 = first name …); default
            ``("liver", "spleen")`` for CT and ``("left ventricle", "myocardium")`` for MR.
            Known names get realistic intensities (:data:`CT_HU`, :data:`MR_RELATIVE`);
            others get distinct ones.
        size, spacing: voxels and mm (x, y, z) of every case.
        seed: base seed; case ``i`` uses ``seed + i``.
        oblique: give the cases an oblique, flipped (RAS-stored) direction matrix.
        scale: MR soft-tissue intensity; default varies per case (300–3000).
        description: free text for ``dataset.json``.

    ``dataset.json`` has the MSD keys ``name``, ``description``, ``modality`` (``{"0": modality}``),
    ``labels`` (``{"0": "background", "1": name, …}``), ``numTraining``, ``numTest``,
    ``training`` (``[{"image": "./imagesTr/…", "label": "./labelsTr/…"}]``) and ``test`` (``[]``).
    """
    modality = modality.upper()
    if modality not in ("CT", "MR"):
        raise ValueError(f"modality must be 'CT' or 'MR', not {modality!r}")
    labels = tuple(labels) if labels is not None else DEFAULT_LABELS[modality]
    folder = Path(root) / name
    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(parents=True, exist_ok=True)
    training = []
    for i in range(n_cases):
        case_seed = seed + i
        rng = np.random.default_rng(10_000 + case_seed)
        direction = oblique_lps_direction(rng.uniform(-15, 15, 3)) if oblique else None
        if modality == "CT":
            image, label = ct_phantom(size, spacing, labels, case_seed, direction)
        else:
            s = scale if scale is not None else float(np.exp(rng.uniform(np.log(300), np.log(3000))))
            image, label = mr_phantom(size, spacing, labels, case_seed, s, direction)
        file = f"{name}_{i:03d}.nii.gz"
        write(image, folder / "imagesTr" / file)
        write(label, folder / "labelsTr" / file)
        training.append({"image": f"./imagesTr/{file}", "label": f"./labelsTr/{file}"})
    meta = {
        "name": name,
        "description": description or f"synthetic {modality} phantoms for tests",
        "reference": "Testing/phantoms.py",
        "licence": "CC0 (synthetic)",
        "tensorImageSize": "3D",
        "modality": {"0": modality},
        "labels": {"0": "background", **{str(v): n for v, n in enumerate(labels, 1)}},
        "numTraining": n_cases,
        "numTest": 0,
        "training": training,
        "test": [],
    }
    (folder / "dataset.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return folder


def write_dicom_series(image: sitk.Image, folder: str | Path, modality: str = "CT") -> Path:
    """Write a scalar int16 volume as a DICOM series (one file per slice) readable by GDCM.

    Uses the tags SimpleITK's own series-writing example sets: shared series/study UIDs,
    per-slice Image Position (Patient), Image Orientation (Patient), Instance Number.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    image = sitk.Cast(image, sitk.sitkInt16)
    direction = image.GetDirection()
    uid = "1.2.826.0.1.3680043.2.1125." + "".join(str(b % 10) for b in np.random.default_rng(0).integers(0, 10, 12))
    series_tags = [
        ("0008|0031", "120000"),
        ("0008|0021", "20240101"),
        ("0008|0008", "DERIVED\\SECONDARY"),
        ("0020|000d", uid + ".1"),
        ("0020|000e", uid + ".2"),
        ("0020|0010", "1"),
        ("0010|0010", "Phantom^Test"),
        ("0010|0020", "PHANTOM"),
        ("0008|0060", modality),
        (
            "0020|0037",
            "\\".join(
                f"{v:.9f}" for v in (direction[0], direction[3], direction[6], direction[1], direction[4], direction[7])
            ),
        ),
        ("0008|103e", "MultiTaskSeg test phantom"),
        ("0028|1053", "1"),
        ("0028|1052", "0"),
    ]
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(image.GetDepth()):
        s = image[:, :, k]
        for tag, value in series_tags:
            s.SetMetaData(tag, value)
        s.SetMetaData("0020|0032", "\\".join(f"{v:.6f}" for v in image.TransformIndexToPhysicalPoint((0, 0, k))))
        s.SetMetaData("0020|0013", str(k + 1))
        s.SetMetaData("0018|0050", f"{image.GetSpacing()[2]:.6f}")
        s.SetMetaData("0008|0018", f"{uid}.3.{k + 1}")
        writer.SetFileName(str(folder / f"slice_{k:03d}.dcm"))
        writer.Execute(s)
    return folder


# --- bad inputs (each must be refused with a one-line message) -------------------------------
BAD_INPUTS = ("2d", "4d", "vector", "unreadable", "truncated", "nan", "inf", "constant")


def write_bad_input(kind: str, folder: str | Path, suffix: str = ".nii.gz") -> Path:
    """Write one kind of unsegmentable input (see :data:`BAD_INPUTS`) and return its path.

    ``suffix`` picks the format (.nii.gz, .nii, .nrrd, .mha); "unreadable" ignores the format.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"bad_{kind}{suffix}"
    good, _ = ct_phantom((16, 16, 8), (4.0, 4.0, 4.0), seed=1)
    array = sitk.GetArrayFromImage(good).astype(np.float32)
    if kind == "2d":
        image = sitk.GetImageFromArray(array[4])
        image.SetSpacing((4.0, 4.0))
        write(image, path)
    elif kind == "4d":
        write(sitk.GetImageFromArray(np.stack([array, array + 1, array + 2]), isVector=False), path)  # (t, z, y, x)
    elif kind == "vector":
        image = sitk.GetImageFromArray(np.stack([array, array], axis=-1), isVector=True)
        image.SetSpacing((4.0, 4.0, 4.0))
        write(image, path)
    elif kind == "unreadable":
        path.write_bytes(b"this is not a volume\n" * 20)
    elif kind == "truncated":
        write(good, path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind in ("nan", "inf"):
        array[3, 5:7, 5:7] = np.nan if kind == "nan" else np.inf
        write(_like(array, good), path)
    elif kind == "constant":
        write(_like(np.full_like(array, 40.0), good), path)
    else:
        raise ValueError(f"unknown bad input kind {kind!r}; one of {BAD_INPUTS}")
    return path
