"""The opt-in CPU bf16 path (`mtseg predict --cpu-bf16`): off by default, close to full precision when on."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

from MultiTaskSegLib.inference import WindowConfig, autocast_context, sliding_window
from MultiTaskSegLib.network import NetworkConfig, ResidualUNet3D

CPU = torch.device("cpu")


def test_default_is_full_precision():
    assert isinstance(autocast_context(CPU), contextlib.nullcontext)
    assert WindowConfig().cpu_bf16 is False
    with autocast_context(CPU, cpu_bf16=True):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


@pytest.mark.slow
def test_cpu_bf16_close_to_fp32():
    torch.manual_seed(0)
    model = ResidualUNet3D(NetworkConfig(out_channels=3, widths=(4, 8, 16))).eval()
    array = np.random.default_rng(0).random((24, 40, 40)).astype(np.float32)
    full = sliding_window(model, array, WindowConfig((16, 16, 16), 0.5, 2), CPU, taps=["enc2"])
    again = sliding_window(model, array, WindowConfig((16, 16, 16), 0.5, 2, cpu_bf16=False), CPU, taps=["enc2"])
    half = sliding_window(model, array, WindowConfig((16, 16, 16), 0.5, 2, cpu_bf16=True), CPU, taps=["enc2"])
    assert torch.equal(full.logits, again.logits)  # the flag off changes nothing
    assert half.logits.dtype == torch.float32 and torch.isfinite(half.logits).all()
    scale = float(full.logits.abs().max())
    assert float((half.logits - full.logits).abs().max()) < 0.1 * scale
    g32, g16 = full.gram["enc2"], half.gram["enc2"]
    assert np.abs(g16 - g32).max() < 0.05 * np.abs(g32).max()
