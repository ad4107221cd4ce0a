"""The MONAI peer: what a user would otherwise run over the same network and weights."""
from __future__ import annotations

import numpy as np


def agreement(ours, theirs, temperature: float) -> dict:
    import torch

    p1 = torch.softmax(ours / temperature, 0)
    p2 = torch.softmax(theirs / temperature, 0)
    a, b = p1.argmax(0), p2.argmax(0)
    dices = {}
    for c in range(1, p1.shape[0]):
        x, y = a == c, b == c
        n = int(x.sum()) + int(y.sum())
        if n:
            dices[c] = 2.0 * int((x & y).sum()) / n
    fg_x, fg_y = a > 0, b > 0
    n_fg = int(fg_x.sum()) + int(fg_y.sum())
    return {"dice_mean": float(np.mean(list(dices.values()))) if dices else 1.0,
            "dice_min": float(min(dices.values())) if dices else 1.0,
            "dice_foreground": 2.0 * int((fg_x & fg_y).sum()) / n_fg if n_fg else 1.0,
            "voxel_agreement": float((a == b).float().mean()),
            "max_abs_prob_diff": float((p1 - p2).abs().max()),
            "max_abs_logit_diff": float((ours - theirs).abs().max())}




def monai_sliding_window(net, array: np.ndarray, window, device, **blending):
    """MONAI's ``sliding_window_inference`` over ``net`` at equal settings: the same window placement
    (ours follows MONAI's) and, unless ``blending`` says otherwise, the same Gaussian blending (our
    sigma = patch/8 map, given to MONAI). ``net`` runs as loaded: an unprepared model is PyTorch's layers."""
    import torch
    from monai.inferers import sliding_window_inference

    from MultiTaskSegLib.inference import autocast_context, gaussian_importance

    gmap = torch.from_numpy(gaussian_importance(window.patch_size)).to(device)
    x = torch.from_numpy(array)[None, None].to(device)
    with torch.inference_mode(), autocast_context(device):
        y = sliding_window_inference(x, tuple(window.patch_size), window.batch_size, lambda t: net(t)[0],
                                     overlap=window.overlap, padding_mode="constant", cval=0.0,
                                     **(blending or {"roi_weight_map": gmap}))
    return y[0].float().cpu()
