"""Training signatures for the spectral OOD detector, computed exactly as at inference."""

from __future__ import annotations

import numpy as np
import torch

from MultiTaskSegLib.fast_inference import enable_cpu_kernels
from MultiTaskSegLib.inference import WindowConfig, sliding_window
from MultiTaskSegLib.ood import signature_from_grams

from .data import CachedCase


def _variant(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A plausible other acquisition of the same case: a smaller field of view and another contrast."""
    shape = np.array(image.shape)
    keep = np.maximum((shape * rng.uniform(0.6, 0.95, 3)).astype(int), np.minimum(shape, 16))
    start = [int(rng.integers(0, s - k + 1)) for s, k in zip(shape, keep)]
    crop = image[tuple(slice(a, a + k) for a, k in zip(start, keep))].astype(np.float32)
    gamma = float(np.exp(rng.uniform(-0.3, 0.3)))
    return np.clip(crop, 0, None) ** gamma


def case_signatures(
    model: torch.nn.Module,
    cases: list[CachedCase],
    window: WindowConfig,
    device: torch.device,
    layers: list[str],
    length: int | None,
    augmentations: int = 0,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Signatures of every case (plus ``augmentations`` variants each): (N×D, context index, case ids)."""
    rng = np.random.default_rng(seed + 17)
    rows, contexts, ids = [], [], []
    enable_cpu_kernels(model.eval())  # the kernels the Predictor runs: signatures exactly as at inference
    for case in cases:
        variants = [("", case.image.astype(np.float32))]
        variants += [(f"#aug{k + 1}", _variant(case.image, rng)) for k in range(augmentations)]
        for suffix, image in variants:
            result = sliding_window(model, image, window, device, layers)
            rows.append(signature_from_grams(result.gram, layers, length))
            contexts.append(case.dataset)
            ids.append(case.case_id + suffix)
    return np.stack(rows), np.asarray(contexts), ids
