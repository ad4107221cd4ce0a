"""A 3D residual U-Net whose intermediate feature maps can be tapped by name.

Tapping returns activations produced by the same forward pass, so the OOD signature costs
no second pass. Layer names: ``enc0`` … ``enc{depth-1}`` (encoder, ``enc{depth-1}`` is the
bottleneck) and ``dec{depth-2}`` … ``dec0`` (decoder, ``dec0`` at full resolution).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterable, cast

import torch
import torch.nn.functional as F
from torch import nn

from . import fast_inference as fast


@dataclass
class NetworkConfig:
    in_channels: int = 1
    out_channels: int = 2
    widths: tuple[int, ...] = (8, 16, 32, 64, 128)
    blocks_per_level: int = 1
    dropout: float = 0.1  # in the deeper levels; enables MC dropout at inference
    n_contexts: int = 0  # >0 adds a context-classification head on the bottleneck

    def to_dict(self) -> dict:
        return {
            "name": "ResidualUNet3D",
            **{k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()},
        }

    @classmethod
    def from_dict(cls, d: dict) -> "NetworkConfig":
        d = {k: v for k, v in d.items() if k != "name"}
        d["widths"] = tuple(d["widths"])
        return cls(**d)


class ResBlock(nn.Module):
    cpu_kernels = False  # fast_inference.enable_cpu_kernels switches it on for inference

    def __init__(self, cin: int, cout: int, stride: int = 1, dropout: float = 0.0):
        super().__init__()
        self.conv1 = nn.Conv3d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.norm1 = nn.InstanceNorm3d(cout, affine=True)
        self.conv2 = nn.Conv3d(cout, cout, 3, padding=1, bias=False)
        self.norm2 = nn.InstanceNorm3d(cout, affine=True)
        self.drop = nn.Dropout3d(dropout) if dropout > 0 else nn.Identity()
        self.skip = None
        if stride != 1 or cin != cout:
            self.skip = nn.Sequential(
                nn.Conv3d(cin, cout, 1, stride=stride, bias=False), nn.InstanceNorm3d(cout, affine=True)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fast.use_fast_path(x, self):
            return self._forward_fast(x)
        y = F.leaky_relu(self.norm1(self.conv1(x)), 0.01)
        y = self.drop(y)
        y = self.norm2(self.conv2(y))
        s = x if self.skip is None else self.skip(x)
        return F.leaky_relu(y + s, 0.01)

    def _forward_fast(self, x: torch.Tensor) -> torch.Tensor:
        """The same block for CPU inference (fast_inference.py): channels-last, in place."""
        y = F.leaky_relu_(fast.instance_norm_(fast.conv(self.conv1, x), self.norm1), 0.01)
        y = self.drop(y)
        y = fast.instance_norm_(fast.conv(self.conv2, y), self.norm2)
        if self.skip is None:
            return F.leaky_relu_(y.add_(x), 0.01)
        conv, norm = cast(nn.Conv3d, self.skip[0]), cast(nn.InstanceNorm3d, self.skip[1])
        s = fast.conv1x1(x, conv) if conv.stride == (1, 1, 1) else fast.conv(conv, x)
        return F.leaky_relu_(y.add_(fast.instance_norm_(s, norm)), 0.01)


class ResidualUNet3D(nn.Module):
    cpu_kernels = False  # fast_inference.enable_cpu_kernels switches it on for inference

    def __init__(self, config: NetworkConfig):
        super().__init__()
        self.config = config
        w = config.widths
        depth = len(w)
        self.encoders = nn.ModuleList()
        for i in range(depth):
            cin = config.in_channels if i == 0 else w[i - 1]
            drop = config.dropout if i >= depth - 2 else 0.0
            blocks = [ResBlock(cin, w[i], stride=1 if i == 0 else 2, dropout=drop)]
            blocks += [ResBlock(w[i], w[i], dropout=drop) for _ in range(config.blocks_per_level - 1)]
            self.encoders.append(nn.Sequential(*blocks))
        self.ups = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for i in range(depth - 2, -1, -1):
            self.ups.append(nn.ConvTranspose3d(w[i + 1], w[i], 2, stride=2))
            drop = config.dropout if i >= depth - 2 else 0.0
            self.decoders.append(ResBlock(2 * w[i], w[i], dropout=drop))
        self.head = nn.Conv3d(w[0], config.out_channels, 1)
        self.context_head = nn.Linear(w[-1], config.n_contexts) if config.n_contexts > 0 else None

    @property
    def layer_names(self) -> list[str]:
        depth = len(self.config.widths)
        return [f"enc{i}" for i in range(depth)] + [f"dec{i}" for i in range(depth - 2, -1, -1)]

    @property
    def divisor(self) -> int:
        """Spatial sizes must be multiples of this."""
        return 2 ** (len(self.config.widths) - 1)

    def forward(self, x: torch.Tensor, taps: Iterable[str] = ()) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Return logits and a dict with the tapped feature maps (plus ``context`` logits when a head exists)."""
        taps = set(taps)
        features: dict[str, torch.Tensor] = {}
        skips = []
        depth = len(self.config.widths)
        for i, enc in enumerate(self.encoders):
            x = enc(x)
            if f"enc{i}" in taps:
                features[f"enc{i}"] = x
            skips.append(x)
        if self.context_head is not None:
            features["context"] = self.context_head(x.mean(dim=(2, 3, 4)))
        quick = fast.use_fast_path(x, self)
        for j, (up, dec) in enumerate(zip(self.ups, self.decoders)):
            i = depth - 2 - j
            x = dec(
                fast.up_cat(cast(nn.ConvTranspose3d, up), x, skips[i]) if quick else torch.cat([up(x), skips[i]], dim=1)
            )
            if f"dec{i}" in taps:
                features[f"dec{i}"] = x
        logits = fast.conv1x1(x, self.head, channels_first_out=True) if quick else self.head(x)
        return logits, features


def build_network(config: NetworkConfig) -> ResidualUNet3D:
    return ResidualUNet3D(config)


def enable_mc_dropout(model: nn.Module, enabled: bool = True) -> None:
    """Keep dropout layers stochastic while everything else stays in eval mode."""
    for m in model.modules():
        if isinstance(m, (nn.Dropout, nn.Dropout3d)):
            m.train(enabled)
