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


@pytest.fixture(params=["boxes", "voxels"])
def path(request, monkeypatch):
    """Both paths on every grid: axis-aligned grids by cell boxes (cell_boxes.py), and the voxel-by-voxel
    path of oblique grids, forced on axis-aligned ones too."""
    from MultiTaskSegLib import grid_mapping

    if request.param == "voxels":
        monkeypatch.setattr(grid_mapping, "axis_maps", lambda *grids: None)
    return request.param


def _check(probs: torch.Tensor, grid: sitk.Image, target: sitk.Image, allowed_sets=([6], [1, 2], [])) -> np.ndarray:
    """Labels equal the brute force, unrestricted and restricted; returns the brute force."""
    expected = brute_force(probs, grid, target)
    np.testing.assert_array_equal(labels_on_target(probs, grid, target), expected)
    for allowed in allowed_sets:
        restricted = labels_on_target(probs, grid, target, allowed)
        np.testing.assert_array_equal(restricted, restrict_labels(expected.copy(), allowed))
    return expected


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


@pytest.mark.parametrize("direction", ["identity", "flipped x, z", "permuted (sagittal)"])
def test_boxes_of_every_size(direction, path):
    """Per axis 4–5, 2–3 and 1–2 target voxels per canonical cell (boxes of uneven sizes, unused slots)."""
    image = _input((38, 24, 17), (0.45, 0.7, 1.3), DIRECTIONS[direction])
    grid = canonical_grid(image, (2.0, 2.0, 2.0))
    expected = _check(_probabilities(grid, seed=3), grid, image)
    assert len(np.unique(expected)) >= 4


@pytest.mark.parametrize("direction", ["identity", "flipped x, z", "permuted (sagittal)"])
def test_target_beyond_the_canonical_grid(direction, path):
    """A target reaching past the canonical grid on both sides of every axis: the cells at the far
    edges (the last voxel repeated), the half voxel beyond the first one, and background outside."""
    image = _input((30, 26, 14), (1.0, 1.0, 1.5), DIRECTIONS[direction])
    grid = canonical_grid(image, (2.0, 2.0, 2.0))
    target = _input((52, 44, 33), (0.7, 0.8, 0.9), DIRECTIONS[direction])
    shift = np.asarray(DIRECTIONS[direction]) @ np.array([-4.9, -5.3, -4.1])
    target.SetOrigin(tuple(np.array(image.GetOrigin()) + shift))
    probs = _probabilities(grid, seed=5)
    probs[:, :, :, -1] = probs[:, :, :, -2].flip(1)  # boundaries in the far-edge cells along x
    expected = _check(probs, grid, target)
    assert (expected == 0).any() and len(np.unique(expected)) >= 4


def test_exact_ties_at_interpolated_points(path):
    """Target voxels halfway between canonical voxels whose classes alternate: two candidates tying
    exactly (0.625/0.375 swapped: 0.5 each) and four tying exactly (0.25 each) go to the lowest class."""
    grid = sitk.Image([6, 5, 4], sitk.sitkUInt8)
    grid.SetSpacing((2.0, 2.0, 2.0))
    target = sitk.Image([11, 9, 7], sitk.sitkInt16)  # every other voxel halfway along each axis
    zz, yy, xx = np.meshgrid(*[np.arange(s) for s in grid.GetSize()[::-1]], indexing="ij")
    odd = torch.from_numpy((xx + yy + zz) % 2 == 1)
    for even_values, odd_values, winner in (
        ((0.0, 0.625, 0.375, 0.0), (0.0, 0.375, 0.625, 0.0), 1),  # two candidates, interpolated by difference
        ((0.5, 0.25, 0.25, 0.0), (0.0, 0.25, 0.25, 0.5), 0),  # four candidates
    ):
        probs = torch.where(
            odd, torch.tensor(odd_values)[:, None, None, None], torch.tensor(even_values)[:, None, None, None]
        )
        expected = _check(probs.float().contiguous(), grid, target, allowed_sets=([2], [1, 3]))
        assert (expected[1::2, 1::2, 1::2] == winner).all()  # the centres of the cells: every class ties
