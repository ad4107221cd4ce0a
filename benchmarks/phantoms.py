"""Synthetic volumes of realistic sizes for `mtseg bench` (timing only; the science uses real data).

Generated slice by slice so that a 512×512×300 CT needs no more memory than its own int16
array: a CT body phantom in Hounsfield units (air outside an elliptic body of fat and soft
tissue, lungs in the upper slices, spine, aorta, liver, spleen and kidneys, scanner noise) and
an MR head-like phantom (skull, grey/white matter, ventricles, a bias field, magnitude noise).
Sizes are (x, y, z) voxels, spacings (x, y, z) mm, as SimpleITK reports them.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import SimpleITK as sitk


def _plane(size_xy: Sequence[int], spacing_xy: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """In-plane physical coordinates (mm) centred on the volume: X (cols), Y (rows) of shape (ny, nx)."""
    nx, ny = size_xy
    x = (np.arange(nx, dtype=np.float32) - (nx - 1) / 2) * spacing_xy[0]
    y = (np.arange(ny, dtype=np.float32) - (ny - 1) / 2) * spacing_xy[1]
    return np.meshgrid(x, y)


def _image(array_zyx: np.ndarray, spacing: Sequence[float]) -> sitk.Image:
    image = sitk.GetImageFromArray(array_zyx)
    image.SetSpacing([float(s) for s in spacing])
    size = np.array(image.GetSize())
    image.SetOrigin((-(size - 1) / 2 * np.array(spacing)).tolist())
    return image


def ct_phantom(
    size: Sequence[int] = (512, 512, 300), spacing: Sequence[float] = (0.7, 0.7, 1.0), seed: int = 0
) -> sitk.Image:
    """An abdomen/thorax CT in HU (int16), air (-1000) around an elliptic body."""
    rng = np.random.default_rng(seed)
    nx, ny, nz = (int(s) for s in size)
    X, Y = _plane((nx, ny), spacing[:2])
    half_x, half_y = nx * spacing[0] / 2, ny * spacing[1] / 2
    body = (0.92 * half_x, 0.62 * half_y)  # lateral, antero-posterior semi-axes (mm)
    z_mm = (np.arange(nz) - (nz - 1) / 2) * spacing[2]
    half_z = max(nz * spacing[2] / 2, 1.0)
    # organs: (HU, centre x, centre y, centre z as a fraction of half_z, radii x, y, z as fractions of body)
    organs = [
        (60, -0.35, 0.05, 0.0, 0.40, 0.50, 0.35),  # liver (patient's right = image left)
        (45, 0.45, 0.15, 0.05, 0.16, 0.28, 0.20),  # spleen
        (150, -0.32, 0.45, -0.25, 0.10, 0.18, 0.18),  # right kidney
        (150, 0.32, 0.45, -0.25, 0.10, 0.18, 0.18),  # left kidney
        (35, 0.05, 0.10, -0.10, 0.20, 0.10, 0.10),
    ]  # pancreas
    out = np.empty((nz, ny, nx), dtype=np.int16)
    fat_shell = (X / body[0]) ** 2 + (Y / body[1]) ** 2
    spine = ((X / (0.09 * body[0])) ** 2 + ((Y - 0.62 * body[1]) / (0.14 * body[1])) ** 2) < 1
    aorta = ((X - 0.05 * body[0]) ** 2 + (Y - 0.35 * body[1]) ** 2) < (0.06 * body[0]) ** 2
    for k in range(nz):
        zf = z_mm[k] / half_z  # -1 (feet) … 1 (head)
        s = np.full((ny, nx), -1000.0, np.float32)
        s[fat_shell < 1.0] = -100.0
        s[fat_shell < 0.82] = 40.0
        if zf > 0.45:  # lungs in the upper part
            for side in (-1, 1):
                lung = ((X - side * 0.45 * body[0]) / (0.33 * body[0])) ** 2 + (
                    (Y + 0.05 * body[1]) / (0.6 * body[1])
                ) ** 2
                s[lung < 1] = -850.0
        for hu, cx, cy, cz, rx, ry, rz in organs:
            dz = (zf - cz) / rz
            if abs(dz) >= 1:
                continue
            e = ((X - cx * body[0]) / (rx * body[0])) ** 2 + ((Y - cy * body[1]) / (ry * body[1])) ** 2
            s[e < 1 - dz * dz] = hu
        s[aorta] = 200.0
        s[spine] = 450.0
        s += rng.standard_normal((ny, nx), dtype=np.float32) * 15.0
        out[k] = np.clip(s, -1024, 3071)
    return _image(out, spacing)


def mr_phantom(
    size: Sequence[int] = (128, 128, 128), spacing: Sequence[float] = (1.5, 1.5, 1.5), seed: int = 0
) -> sitk.Image:
    """A head-like T1 MR (int16, arbitrary scale) with bias field and magnitude noise."""
    rng = np.random.default_rng(seed)
    nx, ny, nz = (int(s) for s in size)
    X, Y = _plane((nx, ny), spacing[:2])
    half = np.array([nx * spacing[0], ny * spacing[1], nz * spacing[2]]) / 2
    head = 0.85 * half
    z_mm = (np.arange(nz) - (nz - 1) / 2) * spacing[2]
    bias_xy = 1.0 + 0.15 * (X / half[0]) - 0.1 * (Y / half[1])
    out = np.empty((nz, ny, nx), dtype=np.int16)
    for k in range(nz):
        dz = (z_mm[k] / head[2]) ** 2
        r = (X / head[0]) ** 2 + (Y / head[1]) ** 2 + dz
        s = np.zeros((ny, nx), np.float32)
        s[r < 1.0] = 0.9  # scalp / skull marrow
        s[r < 0.88] = 0.15  # skull
        s[r < 0.80] = 0.7  # grey matter
        s[r < 0.55] = 1.0  # white matter
        vent = ((X / (0.12 * head[0])) ** 2 + ((Y + 0.05 * head[1]) / (0.3 * head[1])) ** 2 + dz / 0.09) < 1
        s[vent] = 0.25
        s *= bias_xy * (1.0 + 0.1 * z_mm[k] / half[2])
        noise = 0.03
        re = s + rng.standard_normal((ny, nx), dtype=np.float32) * noise
        im = rng.standard_normal((ny, nx), dtype=np.float32) * noise
        out[k] = np.sqrt(re * re + im * im) * 1000.0
    return _image(out, spacing)


def training_cases(preprocessing) -> list:
    """Two preprocessed phantom cases (CT, MR) labelled above their 70th percentile: what the training
    throughput benchmarks sample patches from."""
    from MultiTaskSegLib.preprocessing import preprocess
    from MultiTaskSegTraining.data import CachedCase

    cases = []
    for i, (make, size) in enumerate([(ct_phantom, (192, 192, 120)), (mr_phantom, (128, 128, 96))]):
        pre = preprocess(make(size, (1.5, 1.5, 1.5), seed=i), preprocessing)
        label = (pre.array > np.percentile(pre.array, 70)).astype(np.uint8)
        shape_mm = tuple(np.array(pre.array.shape) * 2.0)
        cases.append(CachedCase(i, f"phantom{i}", pre.array.astype(np.float16), label, shape_mm))
    return cases
