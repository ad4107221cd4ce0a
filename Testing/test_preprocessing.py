"""Preprocessing: modality detection, intensity normalisation, canonical grid and the way back."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

import phantoms
from MultiTaskSegLib.preprocessing import (
    PreprocessingConfig,
    canonical_grid,
    detect_modality,
    grid_to_input,
    normalise_intensities,
    preprocess,
    resample_label_to_grid,
)

OBLIQUE = phantoms.oblique_lps_direction()
# a left-handed (mirrored) oblique direction: z stored inverted as well
MIRRORED = phantoms.rotation((-9.0, 14.0, -25.0)) @ np.diag([-1.0, 1.0, 1.0])
SAGITTAL = np.array([[0.0, 0.0, -1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])  # permuted and flipped axes


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    return 2.0 * (a & b).sum() / max(a.sum() + b.sum(), 1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_modality_detection_ct_vs_mr(seed):
    ct, _ = phantoms.ct_phantom(seed=seed)
    assert detect_modality(sitk.GetArrayFromImage(ct)) == "CT"
    for scale in (1.0, 300.0, 4000.0):
        mr, _ = phantoms.mr_phantom(seed=seed, scale=scale)
        assert detect_modality(sitk.GetArrayFromImage(mr)) == "MR", scale


def test_ct_normalisation_is_the_fixed_window():
    config = PreprocessingConfig(ct_window=(-200.0, 300.0))
    hu = np.array([-1000.0, -200.0, 50.0, 300.0, 2000.0], np.float32)
    np.testing.assert_allclose(normalise_intensities(hu, "CT", config), [0.0, 0.0, 0.5, 1.0, 1.0], atol=1e-6)


def test_mr_normalisation_is_scale_invariant():
    mr, _ = phantoms.mr_phantom(seed=5, scale=1.0)
    a = sitk.GetArrayFromImage(mr)
    config = PreprocessingConfig()
    n1 = normalise_intensities(a, "MR", config)
    n2 = normalise_intensities(a * 2500.0, "MR", config)
    assert n1.dtype == np.float32 and n1.min() >= 0.0 and n1.max() <= 1.0
    np.testing.assert_allclose(n1, n2, atol=1e-5)
    # percentiles: 0.5 % of voxels at most below the low clip, 0.5 % above the high one
    assert (n1 == 0).mean() == pytest.approx(0.005, abs=0.002)
    assert (n1 == 1).mean() == pytest.approx(0.005, abs=0.002)


def test_canonical_grid_is_axis_aligned_and_covers_the_image():
    image, _ = phantoms.ct_phantom((20, 16, 10), (2.5, 3.0, 6.0), direction=OBLIQUE)
    grid = canonical_grid(image, (4.0, 4.0, 4.0))
    np.testing.assert_allclose(grid.GetDirection(), np.eye(3).ravel())
    np.testing.assert_allclose(grid.GetSpacing(), (4.0, 4.0, 4.0))
    size = np.array(image.GetSize())
    low = np.array(grid.GetOrigin())
    high = low + (np.array(grid.GetSize()) - 1) * 4.0
    for corner in np.array(np.meshgrid(*[(0, s - 1) for s in size], indexing="ij")).reshape(3, -1).T:
        p = np.array(image.TransformContinuousIndexToPhysicalPoint(corner.astype(float).tolist()))
        assert np.all(p >= low - 1e-6) and np.all(p <= high + 4.0 + 1e-6)


@pytest.mark.parametrize("direction", [OBLIQUE, MIRRORED], ids=["oblique-LPS", "mirrored"])
def test_label_round_trip_to_canonical_and_back(direction):
    """A structure lands at the same physical place: canonical grid and back keeps ≥ 0.95 overlap."""
    image, label = phantoms.ct_phantom(
        (40, 36, 16),
        (2.0, 2.5, 5.0),
        labels=("liver", "spleen"),
        seed=6,
        direction=direction,
        origin=(-40.0, 25.0, -70.0),
    )
    grid = canonical_grid(image, (2.0, 2.0, 2.0))
    on_grid = resample_label_to_grid(label, grid)
    back = grid_to_input(on_grid, grid, image, interpolator=sitk.sitkNearestNeighbor)
    original = sitk.GetArrayFromImage(label)
    for value in (1, 2):
        assert original[original == value].size > 100
        assert _dice(back == value, original == value) >= 0.95, value
    # the structure's physical centroid on the canonical grid equals the one on the input grid
    for value in (1, 2):
        zyx = np.argwhere(original == value).mean(0)
        c_in = np.array(image.TransformContinuousIndexToPhysicalPoint(zyx[::-1].tolist()))
        zyx_g = np.argwhere(on_grid == value).mean(0)
        c_grid = np.array(grid.TransformContinuousIndexToPhysicalPoint(zyx_g[::-1].tolist()))
        assert np.linalg.norm(c_in - c_grid) < 2.0


def test_preprocess_output_and_physical_position_of_a_sphere():
    centre = np.array([18.0, -12.0, 8.0])
    image, _ = phantoms.sphere_phantom((40, 40, 20), (2.5, 2.5, 6.0), centre_mm=centre, direction=OBLIQUE)
    pre = preprocess(image, PreprocessingConfig((4.0, 4.0, 4.0)))
    assert pre.modality == "MR"
    assert pre.array.dtype == np.float32
    assert pre.array.min() >= -0.01 and pre.array.max() <= 1.01  # anti-aliasing may ring slightly
    assert pre.array.shape == sitk.GetArrayFromImage(pre.grid).shape
    bright = np.argwhere(pre.array > 0.5).mean(0)
    found = np.array(pre.grid.TransformContinuousIndexToPhysicalPoint(bright[::-1].tolist()))
    assert np.linalg.norm(found - centre) < 3.0


def test_preprocess_strongly_anisotropic_input_stays_finite():
    image, _ = phantoms.ct_phantom((48, 48, 4), (0.8, 0.8, 12.0), seed=7)
    pre = preprocess(image, PreprocessingConfig((4.0, 4.0, 4.0)))
    assert pre.modality == "CT" and np.isfinite(pre.array).all()
    assert pre.array.shape == (10, 10, 10)


def test_modality_override():
    mr, _ = phantoms.mr_phantom(seed=8)
    assert preprocess(mr, PreprocessingConfig((4.0,) * 3), modality="CT").modality == "CT"
    with pytest.raises(ValueError):
        preprocess(mr, PreprocessingConfig((4.0,) * 3), modality="PET")


def test_config_round_trip():
    config = PreprocessingConfig((1.5, 1.5, 3.0), (-100.0, 200.0), (1.0, 99.0))
    assert PreprocessingConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("slices,spacing", [(3, (0.7, 0.7, 5.0)), (2, (0.7, 0.7, 0.7)), (3, (0.7, 0.7, 0.7))])
def test_thin_slabs_are_segmented(untrained_bundle, slices, spacing):
    """Issue 14: fewer than four slices crashed ITK's recursive Gaussian; they are segmented now."""
    from MultiTaskSegLib.predictor import Predictor

    image, _ = phantoms.ct_phantom((60, 56, slices), spacing, seed=2)
    pre = preprocess(image, PreprocessingConfig())
    assert np.isfinite(pre.array).all() and pre.array.max() > 0
    prediction = Predictor(untrained_bundle, "cpu").predict(image)
    assert prediction.labels.GetSize() == image.GetSize()
    assert 0.0 <= prediction.mean_uncertainty <= 1.0


def test_oblique_thin_slab_goes_through_sitk():
    image, _ = phantoms.ct_phantom((40, 36, 3), (0.7, 0.7, 0.7), seed=2, direction=phantoms.oblique_lps_direction())
    assert np.isfinite(preprocess(image, PreprocessingConfig()).array).all()


@pytest.mark.parametrize(
    "size,spacing,direction",
    [
        ((64, 52, 40), (0.7, 0.8, 1.1), np.eye(3)),
        ((64, 52, 40), (0.7, 0.8, 1.1), SAGITTAL),
        ((40, 36, 3), (0.7, 0.8, 0.5), np.eye(3)),
    ],
    ids=["identity", "permuted", "thin slab"],
)
def test_axis_aligned_preprocessing_equals_sitk_smoothing_then_resampling(size, spacing, direction):
    """The axis-aligned path (each axis smoothed and sampled as one banded matrix) gives SimpleITK's
    values: SmoothingRecursiveGaussian over the whole image, then a linear Resample onto the canonical grid
    (every axis here is downsampled enough to be smoothed; the thin slab is padded by its edge voxels)."""
    from MultiTaskSegLib.preprocessing import _antialias

    image, _ = phantoms.ct_phantom(size, spacing, seed=5)
    image.SetDirection(np.asarray(direction, dtype=float).ravel().tolist())
    config = PreprocessingConfig()
    pre = preprocess(image, config)
    normalised = sitk.GetImageFromArray(normalise_intensities(sitk.GetArrayViewFromImage(image), "CT", config))
    normalised.CopyInformation(image)
    smoothed = _antialias(normalised, config.target_spacing)
    expected = sitk.Resample(smoothed, pre.grid, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    np.testing.assert_allclose(pre.array, sitk.GetArrayFromImage(expected), atol=2e-6)
