"""Choosing the bundle's post-processing on the validation cases (never on test cases)."""
from __future__ import annotations

import numpy as np
import torch

from MultiTaskSegLib.inference import WindowConfig, sliding_window
from MultiTaskSegLib.postprocessing import choose_largest_component

from .data import CachedCase


def fit_postprocessing(model: torch.nn.Module, cases: list[CachedCase], window: WindowConfig, device: torch.device,
                       annotated: list[list[int]], n_labels: int) -> dict:
    """The ``postprocessing`` block of bundle.json: which structures keep only their largest component.

    Predictions are made on the canonical grid and restricted to the case's own context, as predict
    restricts to the recognised one; a structure gets the filter when it does not lower its mean
    validation Dice.
    """
    pairs = []
    with torch.inference_mode():
        for case in cases:
            logits = sliding_window(model, case.image.astype(np.float32), window, device).logits
            pred = logits.argmax(0).numpy().astype(np.uint8)
            pred[~np.isin(pred, [0] + list(annotated[case.dataset]))] = 0
            pairs.append((pred, case.label))
    chosen, record = choose_largest_component(pairs, range(1, n_labels + 1))
    return {"largest_component": chosen, "chosen_on": f"{len(cases)} validation cases",
            "validation_dice": {str(k): v for k, v in record.items()}}
