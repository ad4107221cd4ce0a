"""Fitting the OOD detector and the quality model from trust records of train + validation cases.

Used by `mtseg finalise` (the bundle's detector and quality model) and by the trust benchmark
(which fits exactly the same way on its ``fit`` / ``fit_shift`` families and scores the rest).

- Detector: per-context kNN on the concatenated log-spectrum signatures of ``layers``; each
  context's distance scale is the mean leave-one-patient-out nearest-neighbour distance within
  it, shrunk towards the pooled mean (``PRIOR_CASES`` pseudo-cases) so a context with two
  cases is not trusted blindly. By default the distance is taken to the recognised context's
  signatures only and combined with the context head's confidence: exp of the mean of their
  z-scores on the log scale of the fit cases. The threshold is the conformal (1 − α) quantile
  of the leave-one-patient-out scores of the clean fit cases: about α false alarms on new
  cases of the same distribution.
- Quality: a logistic model of the per-structure Dice on ``FIT_FEATURES`` (OOD z =
  leave-one-case-out score / threshold, so a case is never scored against itself), fitted
  on clean and corrupted fit cases by minimising the soft-label cross-entropy with a small
  L2 penalty.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from MultiTaskSegLib.ood import EPS, SpectralDetector
from MultiTaskSegLib.quality import DIRECTION, FEATURES, QualityModel

from .data import patient_group

PRIOR_CASES = 3.0
TARGET_FALSE_ALARMS = 0.05


def case_of(rec: dict) -> str:
    """The case a record belongs to (a corrupted variant belongs to its clean case)."""
    return rec["key"].split("/", 1)[1].split("__")[1]


def patient_of(rec: dict) -> str:
    """The patient a record belongs to: leave-one-out must hold out a whole patient (ACDC's two frames of
    one heart are near-identical signatures; leaving out one frame would let the other stand in for it)."""
    return patient_group(case_of(rec))


def case_dice(rec: dict) -> float | None:
    values = [v for v in (rec.get("dice") or {}).values() if v is not None]
    return float(np.mean(values)) if values else None


def signature_rows(recs: Sequence[dict], layers: Sequence[str]) -> np.ndarray:
    return np.stack([np.concatenate([np.asarray(r["signatures"][k], dtype=np.float64) for k in layers]) for r in recs])


def conformal_quantile(values: np.ndarray, alpha: float) -> float:
    """The ⌈(n+1)(1−α)⌉-th smallest value (the largest when that exceeds n)."""
    v = np.sort(np.asarray(values, dtype=np.float64))
    k = min(int(math.ceil((len(v) + 1) * (1 - alpha))), len(v))
    return float(v[k - 1])


def record_context(rec: dict) -> tuple[int | None, float | None]:
    """(recognised context, the context head's probability for it) of a record, as `predict` sees them."""
    probs = rec.get("context_probs")
    if probs is None:
        return None, None
    return int(rec["recognised"]), float(probs[rec["recognised"]])


def _log_stats(values: np.ndarray) -> list[float]:
    """[median, spread] of log values: the scale the combined score puts each signal on."""
    logs = np.log(np.maximum(np.asarray(values, dtype=np.float64), EPS))
    return [float(np.median(logs)), float(max(logs.std(), 1e-3))]


def fit_detector(
    fit_recs: Sequence[dict],
    layers: Sequence[str],
    context_names: list[str],
    alpha: float = TARGET_FALSE_ALARMS,
    conditioning: str = "recognised",
    with_confidence: bool = True,
    per_context: bool = True,
) -> tuple[SpectralDetector, np.ndarray]:
    """(detector, leave-one-patient-out score of every fit record) from clean fit records.

    ``conditioning="recognised"`` scores against the recognised context's signatures only;
    ``with_confidence`` combines that distance with the context head's confidence (records without
    context probabilities, e.g. a head-less bundle, leave the spectral score alone). ``per_context`` gives a
    context whose own leave-one-out scores run above the global threshold a threshold of its own (as
    ``context_factor``), so its in-distribution cases are not flagged more often than the others'."""
    sig = signature_rows(fit_recs, layers)
    ctx = np.asarray([r["context"] for r in fit_recs])
    groups = np.asarray([case_of(r) for r in fit_recs])
    patients = np.asarray([patient_of(r) for r in fit_recs])
    det = SpectralDetector(
        sig.astype(np.float32), ctx, groups, context_names, list(layers), None, math.inf, conditioning=conditioning
    )
    det.signatures = sig  # float64 while fitting
    d = np.sqrt(np.maximum(((sig[:, None] - sig[None]) ** 2).sum(-1), 0.0))
    d[patients[:, None] == patients[None]] = np.inf
    within = np.where(ctx[:, None] == ctx[None], d, np.inf).min(1)
    finite = np.isfinite(within)
    pooled = float(within[finite].mean()) if finite.any() else 1.0
    scale = np.full(len(context_names), pooled)
    for k in range(len(context_names)):
        mine = within[(ctx == k) & finite]
        scale[k] = (mine.sum() + PRIOR_CASES * pooled) / (len(mine) + PRIOR_CASES)
    det.context_scale = scale
    heads = [record_context(r) for r in fit_recs]
    distance = np.asarray(
        [det.spectral_distance(sig[i], heads[i][0], exclude=patients == patients[i])[0] for i in range(len(sig))]
    )
    confidences = [c for _, c in heads if c is not None]
    if with_confidence and confidences:
        finite = np.isfinite(distance)
        det.combination = {
            "spectral": _log_stats(distance[finite]),
            "confidence": _log_stats(1.0 - np.asarray(confidences)),
        }
    loo = np.asarray([det.combined(x, c) for x, (_, c) in zip(distance, heads)])
    det.threshold = conformal_quantile(loo[np.isfinite(loo)], alpha)
    if per_context and math.isfinite(det.threshold) and det.threshold > 0:
        # a context whose own cases score higher gets its own (higher) threshold, as a factor on its scores
        recognised = np.asarray([-1 if h is None else h for h, _ in heads])
        factor = np.ones(len(context_names))
        for k in range(len(context_names)):
            mine = loo[(recognised == k) & np.isfinite(loo)]
            if len(mine):
                factor[k] = det.threshold / max(det.threshold, conformal_quantile(mine, alpha))
        det.context_factor = factor
        loo = np.asarray([det.combined(x, c, h) for x, (h, c) in zip(distance, heads)])
    det.signatures = sig.astype(np.float32)
    return det, loo


def loo_scores(det: SpectralDetector, recs: Sequence[dict]) -> np.ndarray:
    """Scores of records whose clean case may be among the detector's signatures: that patient left out."""
    sig = signature_rows(recs, det.layers)
    patients = np.asarray([patient_group(str(c)) for c in det.case_ids])
    out = []
    for s, r in zip(sig, recs):
        context, confidence = record_context(r)
        distance, _ = det.spectral_distance(s, context, exclude=patients == patient_of(r))
        out.append(det.combined(distance, confidence, context))
    return np.asarray(out)


def record_scores(det: SpectralDetector, recs: Sequence[dict]) -> np.ndarray:
    """Scores of records of cases the detector was not fitted on (test split, OOD volumes)."""
    sig = signature_rows(recs, det.layers)
    return np.asarray([det.score(s, *record_context(r)).score for s, r in zip(sig, recs)])


def quality_rows(
    recs: Sequence[dict],
    ood_scores: Sequence[float],
    threshold: float,
    model: QualityModel,
    names: dict[int, str],
    context_labels: list[list[int]],
) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Feature rows and Dice targets of every (record, structure of the recognised context that the
    record's dataset annotates); the third list maps rows to records."""
    rows, target, owner = [], [], []
    for i, (r, s) in enumerate(zip(recs, ood_scores)):
        conf = r["context_probs"][r["recognised"]] if r.get("context_probs") is not None else 1.0
        for v, d in (r.get("dice") or {}).items():
            if d is None or int(v) not in context_labels[r["recognised"]]:
                continue  # a structure `predict` would not output for this context has no estimate
            rows.append(model.feature_row(r["evidence"][v], names[int(v)], s / threshold, conf))
            target.append(d)
            owner.append(i)
    return np.asarray(rows, dtype=np.float64).reshape(-1, len(model.features)), np.asarray(target), owner


def log_volume_stats(fit_recs: Sequence[dict], names: dict[int, str]) -> dict[str, list[float]]:
    """Per structure name: mean and std of log predicted volume over clean fit cases that annotate it."""
    values: dict[str, list[float]] = {}
    for r in fit_recs:
        for v in r.get("dice") or {}:
            ml = r["evidence"].get(v, {}).get("volume_ml", 0.0)
            if ml > 0:
                values.setdefault(names[int(v)], []).append(math.log(ml))
    return {k: [float(np.mean(x)), float(np.std(x)) if len(x) > 1 else 1.0] for k, x in values.items()}


# The features the shipped quality model is fitted on: every one predict computes except the soft Dice. The
# fit cases are mostly images the network trained on, where its soft and hard masks agree whatever the true
# Dice; fitted with it, the model leaned on it and ranked the validation cases (images the network never
# trained on) worse than without it, on the run-3 and run-4 records alike (scripts/quality_cv.py
# --validation-holdout; docs/RESULTS.md, Trust).
FIT_FEATURES = tuple(f for f in FEATURES if f != "soft_dice")


def fit_quality(
    recs: Sequence[dict],
    ood_scores: Sequence[float],
    threshold: float,
    volume: dict,
    names: dict[int, str],
    context_labels: list[list[int]],
    l2: float = 1e-2,
    fitted_on: str = "",
    features: Sequence[str] = FIT_FEATURES,
    monotone: bool = True,
) -> QualityModel:
    from scipy.optimize import minimize

    k = len(features)
    model = QualityModel([0.0] * k, 0.0, [0.0] * k, [1.0] * k, volume, features=list(features), fitted_on=fitted_on)
    x, y, _ = quality_rows(recs, ood_scores, threshold, model, names, context_labels)
    if len(x) < k + 2:
        raise ValueError(f"only {len(x)} labelled structures to fit the quality model on")
    mean, scale = x.mean(0), x.std(0)
    scale = np.where(scale > 1e-9, scale, 1.0)
    z = (x - mean) / scale
    y = np.clip(y, 1e-3, 1 - 1e-3)

    def loss(w: np.ndarray) -> tuple[float, np.ndarray]:
        logit = z @ w[:-1] + w[-1]
        p = 1.0 / (1.0 + np.exp(-logit))
        eps = 1e-9
        ce = -(y * np.log(p + eps) + (1 - y) * np.log(1 - p + eps)).mean() + l2 * (w[:-1] ** 2).sum()
        grad = np.concatenate([z.T @ (p - y) / len(y) + 2 * l2 * w[:-1], [(p - y).mean()]])
        return float(ce), grad

    # each coefficient within its evidence's sign (quality.DIRECTION) unless ``monotone`` is off; the intercept is free
    bounds = [((0.0, None) if DIRECTION[f] > 0 else (None, 0.0)) if monotone else (None, None) for f in features]
    bounds.append((None, None))
    w = minimize(loss, np.zeros(k + 1), jac=True, method="L-BFGS-B", bounds=bounds).x
    model.coef, model.intercept = [float(v) for v in w[:-1]], float(w[-1])
    model.mean, model.scale = [float(v) for v in mean], [float(v) for v in scale]
    return model


def fit_detector_quality(
    det: SpectralDetector,
    loo_refs: np.ndarray,
    fit: Sequence[dict],
    fit_shift: Sequence[dict],
    names: dict[int, str],
    context_labels: list[list[int]],
) -> QualityModel:
    """The quality model that goes with a detector fitted on ``fit`` (first) and any further references
    (``loo_refs``: their leave-one-patient-out scores, in that order): learnt from the clean fit cases and their
    corrupted variants only; reframed references are not cases whose Dice it could learn."""
    return fit_quality(
        list(fit) + list(fit_shift),
        np.concatenate([loo_refs[: len(fit)], loo_scores(det, fit_shift)]),
        det.threshold,
        log_volume_stats(fit, names),
        names,
        context_labels,
        fitted_on=f"{len(fit)} train/val cases + {len(fit_shift)} corrupted variants",
    )
