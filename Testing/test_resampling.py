"""Separable torch resampling (resampling.py) against SimpleITK's linear Resample on axis-aligned grids."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from MultiTaskSegLib.preprocessing import canonical_grid
from MultiTaskSegLib.resampling import axis_maps, resample_slab, slabs

DIRECTIONS = {
    "identity": np.eye(3),
    "flipped x, z": np.diag([-1.0, 1.0, -1.0]),
    "permuted (sagittal)": np.array([[0.0, 0.0, -1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]]),
}


def _image(size, spacing, direction, seed=0) -> sitk.Image:
    rng = np.random.default_rng(seed)
    image = sitk.GetImageFromArray(rng.random(size[::-1], dtype=np.float32))
    image.SetSpacing(spacing)
    image.SetDirection(np.asarray(direction).ravel().tolist())
    image.SetOrigin((12.3, -40.1, 7.7))
    return image


def _torch_resample(source: sitk.Image, target: sitk.Image, default: float, slab_rows=None) -> np.ndarray:
    maps = axis_maps(source, target)
    assert maps is not None
    x = torch.from_numpy(sitk.GetArrayFromImage(source))[None]
    rows = (
        slabs(maps, 1)
        if slab_rows is None
        else [slice(r, min(r + slab_rows, len(maps[0].low))) for r in range(0, len(maps[0].low), slab_rows)]
    )
    return torch.cat([resample_slab(x, maps, r, [default]) for r in rows], 1)[0].numpy()


@pytest.mark.parametrize("direction", list(DIRECTIONS))
@pytest.mark.parametrize("spacing", [(0.7, 0.8, 1.1), (3.0, 2.5, 4.0)])
def test_both_ways_equal_sitk(direction, spacing):
    """Input → canonical (down- or up-sampling) and canonical → input, as preprocessing and predictor use them."""
    image = _image((37, 29, 23), spacing, DIRECTIONS[direction])
    grid = canonical_grid(image, (2.0, 2.0, 2.0))
    for source, target, default in [(image, grid, 0.0)]:
        expected = sitk.GetArrayFromImage(sitk.Resample(source, target, sitk.Transform(), sitk.sitkLinear, default))
        np.testing.assert_allclose(_torch_resample(source, target, default), expected, atol=2e-6)
    canonical = _image(grid.GetSize(), grid.GetSpacing(), np.eye(3), seed=1)
    canonical.SetOrigin(grid.GetOrigin())
    expected = sitk.GetArrayFromImage(sitk.Resample(canonical, image, sitk.Transform(), sitk.sitkLinear, 1.0))
    np.testing.assert_allclose(_torch_resample(canonical, image, 1.0, slab_rows=5), expected, atol=2e-6)


def test_outside_points_get_the_default():
    source = _image((10, 10, 10), (1.0, 1.0, 1.0), np.eye(3))
    target = _image((14, 6, 12), (1.3, 1.0, 0.9), np.eye(3))
    target.SetOrigin((source.GetOrigin()[0] - 3.0, source.GetOrigin()[1] + 2.2, source.GetOrigin()[2] + 5.0))
    expected = sitk.GetArrayFromImage(sitk.Resample(source, target, sitk.Transform(), sitk.sitkLinear, 0.25))
    assert (expected == 0.25).any()
    np.testing.assert_allclose(_torch_resample(source, target, 0.25, slab_rows=4), expected, atol=2e-6)


def test_oblique_grids_are_left_to_sitk():
    angle = np.deg2rad(10)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    image = _image((8, 8, 8), (1.0, 1.0, 1.0), rotation)
    assert axis_maps(image, canonical_grid(image, (2.0, 2.0, 2.0))) is None


@pytest.mark.parametrize("direction", ["identity", "permuted (sagittal)"])
def test_labels_and_uncertainty_on_the_input_grid(direction):
    """The predictor's stage: labels as the brute-force argmax (test_grid_mapping.py), the uncertainty as sitk."""
    from MultiTaskSegLib.predictor import Predictor
    from test_grid_mapping import brute_force

    image = _image((61, 47, 33), (0.8, 0.9, 1.3), DIRECTIONS[direction])
    grid = canonical_grid(image, (2.0, 2.0, 2.0))
    rng = np.random.default_rng(5)
    shape = grid.GetSize()[::-1]
    logits = torch.from_numpy(rng.normal(size=(6, *shape)).astype(np.float32))
    logits[0] += 3.0  # mostly background, as in a real volume
    logits[3] -= 10.0  # a class that can win nowhere
    logits[4, 5:9, 3:8, 6:12] += 6.0  # a small organ
    probs = torch.softmax(logits, 0)
    entropy = torch.from_numpy(rng.random(shape, dtype=np.float32))
    labels, uncertainty = Predictor._to_input_grid(probs, entropy, grid, image)
    expected = brute_force(probs, grid, image)
    assert (labels != expected).sum() == 0 and set(np.unique(labels)) >= {0, 4}
    restricted, _ = Predictor._to_input_grid(probs, entropy, grid, image, None, [4])
    np.testing.assert_array_equal(restricted, np.where(expected == 4, 4, 0))
    resampled = sitk.Resample(_as_image(entropy, grid), image, sitk.Transform(), sitk.sitkLinear, 0.0)
    np.testing.assert_allclose(uncertainty, np.clip(sitk.GetArrayFromImage(resampled), 0, 1), atol=1e-6)


def _as_image(array: torch.Tensor, grid: sitk.Image) -> sitk.Image:
    image = sitk.GetImageFromArray(array.numpy())
    image.CopyInformation(grid)
    return image
