"""Labels on the input grid (grid_mapping.py) against the brute force: every class resampled everywhere
by SimpleITK's linear interpolator (double precision), then the argmax (lowest class on ties)."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import phantoms
from MultiTaskSegLib.grid_mapping import labels_on_target
from MultiTaskSegLib.preprocessing import canonical_grid
from MultiTaskSegLib.uncertainty import restrict_labels

DIRECTIONS = {
    "identity": np.eye(3),
    "flipped x, z": np.diag([-1.0, 1.0, -1.0]),
    "permuted (sagittal)": np.array([[0.0, 0.0, -1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]]),
    "oblique": phantoms.oblique_lps_direction(),
    "oblique mirrored": phantoms.rotation((-9.0, 14.0, -25.0)) @ np.diag([-1.0, 1.0, 1.0]),
}


def _input(size, spacing, direction) -> sitk.Image:
    image = sitk.Image([int(s) for s in size], sitk.sitkInt16)
    image.SetSpacing(spacing)
    image.SetDirection(np.asarray(direction, dtype=float).ravel().tolist())
    image.SetOrigin((12.3, -40.1, 7.7))
    return image


def _probabilities(grid: sitk.Image, n: int = 7, seed: int = 0) -> torch.Tensor:
    """Smooth class regions with noisy boundaries, a class that never wins and an exact tie."""
    rng = np.random.default_rng(seed)
    shape = grid.GetSize()[::-1]
    logits = rng.normal(size=(n, *shape)).astype(np.float32)
    zz, yy, xx = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    logits[0] += 4.0 * (xx**2 + yy**2 + zz**2 > 0.5)  # background outside a ball
    logits[1] += 3.0 * (xx < 0)
    logits[2] += 3.0 * (yy > 0.2)
    logits[3] -= 20.0  # can win nowhere
    logits[5] = logits[4]  # 4 and 5 tie exactly everywhere: 5 must never win
    logits[6] += 8.0 * ((abs(xx - 0.3) < 0.25) & (abs(yy) < 0.3) & (abs(zz) < 0.3))  # a small organ
    return torch.softmax(torch.from_numpy(logits), 0)


def brute_force(probs: torch.Tensor, grid: sitk.Image, target: sitk.Image) -> np.ndarray:
    resampled = []
    for c in range(probs.shape[0]):
        image = sitk.GetImageFromArray(probs[c].double().numpy())
        image.CopyInformation(grid)
        default = 1.0 if c == 0 else 0.0  # outside the canonical grid: background
        out = sitk.Resample(image, target, sitk.Transform(), sitk.sitkLinear, default, sitk.sitkFloat64)
        resampled.append(sitk.GetArrayFromImage(out))
    return np.argmax(np.stack(resampled), 0).astype(np.uint8)


@pytest.fixture(params=["sparse", "dense"])
def path(request, monkeypatch):
    """Both passes: interpolation cell by cell, and the dense pass (axis-aligned grids only)."""
    from MultiTaskSegLib import grid_mapping

    monkeypatch.setattr(grid_mapping, "_DENSE", 2.0 if request.param == "sparse" else -1.0)
    return request.param


@pytest.mark.parametrize("direction", list(DIRECTIONS))
@pytest.mark.parametrize("size,spacing", [((45, 38, 21), (0.8, 0.9, 1.7)), ((9, 11, 30), (3.1, 2.6, 0.6))])
def test_labels_equal_the_brute_force(direction, size, spacing, path):
    image = _input(size, spacing, DIRECTIONS[direction])
    grid = canonical_grid(image, (2.0, 2.0, 2.0))
    probs = _probabilities(grid)
    expected = brute_force(probs, grid, image)
    labels = labels_on_target(probs, grid, image)
    assert len(np.unique(expected)) >= 4 and 5 not in expected  # the case exercises boundaries and the tie
    assert (labels != expected).sum() == 0
    for allowed in ([6], [1, 2], []):
        restricted = labels_on_target(probs, grid, image, allowed)
        np.testing.assert_array_equal(restricted, restrict_labels(expected.copy(), allowed))


def test_points_outside_the_canonical_grid_are_background(path):
    image = _input((30, 30, 12), (1.0, 1.0, 1.0), np.eye(3))
    grid = canonical_grid(image, (2.0, 2.0, 2.0))
    target = _input((40, 26, 20), (1.3, 1.0, 0.9), np.eye(3))
    target.SetOrigin((image.GetOrigin()[0] - 9.0, image.GetOrigin()[1] + 2.2, image.GetOrigin()[2] - 4.0))
    probs = torch.zeros((3, *grid.GetSize()[::-1]))
    probs[2] = 1.0  # class 2 everywhere inside
    labels = labels_on_target(probs, grid, target)
    expected = brute_force(probs, grid, target)
    assert set(np.unique(expected)) == {0, 2}
    np.testing.assert_array_equal(labels, expected)


@pytest.mark.parametrize("slices", [1, 2, 3])
def test_thin_slabs(slices, path):
    """A canonical grid one or two voxels thick: the cells at the far edge repeat the last voxel."""
    image = _input((33, 29, slices), (0.7, 0.7, 5.0), DIRECTIONS["flipped x, z"])
    grid = canonical_grid(image, (2.0, 2.0, 2.0))
    probs = _probabilities(grid, seed=slices)
    np.testing.assert_array_equal(labels_on_target(probs, grid, image), brute_force(probs, grid, image))
