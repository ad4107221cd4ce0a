"""OOD scores the spectral detector is compared against, and the detection metrics.

Every score here is "higher = more out-of-distribution". The detection metrics treat OOD as
the positive class:

- AUROC: scikit-learn's ``roc_auc_score`` (ties count one half).
- FPR at 95 % TPR: the smallest false-positive rate among the ROC operating points whose
  true-positive rate is at least 0.95 (the threshold is the largest one that still flags
  95 % of the OOD cases).

Baselines:

- uncertainty: mean normalised predictive entropy over the whole image and over the
  predicted foreground, max-softmax (1 − mean max probability), MC-dropout entropy;
- Mahalanobis: on globally average-pooled bottleneck features (the deepest encoder level,
  the input of the context head), class-conditional means per context with one tied,
  Ledoit–Wolf-shrunk covariance fitted on the training split (Lee et al. 2018, without input
  perturbation); score = distance to the nearest context mean;
- size control: sees only the image's size in voxels, physical extent and spacing; score =
  Euclidean distance to the nearest training case in standardised log space. It shows how
  much of a detector's separation image geometry alone explains.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import SimpleITK as sitk
import torch

from MultiTaskSegLib.uncertainty import normalised_entropy

# --- detection metrics -----------------------------------------------------------------


def detection_metrics(id_scores: Sequence[float], ood_scores: Sequence[float]) -> dict:
    """AUROC and FPR at 95 % TPR with OOD as the positive class; None when undefined.

    Non-finite / missing scores are dropped; both groups need at least one case.
    """
    from sklearn.metrics import roc_auc_score, roc_curve

    ind = np.array([s for s in id_scores if s is not None and np.isfinite(s)], dtype=np.float64)
    ood = np.array([s for s in ood_scores if s is not None and np.isfinite(s)], dtype=np.float64)
    out = {"auroc": None, "fpr_at_95_tpr": None, "n_in_distribution": int(len(ind)), "n_ood": int(len(ood))}
    if len(ind) == 0 or len(ood) == 0:
        return out
    y = np.concatenate([np.zeros(len(ind)), np.ones(len(ood))])
    s = np.concatenate([ind, ood])
    out["auroc"] = float(roc_auc_score(y, s))
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    out["fpr_at_95_tpr"] = float(fpr[tpr >= 0.95 - 1e-12].min())
    return out


# --- uncertainty baselines ----------------------------------------------------------------


def uncertainty_scores(probs: torch.Tensor) -> dict[str, float]:
    """Image-level scores from (C, z, y, x) class probabilities on the canonical grid.

    ``entropy_foreground`` is 1 (maximal) when nothing is predicted as foreground: an image
    in which the model recognises no structure counts as maximally uncertain.
    """
    entropy = normalised_entropy(probs)
    top, arg = probs.max(0)
    fg = arg > 0
    return {
        "entropy_whole": float(entropy.mean()),
        "entropy_foreground": float(entropy[fg].mean()) if bool(fg.any()) else 1.0,
        "max_softmax": float(1.0 - top.mean()),
    }


# --- pooled bottleneck features (for Mahalanobis) ------------------------------------------


class PooledFeatures:
    """Forward hook on a module: the mean over windows of each window's spatially averaged output.

    Attach it around a ``sliding_window`` call; it sees the same forward passes as the
    segmentation (no extra pass). Windows are weighted equally.
    """

    def __init__(self, module: torch.nn.Module):
        self.module = module
        self.total = None
        self.count = 0
        self.handle = None

    def _hook(self, module, inputs, output):
        pooled = output.detach().float().mean(dim=tuple(range(2, output.dim())))  # (B, C)
        s = pooled.sum(0).cpu().double()
        self.total = s if self.total is None else self.total + s
        self.count += pooled.shape[0]

    def __enter__(self) -> "PooledFeatures":
        self.total, self.count = None, 0
        self.handle = self.module.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()
        self.handle = None

    @property
    def value(self) -> np.ndarray | None:
        return None if self.total is None else (self.total / max(self.count, 1)).numpy()


@dataclass
class MahalanobisDetector:
    means: np.ndarray  # (K, D) per-context means
    precision: np.ndarray  # (D, D) inverse of the tied covariance
    contexts: list[int]  # context index of each row of means
    n_train: int

    @classmethod
    def fit(cls, features: np.ndarray, context_index: Sequence[int]) -> "MahalanobisDetector":
        from sklearn.covariance import LedoitWolf

        features = np.asarray(features, dtype=np.float64)
        context_index = np.asarray(context_index)
        if len(features) == 0:
            raise ValueError("no training features to fit the Mahalanobis detector")
        contexts = sorted(set(context_index.tolist()))
        means = np.stack([features[context_index == k].mean(0) for k in contexts])
        residual = features - means[[contexts.index(k) for k in context_index]]
        if len(features) - len(contexts) >= 1 and np.any(residual):
            cov = LedoitWolf(assume_centered=True).fit(residual).covariance_
        else:  # one case per context: no spread to estimate; fall back to the overall feature scale
            cov = np.eye(features.shape[1]) * max(float(features.var()), 1e-6)
        cov = cov + np.eye(cov.shape[0]) * 1e-6 * max(float(np.trace(cov)) / cov.shape[0], 1e-12)
        return cls(means, np.linalg.inv(cov), contexts, len(features))

    def score(self, feature: np.ndarray) -> float:
        d = np.asarray(feature, dtype=np.float64)[None] - self.means
        m = np.einsum("kd,de,ke->k", d, self.precision, d)
        return float(np.sqrt(max(float(m.min()), 0.0)))


# --- size control ----------------------------------------------------------------------------


def geometry_features(size_xyz: Sequence[int], spacing_xyz: Sequence[float]) -> np.ndarray:
    """log size (voxels), log physical extent (mm) and log spacing (mm), per axis: 9 numbers."""
    size = np.asarray(size_xyz, dtype=np.float64)
    spacing = np.asarray(spacing_xyz, dtype=np.float64)
    return np.log(np.concatenate([size, size * spacing, spacing]))


def image_geometry(image: sitk.Image) -> np.ndarray:
    return geometry_features(image.GetSize()[:3], image.GetSpacing()[:3])


def file_geometry(path) -> np.ndarray:
    """Geometry features from a file's header only (no voxel data read)."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return geometry_features(reader.GetSize()[:3], reader.GetSpacing()[:3])


@dataclass
class SizeControlDetector:
    train: np.ndarray  # (N, 9) standardised training features
    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, features: np.ndarray) -> "SizeControlDetector":
        features = np.atleast_2d(np.asarray(features, dtype=np.float64))
        mean = features.mean(0)
        std = features.std(0)
        std = np.where(std > 1e-6, std, 1.0)  # a constant feature: distances in raw log units
        return cls((features - mean) / std, mean, std)

    def score(self, feature: np.ndarray) -> float:
        z = (np.asarray(feature, dtype=np.float64) - self.mean) / self.std
        return float(np.sqrt(((self.train - z) ** 2).sum(1)).min())


# --- size-robustness variants ---------------------------------------------------------------


def central_crop(image: sitk.Image, fraction: float | Sequence[float] = 0.5) -> sitk.Image:
    """The central ``fraction`` of the image per axis (one value, or one per axis x, y, z; geometry kept:
    same voxels, same places)."""
    size = np.array(image.GetSize())
    keep = np.maximum(np.round(size * np.asarray(fraction, dtype=np.float64)).astype(int), 2)
    start = (size - keep) // 2
    return sitk.RegionOfInterest(image, [int(k) for k in keep], [int(s) for s in start])


def pad_to_factor(image: sitk.Image, factor: float | Sequence[float] = 2.0) -> sitk.Image:
    """The image centred in a ``factor``× larger (per axis: one value, or one per axis x, y, z) field of view,
    padded with its minimum."""
    size = np.array(image.GetSize())
    extra = np.round(size * (np.asarray(factor, dtype=np.float64) - 1)).astype(int)
    lower = extra // 2
    upper = extra - lower
    low = float(sitk.GetArrayViewFromImage(image).min())
    return sitk.ConstantPad(image, [int(v) for v in lower], [int(v) for v in upper], low)


FIELD_OF_VIEW_RANGE = (0.75, 1.3)  # factors on the in-plane and the through-plane extent
_MIN_SLICES_TO_REFRAME = 12  # a stack of fewer slices (a cine short-axis stack) keeps its slice coverage


def field_of_view_variant(
    image: sitk.Image, seed: int, factors: tuple[float, float] = FIELD_OF_VIEW_RANGE
) -> sitk.Image:
    """The same scan as another protocol might frame it: in-plane and through-plane factors drawn (seeded)
    from ``factors``; below 1 the central part is kept, above 1 the image is padded with its minimum.
    The trust fit counts such variants as in-distribution, so a field of view unlike the training cases'
    is not by itself an OOD flag (docs/RESULTS.md, Trust)."""
    rng = np.random.default_rng(seed)
    in_plane, through = rng.uniform(*factors, 2)
    if image.GetSize()[2] < _MIN_SLICES_TO_REFRAME:
        through = 1.0
    for f in ((in_plane, in_plane, 1.0), (1.0, 1.0, through)):
        per_axis = np.asarray(f)
        if (per_axis < 1).any():
            image = central_crop(image, np.minimum(per_axis, 1.0))
        if (per_axis > 1).any():
            image = pad_to_factor(image, np.maximum(per_axis, 1.0))
    return image
