"""Validation-split predictions: the Dice curve during training and the bundle's post-processing."""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from MultiTaskSegLib.inference import WindowConfig, sliding_window
from MultiTaskSegLib.postprocessing import choose_largest_component, dice

from .data import CachedCase


def validation_predictions(
    model: torch.nn.Module,
    cases: list[CachedCase],
    window: WindowConfig,
    device: torch.device,
    annotated: list[list[int]],
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(prediction, reference) label arrays on the canonical grid, the prediction restricted to the
    case's own context as predict restricts to the recognised one."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for case in cases:
                logits = sliding_window(model, case.image.astype(np.float32), window, device).logits
                pred = logits.argmax(0).numpy().astype(np.uint8)
                pred[~np.isin(pred, [0] + list(annotated[case.dataset]))] = 0
                yield pred, case.label
    finally:
        model.train(was_training)


def validation_dice(
    model: torch.nn.Module,
    cases: list[CachedCase],
    window: WindowConfig,
    device: torch.device,
    annotated: list[list[int]],
    names: list[str],
) -> dict[str, float]:
    """Mean Dice per structure over the validation cases whose dataset annotates it (plus ``mean``)."""
    scores: dict[str, list[float]] = {}
    for case, (pred, ref) in zip(cases, validation_predictions(model, cases, window, device, annotated)):
        for v in annotated[case.dataset]:
            scores.setdefault(names[v - 1], []).append(dice(pred == v, ref == v))
    out = {k: float(np.mean(v)) for k, v in scores.items()}
    if out:
        out["mean"] = float(np.mean(list(out.values())))
    return out


def fit_postprocessing(
    model: torch.nn.Module,
    cases: list[CachedCase],
    window: WindowConfig,
    device: torch.device,
    annotated: list[list[int]],
    n_labels: int,
) -> dict:
    """The ``postprocessing`` block of bundle.json: which structures keep only their largest component
    (those whose mean validation Dice it does not lower)."""
    pairs = list(validation_predictions(model, cases, window, device, annotated))
    chosen, record = choose_largest_component(pairs, range(1, n_labels + 1))
    return {
        "largest_component": chosen,
        "chosen_on": f"{len(cases)} validation cases",
        "validation_dice": {str(k): v for k, v in record.items()},
    }
