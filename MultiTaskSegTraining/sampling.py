"""Patch sampling across datasets with foreground oversampling, and 3D augmentation in torch."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .data import CachedCase


def dataset_weights(n_cases: list[int], scheme: str = "sqrt") -> np.ndarray:
    """Probability of drawing each dataset: ``sqrt`` (default), ``proportional`` or ``uniform``."""
    n = np.asarray(n_cases, dtype=float)
    w = {"sqrt": np.sqrt(n), "proportional": n, "uniform": np.ones_like(n)}.get(scheme)
    if w is None:
        raise ValueError(f"unknown sampling scheme {scheme!r}")
    return w / w.sum()


class PatchSampler:
    """Draws (image, label, dataset) patches: a dataset by ``scheme``, a case, then a location.

    With probability ``foreground_fraction`` the patch is centred (with jitter) on a foreground voxel.
    ``foreground_mode="per_structure"`` first picks one of the case's structures uniformly, as nnU-Net
    does, so a small structure (the right ventricle beside the larger myocardium and left ventricle)
    is seen as often as a large one; ``"any"`` picks among all foreground voxels.
    """

    def __init__(
        self,
        cases: list[CachedCase],
        n_datasets: int,
        patch: tuple[int, int, int],
        scheme: str = "sqrt",
        foreground_fraction: float = 0.5,
        seed: int = 0,
        foreground_mode: str = "per_structure",
    ):
        if foreground_mode not in ("per_structure", "any"):
            raise ValueError(f"foreground_mode must be 'per_structure' or 'any', not {foreground_mode!r}")
        self.patch = patch
        self.fg = foreground_fraction
        self.by_dataset = [[c for c in cases if c.dataset == d] for d in range(n_datasets)]
        sizes = [len(c) for c in self.by_dataset]
        self.weights = dataset_weights([s for s in sizes], scheme)
        self.weights[np.array(sizes) == 0] = 0
        self.weights /= self.weights.sum()
        self.rng = np.random.default_rng(seed)
        # foreground voxel coordinates per case (and structure), subsampled to keep memory small
        self.fg_coords = {id(c): _foreground_coords(c.label, foreground_mode) for c in cases}

    def _crop(self, array: np.ndarray, start: np.ndarray) -> np.ndarray:
        pads = [(max(0, -s), max(0, s + p - n)) for s, p, n in zip(start, self.patch, array.shape)]
        sl = tuple(slice(max(0, s), min(n, s + p)) for s, p, n in zip(start, self.patch, array.shape))
        out = array[sl]
        if any(a or b for a, b in pads):
            out = np.pad(out, pads, mode="constant")
        return out

    def sample(self) -> tuple[np.ndarray, np.ndarray, int]:
        d = int(self.rng.choice(len(self.weights), p=self.weights))
        case = self.by_dataset[d][int(self.rng.integers(len(self.by_dataset[d])))]
        shape = np.array(case.image.shape)
        patch = np.array(self.patch)
        per_structure = self.fg_coords[id(case)]
        coords = per_structure[int(self.rng.integers(len(per_structure)))] if per_structure else np.empty((0, 3))
        if len(coords) and self.rng.random() < self.fg:
            centre = coords[int(self.rng.integers(len(coords)))]
            start = centre - patch // 2 + self.rng.integers(-patch // 4, patch // 4 + 1)
        else:
            high = np.maximum(shape - patch, 0)
            start = np.array([int(self.rng.integers(h + 1)) for h in high])
            start -= np.maximum(patch - shape, 0) // 2  # centre small volumes in the patch
        return self._crop(case.image, start), self._crop(case.label, start), d

    def batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        items = [self.sample() for _ in range(size)]
        x = torch.from_numpy(np.stack([i[0] for i in items]).astype(np.float32))[:, None]
        y = torch.from_numpy(np.stack([i[1] for i in items]))
        return x, y, [i[2] for i in items]


def _foreground_coords(label: np.ndarray, mode: str, per_group: int = 20000) -> list[np.ndarray]:
    """Foreground coordinates grouped by structure (one group of all foreground for ``mode="any"``)."""
    groups = [label > 0] if mode == "any" else [label == v for v in np.unique(label) if v > 0]
    out = []
    for mask in groups:
        n = int(mask.sum())
        if n:
            out.append(np.argwhere(mask)[:: max(1, n // per_group)])
    return out


def augment(
    x: torch.Tensor, y: torch.Tensor, rng: np.random.Generator, p: float = 0.8, artefacts: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotation/scaling, intensity (gamma, contrast, brightness), noise and low-resolution simulation;
    with ``artefacts`` also a smooth bias field, Gaussian blur and up to twice the noise (``artefact``).

    No mirroring: left and right structures (kidneys) are different labels.
    """
    b = x.shape[0]
    out_x, out_y = [], []
    for i in range(b):
        xi, yi = x[i : i + 1], y[i : i + 1, None].float()
        if rng.random() < p:
            angles = rng.uniform(-0.26, 0.26, 3)  # ±15°
            scale = rng.uniform(0.85, 1.2)
            theta = torch.from_numpy(_affine(angles, scale)).float()[None]
            grid = F.affine_grid(theta, xi.shape, align_corners=False)
            xi = F.grid_sample(xi, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
            yi = F.grid_sample(yi, grid, mode="nearest", padding_mode="zeros", align_corners=False)
        if rng.random() < 0.3:  # low resolution / thick slices
            factor = rng.uniform(1.0, 2.0)
            small = [max(4, int(s / factor)) for s in xi.shape[2:]]
            xi = F.interpolate(F.interpolate(xi, size=small, mode="trilinear"), size=xi.shape[2:], mode="trilinear")
        if rng.random() < 0.5:
            lo, hi = xi.min(), xi.max()
            rngv = (hi - lo).clamp_min(1e-6)
            xi = ((xi - lo) / rngv).clamp(0, 1) ** math.exp(rng.uniform(-0.4, 0.4)) * rngv + lo
        if rng.random() < 0.5:
            xi = xi * rng.uniform(0.75, 1.25) + rng.uniform(-0.1, 0.1)
        if artefacts:
            xi = artefact(xi, rng)
        if rng.random() < 0.3:
            xi = xi + torch.randn_like(xi) * rng.uniform(0.0, 0.1 if artefacts else 0.05)
        out_x.append(xi)
        out_y.append(yi[:, 0].long())
    return torch.cat(out_x), torch.cat(out_y)


def artefact(x: torch.Tensor, rng: np.random.Generator, p_bias: float = 0.3, p_blur: float = 0.2) -> torch.Tensor:
    """Acquisition artefacts of other scanners on a (1, 1, z, y, x) patch: a smooth multiplicative bias
    field (MR coil sensitivity) and an anisotropic Gaussian blur (other resolutions), each drawn with its p.
    The trust benchmark measured the largest Dice losses under bias fields, gamma and noise
    (docs/RESULTS.md, Trust); gamma and noise were already drawn."""
    if rng.random() < p_bias:
        strength = rng.uniform(0.1, 0.5)  # log-intensity range of the field: up to ×1.65 / ×0.61
        coarse = torch.from_numpy(rng.uniform(-strength, strength, (1, 1, 3, 3, 3))).to(x.dtype)
        field = F.interpolate(coarse, size=x.shape[2:], mode="trilinear", align_corners=True)
        x = x * torch.exp(field)
    if rng.random() < p_blur:
        for axis in range(3):
            sigma = rng.uniform(0.3, 1.2)
            radius = max(1, int(math.ceil(3 * sigma)))
            t = torch.arange(-radius, radius + 1, dtype=x.dtype)
            kernel = torch.exp(-0.5 * (t / sigma) ** 2)
            shape = [1, 1, 1, 1, 1]
            shape[2 + axis] = kernel.numel()
            pad = [0, 0, 0, 0, 0, 0]
            pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = radius
            x = F.conv3d(F.pad(x, pad, mode="replicate"), (kernel / kernel.sum()).reshape(shape))
    return x


def _affine(angles: np.ndarray, scale: float) -> np.ndarray:
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    m = (rz @ ry @ rx) / scale
    return np.concatenate([m, np.zeros((3, 1))], axis=1)
