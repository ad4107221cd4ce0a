"""Voxelwise uncertainty: normalised predictive entropy after temperature scaling."""
from __future__ import annotations

import numpy as np
import torch


def softmax_with_temperature(logits: torch.Tensor, temperature: float = 1.0, dim: int = 0) -> torch.Tensor:
    return torch.softmax(logits / float(temperature), dim=dim)


def normalised_entropy(probs: torch.Tensor, dim: int = 0, n_classes: int | None = None) -> torch.Tensor:
    """Predictive entropy divided by log(n_classes): 0 = certain, 1 = uniform over the classes."""
    n = n_classes or probs.shape[dim]
    if n < 2:
        return torch.zeros_like(probs.select(dim, 0))
    p = probs.clamp_min(1e-12)
    h = -(probs * torch.log(p)).sum(dim=dim)
    return (h / np.log(n)).clamp_(0.0, 1.0)


def restrict_to_classes(probs: torch.Tensor, allowed: list[int]) -> torch.Tensor:
    """Zero the classes outside ``allowed`` (background always allowed) and renormalise.

    Renormalising (rather than moving the mass to background) lets a voxel that the joint
    model confused with another context's structure fall back on this context's structures.
    """
    mask = torch.zeros(probs.shape[0], dtype=probs.dtype)
    mask[list(allowed)] = 1.0
    mask[0] = 1.0
    out = probs * mask.view(-1, *([1] * (probs.dim() - 1)))
    return out / out.sum(0, keepdim=True).clamp_min(1e-12)
