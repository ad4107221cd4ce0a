"""Calibration metrics: ECE, MCE and reliability-diagram data (equal-width bins)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage


@dataclass
class Reliability:
    bin_edges: np.ndarray
    confidence: np.ndarray  # mean predicted probability per bin (nan where empty)
    accuracy: np.ndarray  # observed frequency per bin (nan where empty)
    counts: np.ndarray
    ece: float
    mce: float

    def to_dict(self) -> dict:
        clean = lambda a: [None if not np.isfinite(v) else float(v) for v in a]  # noqa: E731
        return {
            "bin_edges": self.bin_edges.tolist(),
            "confidence": clean(self.confidence),
            "accuracy": clean(self.accuracy),
            "counts": self.counts.astype(int).tolist(),
            "ece": self.ece,
            "mce": self.mce,
        }


def reliability(prob: np.ndarray, target: np.ndarray, n_bins: int = 10) -> Reliability:
    """Binary calibration of ``prob`` (predicted P(y=1)) against ``target`` (0/1).

    ECE = Σ_b |B_b|/N · |acc_b − conf_b|; MCE = max_b |acc_b − conf_b| over non-empty bins.
    """
    prob = np.asarray(prob, dtype=np.float64).ravel()
    target = np.asarray(target, dtype=np.float64).ravel()
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.digitize(prob, edges[1:-1], right=False), 0, n_bins - 1)
    counts = np.bincount(idx, minlength=n_bins).astype(np.float64)
    conf_sum = np.bincount(idx, weights=prob, minlength=n_bins)
    acc_sum = np.bincount(idx, weights=target, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        conf = conf_sum / counts
        acc = acc_sum / counts
    gaps = np.abs(acc - conf)
    nonempty = counts > 0
    n = counts.sum()
    ece = float((counts[nonempty] / n * gaps[nonempty]).sum()) if n else float("nan")
    mce = float(gaps[nonempty].max()) if nonempty.any() else float("nan")
    return Reliability(edges, conf, acc, counts, ece, mce)


def boundary_band(mask: np.ndarray, radius: int = 2) -> np.ndarray:
    """Voxels within ``radius`` voxels of the boundary of a binary mask."""
    mask = mask.astype(bool)
    structure = ndimage.generate_binary_structure(3, 1)
    dil = ndimage.binary_dilation(mask, structure, iterations=radius)
    ero = ndimage.binary_erosion(mask, structure, iterations=radius)
    return dil & ~ero


def structure_calibration(
    prob: np.ndarray, gt: np.ndarray, predicted: np.ndarray, n_bins: int = 10, band_radius: int = 2
) -> dict:
    """Whole-image and boundary-band calibration of one structure's foreground probability."""
    whole = reliability(prob, gt, n_bins)
    band = boundary_band(predicted, band_radius)
    near = reliability(prob[band], gt[band], n_bins) if band.any() else None
    return {"whole": whole, "boundary": near}
