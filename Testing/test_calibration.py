"""Calibration metrics against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from MultiTaskSegLib.calibration import boundary_band, reliability, structure_calibration


def test_ece_and_mce_of_a_constructed_example():
    # bin [0.1, 0.2): 4 predictions of 0.15, 1 positive  → conf 0.15, acc 0.25, gap 0.10
    # bin [0.7, 0.8): 4 predictions of 0.75, 4 positive  → conf 0.75, acc 1.00, gap 0.25
    # bin [0.9, 1.0]: 2 predictions of 0.95 and 1.0, 1 positive → conf 0.975, acc 0.5, gap 0.475
    prob = [0.15] * 4 + [0.75] * 4 + [0.95, 1.0]
    target = [1, 0, 0, 0] + [1, 1, 1, 1] + [1, 0]
    r = reliability(prob, target)
    ece = 4 / 10 * 0.10 + 4 / 10 * 0.25 + 2 / 10 * 0.475
    assert r.ece == pytest.approx(ece, abs=1e-12)
    assert r.mce == pytest.approx(0.475, abs=1e-12)
    assert r.counts.tolist() == [0, 4, 0, 0, 0, 0, 0, 4, 0, 2]
    assert r.confidence[1] == pytest.approx(0.15) and r.accuracy[7] == pytest.approx(1.0)
    assert np.isnan(r.confidence[0])
    d = r.to_dict()
    assert d["confidence"][0] is None and d["ece"] == r.ece and len(d["bin_edges"]) == 11


def test_bin_edges_are_left_closed():
    r = reliability([0.0, 0.1, 0.2, 0.999, 1.0], [0, 0, 0, 1, 1])
    assert r.counts.tolist() == [1, 1, 1, 0, 0, 0, 0, 0, 0, 2]


def test_perfect_calibration_has_zero_ece():
    prob = np.repeat([0.05, 0.25, 0.45, 0.85], 20)
    target = np.concatenate([np.arange(20) < k for k in (1, 5, 9, 17)]).astype(int)
    r = reliability(prob, target)
    assert r.ece == pytest.approx(0.0, abs=1e-12) and r.mce == pytest.approx(0.0, abs=1e-12)


def test_boundary_band_by_hand():
    mask = np.zeros((11, 11, 11), bool)
    mask[3:8, 3:8, 3:8] = True  # a 5-voxel cube
    band = boundary_band(mask, radius=1)[5, 5, :]  # the line through its centre
    # dilation by 1 covers 2..8, erosion by 1 keeps 4..6 → band = 2, 3, 7, 8
    assert np.flatnonzero(band).tolist() == [2, 3, 7, 8]


def test_structure_calibration_has_whole_and_boundary():
    rng = np.random.default_rng(0)
    gt = np.zeros((12, 12, 12), np.uint8)
    gt[3:9, 3:9, 3:9] = 1
    prob = np.clip(gt * 0.8 + rng.random(gt.shape) * 0.2, 0, 1)
    out = structure_calibration(prob, gt, prob > 0.5)
    assert out["whole"].counts.sum() == gt.size
    assert 0 < out["boundary"].counts.sum() < gt.size
    empty = structure_calibration(np.zeros_like(prob), gt, np.zeros(gt.shape, bool))
    assert empty["boundary"] is None
