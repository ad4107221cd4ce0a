"""Spectral out-of-distribution detection.

An image's signature is the spectrum of a feature map: reshape it to (voxels × channels),
take the singular values s, and use log(s) / ||log(s)||₂ (several layers are concatenated).
The feature matrix is divided by sqrt(number of voxels) first, i.e. the spectrum of the
feature covariance, so the signature does not grow with the image size (the original method
used raw singular values; see docs/RESULTS.md for what this changes).
The score of an image is the Euclidean distance to the nearest training signature; the
default threshold is mean + 2.5·std of the leave-one-out nearest-neighbour distances among
the training signatures. Nothing here looks at ground truth.

Bundles fitted by `mtseg finalise` refine this (``SpectralDetector``): the distance is taken to the
signatures of the context the network recognised, in units of that context's typical distance,
and may be combined with the context head's confidence (both put on the log scale of the fit
cases), because the spectrum catches artefacts and the confidence catches a wrong anatomy or
sequence (docs/RESULTS.md, Trust).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

EPS = 1e-6


def singular_values_from_gram(gram: np.ndarray) -> np.ndarray:
    """Singular values (descending) of a matrix X given its Gram matrix XᵀX."""
    eig = np.linalg.eigvalsh(np.asarray(gram, dtype=np.float64))
    return np.sqrt(np.clip(eig, 0.0, None))[::-1]


def signature_from_singular_values(s: np.ndarray, length: int | None = None) -> np.ndarray:
    s = np.asarray(s, dtype=np.float64)[:length]
    log_s = np.log(np.maximum(s, EPS))
    norm = np.linalg.norm(log_s)
    return log_s / norm if norm > 0 else log_s


def signature_from_features(features: np.ndarray, length: int | None = None) -> np.ndarray:
    """Reference implementation on a (C, *spatial) feature map, via a direct SVD."""
    c = features.shape[0]
    matrix = features.reshape(c, -1).T / np.sqrt(features[0].size)
    return signature_from_singular_values(np.linalg.svd(matrix, compute_uv=False), length)


def signature_from_grams(grams: dict[str, np.ndarray], layers: Sequence[str], length: int | None = None) -> np.ndarray:
    """Concatenated signature of several layers, from their (normalised) Gram matrices."""
    return np.concatenate([signature_from_singular_values(singular_values_from_gram(grams[k]), length) for k in layers])


def nearest_neighbour_distances(
    a: np.ndarray, b: np.ndarray, exclude_self: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """For each row of a: distance to and index of its nearest row of b."""
    d = np.sqrt(np.maximum(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1), 0.0))
    if exclude_self:
        np.fill_diagonal(d, np.inf)
    idx = d.argmin(1)
    return d[np.arange(len(a)), idx], idx


def case_groups(case_ids: Sequence[str]) -> np.ndarray:
    """Augmented variants (``case#augK``) belong to their case."""
    return np.asarray([str(c).split("#")[0] for c in case_ids])


def loo_distances(signatures: np.ndarray, groups: Sequence[str] | None = None) -> np.ndarray:
    """Leave-one-out nearest-neighbour distance of every training signature.

    With ``groups``, all signatures of the same case are left out together: otherwise a case's
    nearest neighbour would be its own augmented variant, and the threshold far too tight.
    """
    d = np.sqrt(np.maximum(((signatures[:, None, :] - signatures[None, :, :]) ** 2).sum(-1), 0.0))
    same = np.eye(len(signatures), dtype=bool)
    if groups is not None:
        g = np.asarray(groups)
        same |= g[:, None] == g[None, :]
    d[same] = np.inf
    return d.min(1)


def loo_threshold(signatures: np.ndarray, k_std: float = 2.5, groups: Sequence[str] | None = None) -> float:
    """mean + k·std of the leave-one-(case-)out nearest-neighbour distances among training signatures."""
    if len(signatures) < 2 or (groups is not None and len(set(groups)) < 2):
        raise ValueError("at least two training cases are needed to set a threshold")
    d = loo_distances(signatures, groups)
    return float(d.mean() + k_std * d.std())


def exceeds(score: float, threshold: float) -> bool:
    """THE flag rule, shared by the detector, the gauge and the quality flag: strictly above the threshold."""
    return bool(score > threshold)


@dataclass
class OODResult:
    score: float
    threshold: float
    is_ood: bool
    nearest_context: str
    nearest_case: str
    detector: str

    def to_dict(self) -> dict:
        threshold = self.threshold if np.isfinite(self.threshold) else None  # None: no threshold could be set
        return {
            "score": self.score,
            "threshold": threshold,
            "is_ood": self.is_ood,
            "nearest_context": self.nearest_context,
            "nearest_case": self.nearest_case,
            "detector": self.detector,
        }


@dataclass
class SpectralDetector:
    """Nearest training signature; with ``context_scale`` the distance to each context's nearest signature
    is divided by that context's typical leave-one-case-out distance first (per-context kNN), so a
    tight context (many similar cases) and a loose one (few, varied cases) get the same false-alarm rate."""

    signatures: np.ndarray  # (N, D)
    context_index: np.ndarray  # (N,)
    case_ids: np.ndarray  # (N,) str
    context_names: list[str]
    layers: list[str]
    spectrum_length: int | None
    threshold: float
    context_scale: np.ndarray | None = None  # (K,) per-context distance scale; None = plain nearest neighbour
    conditioning: str = "any"  # "recognised": only the signatures of the context the network recognised
    # log-scale (median, spread) of the fit cases' spectral scores and of 1 − context confidence: with it the
    # score is exp(mean of the two z-scores), 1 for a typical training case (None = the spectral score alone)
    combination: dict | None = None
    # (K,) per-context factor on the score: the global threshold over that context's own conformal threshold of
    # its leave-one-patient-out fit scores, where that is higher (≤ 1). A context with few training cases has
    # larger nearest-neighbour distances and a less confident head, so its in-distribution cases score higher
    # (None = one threshold for every context)
    context_factor: np.ndarray | None = None

    @property
    def name(self) -> str:
        kind = "spectral-ctx" if self.context_scale is not None else "spectral"
        if self.conditioning == "recognised":
            kind += "-recognised"
        if self.combination is not None:
            kind += "+confidence"
        return f"{kind}:" + "+".join(self.layers)

    def signature(self, grams: dict[str, np.ndarray]) -> np.ndarray:
        return signature_from_grams(grams, self.layers, self.spectrum_length)

    def nearest(self, signature: np.ndarray, exclude: np.ndarray | None = None) -> tuple[float, int]:
        """(score, index of the nearest training signature); ``exclude`` masks training rows out."""
        d = np.sqrt(np.maximum(((self.signatures - signature[None]) ** 2).sum(1), 0.0))
        if exclude is not None:
            d = np.where(exclude, np.inf, d)
        if self.context_scale is not None:
            d = d / self.context_scale[self.context_index]
        i = int(np.argmin(d))
        return float(d[i]), i

    def spectral_distance(
        self, signature: np.ndarray, context: int | None = None, exclude: np.ndarray | None = None
    ) -> tuple[float, int]:
        """``nearest``, restricted to the recognised ``context``'s signatures when the detector is conditioned
        on it (all signatures when that context has none left, e.g. a one-patient context left out)."""
        if self.conditioning == "recognised" and context is not None:
            other = self.context_index != context
            mask = other if exclude is None else other | exclude
            if not mask.all():
                return self.nearest(signature, mask)
        return self.nearest(signature, exclude)

    def combined(self, distance: float, confidence: float | None, context: int | None = None) -> float:
        """The score from the spectral distance and the context head's confidence (see ``combination``),
        times the recognised ``context``'s factor (see ``context_factor``)."""
        factor = 1.0
        if self.context_factor is not None and context is not None:
            factor = float(self.context_factor[context])
        if self.combination is None:
            return distance * factor
        med, spread = self.combination["spectral"]
        z = [(math.log(max(distance, EPS)) - med) / spread]
        if confidence is not None:  # no context head: the spectral z alone
            med, spread = self.combination["confidence"]
            z.append((math.log(max(1.0 - confidence, EPS)) - med) / spread)
        return math.exp(sum(z) / len(z)) * factor

    def score(self, signature: np.ndarray, context: int | None = None, confidence: float | None = None) -> OODResult:
        """``context``: the recognised context's index; ``confidence``: the context head's probability for it."""
        distance, i = self.spectral_distance(signature, context)
        score = self.combined(distance, confidence, context)
        return OODResult(
            score,
            self.threshold,
            exceeds(score, self.threshold),
            self.context_names[int(self.context_index[i])],
            str(self.case_ids[i]),
            self.name,
        )
