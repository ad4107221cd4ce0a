"""Metrics of the trust benchmark: OOD detection per family, risk–coverage and failure detection.

- AUROC and FPR at 95 % TPR: ``ood_baselines.detection_metrics`` (OOD / failure = positive).
- AURC: cases sorted by the score (most trusted first); at coverage k/n the selective risk is
  the mean risk (1 − Dice) of the k most trusted cases; AURC is the mean over k = 1..n. The
  oracle sorts by the true risk; a random order has the expected value = the mean risk.
- Failure: case Dice < 0.5.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .ood_baselines import detection_metrics

FAILURE_DICE = 0.5


def aurc(scores: Sequence[float], risks: Sequence[float]) -> float:
    """Area under the risk–coverage curve; ties broken by order (stable sort)."""
    order = np.argsort(np.asarray(scores, dtype=np.float64), kind="stable")
    r = np.asarray(risks, dtype=np.float64)[order]
    return float((np.cumsum(r) / np.arange(1, len(r) + 1)).mean())


def risk_coverage(scores: Sequence[float], risks: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(np.asarray(scores, dtype=np.float64), kind="stable")
    r = np.asarray(risks, dtype=np.float64)[order]
    n = np.arange(1, len(r) + 1)
    return n / len(r), np.cumsum(r) / n


def failure_table(signals: dict[str, Sequence[float]], dice: Sequence[float]) -> dict:
    """AURC (with oracle and random), and failure AUROC, of every signal (higher = less trustworthy)."""
    d = np.asarray(dice, dtype=np.float64)
    risk = 1.0 - d
    fail = d < FAILURE_DICE
    out = {
        "n_cases": int(len(d)),
        "n_failures": int(fail.sum()),
        "aurc_oracle": aurc(risk, risk),
        "aurc_random": float(risk.mean()),
        "signals": {},
    }
    for name, s in signals.items():
        s = np.asarray(s, dtype=np.float64)
        m = detection_metrics(s[~fail], s[fail])
        out["signals"][name] = {
            "aurc": aurc(s, risk),
            "failure_auroc": m["auroc"],
            "failure_fpr_at_95_tpr": m["fpr_at_95_tpr"],
        }
    return out


def ood_table(scores: dict[str, Sequence[float]], negative: np.ndarray, groups: dict[str, np.ndarray]) -> dict:
    """AUROC / FPR95 of every score for each positive group against the ``negative`` mask."""
    out = {}
    for g, positive in groups.items():
        out[g] = {}
        for name, s in scores.items():
            s = np.asarray(s, dtype=np.float64)
            out[g][name] = detection_metrics(s[negative], s[positive])
    return out
