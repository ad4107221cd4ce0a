"""Metrics of `mtseg evaluate` on masks and reliability bins, and the JSON clean-up of its output.

Dice = 2|A∩B| / (|A|+|B|): ``None`` when both masks are empty, 0 when only one is. HD95 (mm) =
max of the two directed 95th percentiles of surface-to-surface distances. Summaries (mean,
std, median) skip ``None``s and say how many there were.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy import ndimage

from MultiTaskSegLib.calibration import Reliability
from MultiTaskSegLib.postprocessing import bounding_box

# --- metrics on masks ------------------------------------------------------------------------


def dice(pred: np.ndarray, gt: np.ndarray) -> float | None:
    """Dice of two binary masks; None when both are empty."""
    pred = np.asarray(pred, bool)
    gt = np.asarray(gt, bool)
    total = int(pred.sum()) + int(gt.sum())
    if total == 0:
        return None
    return 2.0 * int(np.logical_and(pred, gt).sum()) / total


def _surface(mask: np.ndarray) -> np.ndarray:
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure)


def hd95(pred: np.ndarray, gt: np.ndarray, spacing_zyx: Sequence[float]) -> float | None:
    """95th-percentile symmetric Hausdorff distance in mm (max of the two directed 95th
    percentiles of surface distances); None when either mask is empty.

    Computed inside the bounding box of both masks (plus one voxel): every surface voxel is
    inside it, so the distances are those of the whole image.
    """
    pred = np.asarray(pred, bool)
    gt = np.asarray(gt, bool)
    if not pred.any() or not gt.any():
        return None
    box = bounding_box(pred | gt, margin=1)
    assert box is not None  # both masks are non-empty
    sp, sg = _surface(pred[box]), _surface(gt[box])
    spacing = [float(s) for s in spacing_zyx]
    to_gt = ndimage.distance_transform_edt(~sg, sampling=spacing)[sp]
    to_pred = ndimage.distance_transform_edt(~sp, sampling=spacing)[sg]
    return float(max(np.percentile(to_gt, 95), np.percentile(to_pred, 95)))


def summarise(values: dict[str, float | None]) -> dict:
    """mean / std / median over the defined per-case values, plus the per-case values."""
    defined = np.array([v for v in values.values() if v is not None and np.isfinite(v)], dtype=np.float64)
    stats = {"mean": None, "std": None, "median": None}
    if len(defined):
        stats = {"mean": float(defined.mean()), "std": float(defined.std()), "median": float(np.median(defined))}
    return {**stats, "n": int(len(defined)), "n_undefined": int(len(values) - len(defined)), "cases": dict(values)}


# --- pooled calibration ----------------------------------------------------------------------


class PooledReliability:
    """Bin counts, confidence sums and accuracy sums accumulated over cases."""

    def __init__(self, n_bins: int = 10):
        self.edges = np.linspace(0.0, 1.0, n_bins + 1)
        self.counts = np.zeros(n_bins)
        self.conf_sum = np.zeros(n_bins)
        self.acc_sum = np.zeros(n_bins)

    def add(self, rel: Reliability | None) -> None:
        if rel is None:
            return
        c = np.asarray(rel.counts, dtype=np.float64)
        self.counts += c
        self.conf_sum += np.nan_to_num(rel.confidence) * c
        self.acc_sum += np.nan_to_num(rel.accuracy) * c

    def result(self) -> Reliability:
        with np.errstate(invalid="ignore", divide="ignore"):
            conf = self.conf_sum / self.counts
            acc = self.acc_sum / self.counts
        nonempty = self.counts > 0
        n = self.counts.sum()
        gaps = np.abs(acc - conf)
        ece = float((self.counts[nonempty] / n * gaps[nonempty]).sum()) if n else float("nan")
        mce = float(gaps[nonempty].max()) if nonempty.any() else float("nan")
        return Reliability(self.edges, conf, acc, self.counts.copy(), ece, mce)


# --- JSON --------------------------------------------------------------------------------------


def json_clean(obj):
    """numpy → Python, NaN/Inf → None, tuples → lists, Paths → str."""
    if isinstance(obj, dict):
        return {str(k): json_clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_clean(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_clean(obj.tolist())
    if isinstance(obj, (np.bool_, bool)):
        return bool(obj)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(float(obj)) else None
    if isinstance(obj, Path):
        return str(obj)
    return obj
