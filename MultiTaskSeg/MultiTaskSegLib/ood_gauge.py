"""Geometry of the OOD gauge, free of Qt so it can be unit-tested.

The Slicer widget only paints what ``gauge_layout`` returns: three coloured bands
(in distribution / borderline / out of distribution) along a 0..1 axis, a score marker,
a threshold marker and two lines of text.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .ood import exceeds

IN_DISTRIBUTION = "in distribution"
BORDERLINE = "borderline"
OUT_OF_DISTRIBUTION = "out of distribution"
UNKNOWN = "no threshold"

COLORS = {IN_DISTRIBUTION: (76, 175, 80), BORDERLINE: (255, 193, 7), OUT_OF_DISTRIBUTION: (229, 57, 53)}

#: Scores in [BORDERLINE_FRACTION · threshold, threshold) are "borderline": close enough to
#: the decision boundary that the user should look at the result more carefully.
BORDERLINE_FRACTION = 0.8


@dataclass(frozen=True)
class Band:
    start: float  # fraction of the gauge width, 0..1
    end: float
    state: str
    color: tuple[int, int, int]


@dataclass(frozen=True)
class GaugeLayout:
    bands: tuple[Band, ...]
    score_position: float  # 0..1 (clamped; the scale always shows the score)
    threshold_position: float
    state: str
    score_text: str
    context_text: str


def classify(score: float, threshold: float, borderline_fraction: float = BORDERLINE_FRACTION) -> str:
    if exceeds(score, threshold):  # the detector's own rule, so gauge and report never disagree
        return OUT_OF_DISTRIBUTION
    if score >= borderline_fraction * threshold:
        return BORDERLINE
    return IN_DISTRIBUTION


def gauge_layout(
    score: float, threshold: float, nearest_context: str = "", borderline_fraction: float = BORDERLINE_FRACTION
) -> GaugeLayout:
    """Band and marker positions for a score, on a scale that puts the threshold at the middle
    unless the score lies further out (then the scale grows so the score stays visible)."""
    if not threshold > 0:
        raise ValueError(f"OOD threshold must be positive, got {threshold}")
    score = max(0.0, float(score))
    context_text = f"resembles: {nearest_context}" if nearest_context else ""
    if not math.isfinite(threshold):  # a bundle trained on one case has no threshold to compare with
        grey = Band(0.0, 1.0, UNKNOWN, (158, 158, 158))
        return GaugeLayout(
            (grey,), 0.5, 1.0, UNKNOWN, f"OOD score {score:.3g} (this model has no OOD threshold)", context_text
        )
    scale = max(2.0 * threshold, 1.1 * score)
    border = borderline_fraction * threshold / scale
    thr = threshold / scale
    bands = (
        Band(0.0, border, IN_DISTRIBUTION, COLORS[IN_DISTRIBUTION]),
        Band(border, thr, BORDERLINE, COLORS[BORDERLINE]),
        Band(thr, 1.0, OUT_OF_DISTRIBUTION, COLORS[OUT_OF_DISTRIBUTION]),
    )
    state = classify(score, threshold, borderline_fraction)
    return GaugeLayout(
        bands,
        min(1.0, score / scale),
        thr,
        state,
        f"OOD score {score:.3g} (threshold {threshold:.3g}): {state}",
        context_text,
    )


def context_description(contexts: list[dict], name: str) -> str:
    """Readable name of a training context, e.g. 'HeartMR (MR, heart)', from the bundle's contexts."""
    for context in contexts:
        if context.get("name") == name:
            details = ", ".join(str(context[k]) for k in ("modality", "region") if context.get(k))
            return f"{name} ({details})" if details else name
    return name


def trust_verdict(is_ood: bool, expected_dice: float | None = None, flag: bool | None = None) -> str:
    """One line for the user from the predict report's ``ood`` and ``quality`` blocks, e.g.
    'expected Dice 0.62 — review before use'. Without a quality model (older bundles) only the OOD verdict."""
    if expected_dice is None:
        return "out of distribution — review before use" if is_ood else "in distribution"
    text = f"expected Dice {expected_dice:.2f}"
    if is_ood:
        return f"out of distribution, {text} — review before use"
    return f"{text} — review before use" if flag else f"{text} — no warning"
