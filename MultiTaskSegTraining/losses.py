"""Losses for partially labelled joint training.

Each dataset annotates only its own structures, yet its images show structures that another
dataset annotates (a cine-MR heart shows the left atrium that only the LGE dataset labels).
The *marginal loss* (Shi et al., MedIA 2021) therefore merges, per sample, the background and
every structure that sample's dataset does not annotate into one "unlabelled" class:
p'(bg) = p(bg) + Σ_{c not annotated} p(c). Cross-entropy and soft Dice are computed on these
merged probabilities, so predicting an unannotated structure where the label says 0 costs
nothing, and nothing pushes it towards background.
"""

from __future__ import annotations

import torch


def merged_log_probs(logits: torch.Tensor, annotated: list[int]) -> torch.Tensor:
    """(K, ...) logits → (1 + len(annotated), ...) log-probabilities with the unannotated merged into 0.

    Straight from the logits: log p(c) = z_c − LSE(z), and the merged channel is LSE over background +
    unannotated (the annotated masked to −inf) − LSE(z): no full log-softmax map, and no boolean gather
    (its backward is an accumulating index_put over the whole map)."""
    logits = logits.float()
    kept = sorted(set(annotated) - {0})
    total = torch.logsumexp(logits, dim=0, keepdim=True)
    mask = torch.zeros(logits.shape[0], dtype=logits.dtype, device=logits.device)
    mask[kept] = -torch.inf
    rest = torch.logsumexp(logits + mask.view(-1, *([1] * (logits.dim() - 1))), dim=0, keepdim=True)
    index = torch.tensor(kept, dtype=torch.long, device=logits.device)
    return torch.cat([rest, logits.index_select(0, index)], dim=0) - total


def remap_target(target: torch.Tensor, annotated: list[int]) -> torch.Tensor:
    """Global label values → index in the merged channels (0 for background)."""
    lut = torch.zeros(int(max(annotated + [0])) + 1, dtype=torch.long, device=target.device)
    for i, v in enumerate(sorted(annotated)):
        lut[v] = i + 1
    return lut[target.long().clamp_max(len(lut) - 1)]


def partial_label_loss(
    logits: torch.Tensor, target: torch.Tensor, annotated: list[list[int]], dice_weight: float = 1.0
) -> torch.Tensor:
    """Marginal cross-entropy + soft Dice, averaged over the batch.

    logits (B, K, *spatial); target (B, *spatial) with global label values; annotated[b] lists
    the output values the dataset of sample b annotates.
    """
    losses = []
    for b in range(logits.shape[0]):
        ann = sorted(annotated[b])
        k = len(ann) + 1
        log_p = merged_log_probs(logits[b], ann).reshape(k, -1)
        t = remap_target(target[b], ann).reshape(-1)
        picked = log_p.gather(0, t[None])[0]  # log p of each voxel's labelled class
        ce = -picked.mean()  # = nll_loss
        # soft Dice per structure: Σ p over its labelled voxels (a scatter, not a one-hot map), Σ p, its count
        inter = torch.zeros(k, dtype=log_p.dtype, device=log_p.device).scatter_add(0, t, picked.exp())[1:]
        count = torch.bincount(t, minlength=k)[1:].to(log_p.dtype)
        denom = log_p[1:].exp().sum(1) + count
        dice = (2 * inter + 1e-5) / (denom + 1e-5)
        losses.append(ce + dice_weight * (1 - dice.mean()))
    return torch.stack(losses).mean()
