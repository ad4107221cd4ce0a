"""Spectral OOD detection: signature, threshold and scoring against hand computations."""

from __future__ import annotations

import numpy as np
import pytest

from MultiTaskSegLib.ood import (
    SpectralDetector,
    case_groups,
    loo_threshold,
    nearest_neighbour_distances,
    signature_from_features,
    signature_from_grams,
    signature_from_singular_values,
    singular_values_from_gram,
)


def _svd_signature(fmap: np.ndarray, length=None) -> np.ndarray:
    c = fmap.shape[0]
    x = fmap.reshape(c, -1).T / np.sqrt(fmap[0].size)
    s = np.linalg.svd(x, compute_uv=False)[:length]
    return np.log(s) / np.linalg.norm(np.log(s))


def test_signature_from_features_equals_direct_svd():
    fmap = np.random.default_rng(0).normal(size=(6, 5, 7, 4))
    np.testing.assert_allclose(signature_from_features(fmap), _svd_signature(fmap), rtol=1e-10)
    np.testing.assert_allclose(signature_from_features(fmap, 3), _svd_signature(fmap, 3), rtol=1e-10)
    assert np.linalg.norm(signature_from_features(fmap)) == pytest.approx(1.0)


def test_signature_of_a_hand_made_spectrum():
    # singular values e, e², e³ → log = 1, 2, 3 → / sqrt(14)
    np.testing.assert_allclose(
        signature_from_singular_values(np.exp([1.0, 2.0, 3.0])), np.array([1.0, 2.0, 3.0]) / np.sqrt(14.0), rtol=1e-12
    )
    # a zero singular value is floored, not -inf
    assert np.isfinite(signature_from_singular_values(np.array([2.0, 0.0]))).all()


def test_singular_values_from_gram_equal_svd_and_layers_concatenate():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 5))
    np.testing.assert_allclose(singular_values_from_gram(x.T @ x), np.linalg.svd(x, compute_uv=False), rtol=1e-8)
    fa, fb = rng.normal(size=(4, 6, 6, 6)), rng.normal(size=(3, 3, 3, 3))
    gram = {n: (f.reshape(f.shape[0], -1) @ f.reshape(f.shape[0], -1).T) / f[0].size for n, f in (("a", fa), ("b", fb))}
    np.testing.assert_allclose(
        signature_from_grams(gram, ["a", "b"]), np.concatenate([_svd_signature(fa), _svd_signature(fb)]), rtol=1e-8
    )
    assert signature_from_grams(gram, ["b", "a"], length=2).shape == (4,)


def test_loo_threshold_equals_hand_computation():
    sigs = np.array([[0.0, 0.0], [1.0, 0.0], [3.0, 0.0], [7.0, 0.0]])
    # leave-one-out nearest-neighbour distances: 1, 1, 2, 4 → mean 2, population std sqrt(1.5)
    assert loo_threshold(sigs) == pytest.approx(2.0 + 2.5 * np.sqrt(1.5), rel=1e-12)
    assert loo_threshold(sigs, k_std=1.0) == pytest.approx(2.0 + np.sqrt(1.5), rel=1e-12)
    with pytest.raises(ValueError):
        loo_threshold(sigs[:1])


def test_nearest_neighbour_distances():
    a = np.array([[0.0, 0.0], [5.0, 5.0]])
    b = np.array([[3.0, 4.0], [10.0, 0.0], [0.0, 1.0]])
    d, i = nearest_neighbour_distances(a, b)
    np.testing.assert_allclose(d, [1.0, np.hypot(2, 1)])
    assert i.tolist() == [2, 0]


def test_detector_scores_and_reports_nearest_context():
    sigs = np.array([[0.0, 0.0], [1.0, 0.0], [10.0, 0.0], [11.0, 0.0]])
    det = SpectralDetector(
        sigs, np.array([0, 0, 1, 1]), np.array(["a1", "a2", "b1", "b2"]), ["A", "B"], ["enc2"], None, threshold=1.5
    )
    near = det.score(np.array([10.5, 1.0]))
    assert near.nearest_context == "B" and near.nearest_case in ("b1", "b2")
    assert near.score == pytest.approx(np.hypot(0.5, 1.0)) and not near.is_ood
    far = det.score(np.array([5.0, 4.0]))
    assert far.is_ood and far.score == pytest.approx(np.hypot(4.0, 4.0))
    report = far.to_dict()
    assert {"score", "threshold", "is_ood", "nearest_context", "detector"} <= set(report)
    assert report["detector"] == "spectral:enc2" and report["threshold"] == 1.5


def test_foreign_volumes_are_far_from_phantom_signatures(untrained_bundle):
    """Even an untrained net separates a checkerboard and pure noise from CT phantoms' spectra."""
    import phantoms
    from MultiTaskSegLib.predictor import Predictor

    predictor = Predictor(untrained_bundle, "cpu")
    layers = predictor.detector.layers
    size, spacing = (20, 20, 10), (4.0, 4.0, 4.0)

    def signature(image):
        return predictor.predict(image).signature

    train = np.array([signature(phantoms.ct_phantom(size, spacing, seed=s)[0]) for s in range(4)])
    predictor.detector.signatures = train
    predictor.detector.context_index = np.zeros(len(train), int)
    predictor.detector.case_ids = np.array([f"ct{s}" for s in range(4)])
    predictor.detector.threshold = loo_threshold(train)
    assert len(train[0]) == sum(
        predictor.model.config.widths[-1] if l.startswith("enc") else predictor.model.config.widths[0] for l in layers
    )
    held_out = predictor.predict(phantoms.ct_phantom(size, spacing, seed=11)[0])
    checker = predictor.predict(phantoms.checkerboard_volume(size, spacing))
    noise = predictor.predict(phantoms.noise_volume(size, spacing))
    assert checker.ood.score > held_out.ood.score and noise.ood.score > held_out.ood.score
    assert checker.ood.is_ood and noise.ood.is_ood


def test_loo_threshold_leaves_out_every_variant_of_a_case():
    # two cases, each with an augmented variant right next to it
    sigs = np.array([[0.0, 0.0], [0.0, 0.1], [3.0, 0.0], [3.0, 0.1]])
    ids = ["a", "a#aug1", "b", "b#aug1"]
    # per-signature LOO finds the twin (0.1 away); per-case LOO must look across cases (3.0 away)
    assert loo_threshold(sigs, k_std=0.0) == pytest.approx(0.1)
    assert loo_threshold(sigs, k_std=0.0, groups=case_groups(ids)) == pytest.approx(3.0)
