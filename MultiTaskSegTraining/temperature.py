"""Temperature scaling fitted on the validation cases (never on test cases)."""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import minimize_scalar

from MultiTaskSegLib.fast_inference import enable_cpu_kernels
from MultiTaskSegLib.inference import WindowConfig, sliding_window

from .data import CachedCase
from .losses import merged_log_probs, remap_target


def fit_temperature(
    model: torch.nn.Module,
    cases: list[CachedCase],
    window: WindowConfig,
    device: torch.device,
    annotated: list[list[int]],
    max_voxels: int = 200_000,
    seed: int = 0,
) -> tuple[float, float | None]:
    """The T > 0 minimising the (partial-label) NLL of softmax(logits / T) on validation voxels.

    Returns (1.0, None) when there is no validation case.
    """
    if not cases:
        return 1.0, None
    rng = np.random.default_rng(seed)
    enable_cpu_kernels(model)  # the logits the Predictor computes
    samples = []
    for case in cases:
        logits = sliding_window(model, case.image.astype(np.float32), window, device).logits
        flat = logits.reshape(logits.shape[0], -1)
        label = torch.from_numpy(case.label.reshape(-1).astype(np.int64))
        # every foreground voxel (up to the cap) and as many background voxels: the boundary matters
        fg = np.flatnonzero(case.label.reshape(-1) > 0)
        bg = np.flatnonzero(case.label.reshape(-1) == 0)
        n = max_voxels // (2 * len(cases))
        idx = np.concatenate(
            [
                rng.choice(fg, min(n, len(fg)), replace=False) if len(fg) else fg,
                rng.choice(bg, min(n, len(bg)), replace=False),
            ]
        )
        samples.append((flat[:, idx], label[idx], annotated[case.dataset]))

    def nll(log_t: float) -> float:
        t = float(np.exp(log_t))
        total, count = 0.0, 0
        for logits, label, ann in samples:
            lp = merged_log_probs(logits / t, ann)
            target = remap_target(label, ann)
            total += float(-lp.gather(0, target[None]).sum())
            count += len(target)
        return total / count

    with torch.inference_mode():
        result = minimize_scalar(nll, bounds=(np.log(0.25), np.log(8.0)), method="bounded", options={"xatol": 1e-3})
    return float(np.exp(result.x)), float(result.fun)
