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
import torch.nn.functional as F


def merged_log_probs(logits: torch.Tensor, annotated: list[int]) -> torch.Tensor:
    """(K, ...) logits → (1 + len(annotated), ...) log-probabilities with the unannotated merged into 0."""
    log_p = F.log_softmax(logits.float(), dim=0)
    keep = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
    keep[annotated] = True
    keep[0] = False
    rest = torch.logsumexp(log_p[~keep], dim=0, keepdim=True)  # background + unannotated
    return torch.cat([rest, log_p[keep]], dim=0)


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
        log_p = merged_log_probs(logits[b], ann)
        t = remap_target(target[b], ann)
        ce = F.nll_loss(log_p[None], t[None])
        p = log_p.exp()[1:]
        onehot = F.one_hot(t, num_classes=len(ann) + 1).movedim(-1, 0)[1:].float()
        dims = tuple(range(1, p.dim()))
        inter = (p * onehot).sum(dims)
        denom = p.sum(dims) + onehot.sum(dims)
        dice = (2 * inter + 1e-5) / (denom + 1e-5)
        losses.append(ce + dice_weight * (1 - dice.mean()))
    return torch.stack(losses).mean()
