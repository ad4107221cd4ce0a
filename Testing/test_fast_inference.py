"""The CPU inference kernels (fast_inference.py) against the training layers, constant-window
reuse against recomputing every window, and MONAI's window placement."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from MultiTaskSegLib import fast_inference as fast
from MultiTaskSegLib.inference import WindowConfig, sliding_window, window_starts
from MultiTaskSegLib.network import NetworkConfig, ResidualUNet3D, enable_mc_dropout

CPU = torch.device("cpu")


def _random_network(seed: int = 0, dropout: float = 0.0) -> ResidualUNet3D:
    """Every parameter random, norm affines and biases included (a fresh network has trivial ones)."""
    torch.manual_seed(seed)
    model = ResidualUNet3D(NetworkConfig(out_channels=5, widths=(4, 8, 16), dropout=dropout, n_contexts=3))
    with torch.no_grad():
        for name, p in model.named_parameters():
            spread = 0.3 if "weight" in name and p.dim() > 1 else 0.5  # kernels smaller than norm affines
            centre = 1.0 if "norm" in name and "weight" in name else 0.0  # norm scales around 1
            p.copy_(torch.randn_like(p) * spread + centre)
    return model.eval()


@pytest.mark.parametrize("shape,batch", [((16, 24, 32), 1), ((20, 12, 16), 3)])
@pytest.mark.parametrize("weights_channels_last", [False, True])
def test_fast_forward_equals_training_layers(shape, batch, weights_channels_last):
    model = _random_network()
    x = torch.randn(batch, 1, *shape) * 2 + 1
    taps = model.layer_names
    with torch.enable_grad():  # the plain layers (the path training takes)
        ref, ref_feats = model(x, taps=taps)
    model = fast.prepare_for_cpu_inference(model) if weights_channels_last else fast.enable_cpu_kernels(model)
    with torch.inference_mode():
        assert fast.use_fast_path(x, model)
        out, feats = model(x, taps=taps)
    assert out.is_contiguous() and out.shape == ref.shape
    torch.testing.assert_close(out, ref.detach(), rtol=1e-4, atol=1e-4)
    for name in [*taps, "context"]:
        torch.testing.assert_close(feats[name], ref_feats[name].detach(), rtol=1e-4, atol=1e-4)


def test_instance_norm_is_exact_far_from_zero_mean():
    """Centring before the sum of squares: no cancellation when the mean dwarfs the spread."""
    norm = torch.nn.InstanceNorm3d(6, affine=True)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2.0)
        norm.bias.uniform_(-1.0, 1.0)
    x = torch.randn(2, 6, 10, 12, 14) * 0.05 + 100.0
    expected = norm.double()(x.double()).float()  # the same float32 inputs, normalised in float64
    with torch.inference_mode():
        got = fast.instance_norm_(fast.channels_last(x.clone()), norm.float())
        plain = norm(x)  # aten's float32 path, for scale
    error = (got - expected).abs().max()
    assert error < 1e-3 and error <= 2 * (plain - expected).abs().max() + 1e-5


def test_mc_dropout_stays_stochastic_on_the_fast_path():
    model = fast.enable_cpu_kernels(_random_network(dropout=0.5))
    enable_mc_dropout(model, True)
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.inference_mode():
        a, _ = model(x)
        b, _ = model(x)
    assert not torch.allclose(a, b)


def _mostly_air(seed: int = 3) -> np.ndarray:
    """A body in a constant background, as clipped CT air is after preprocessing."""
    rng = np.random.default_rng(seed)
    array = np.zeros((40, 56, 48), dtype=np.float32)
    array[14:30, 20:40, 16:34] = rng.random((16, 20, 18), dtype=np.float32)
    return array


def test_reusing_constant_windows_changes_nothing():
    model = _random_network(seed=1)
    array = _mostly_air()
    window = WindowConfig((16, 16, 16), 0.25, 2)
    taps = ["enc1", "enc2"]
    reused = sliding_window(model, array, window, CPU, taps)
    every = sliding_window(model, array, dataclasses.replace(window, reuse_constant_windows=False), CPU, taps)
    assert reused.n_reused > reused.n_windows // 2 and every.n_reused == 0
    assert reused.n_windows == every.n_windows
    torch.testing.assert_close(reused.logits, every.logits, rtol=1e-5, atol=1e-5)
    for name in taps:
        np.testing.assert_allclose(reused.gram[name], every.gram[name], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(reused.context_logits, every.context_logits, rtol=1e-5, atol=1e-6)


def test_no_reuse_while_dropout_is_stochastic():
    model = _random_network(dropout=0.5)
    enable_mc_dropout(model, True)
    result = sliding_window(model, _mostly_air(), WindowConfig((16, 16, 16), 0.25, 2), CPU)
    assert result.n_reused == 0


@pytest.mark.parametrize(
    "size,patch,overlap,expected",
    [
        (64, 64, 0.25, [0]),
        (40, 64, 0.25, [0]),
        (100, 64, 0.25, [0, 36]),
        (160, 64, 0.25, [0, 48, 96]),
        (112, 64, 0.25, [0, 48]),
        (65, 64, 0.5, [0, 1]),
        (96, 64, 0.5, [0, 32]),
        (10, 4, 0.9, list(range(7))),
    ],
)
def test_window_starts_follow_monai(size, patch, overlap, expected):
    """MONAI's dense_patch_slices: interval ⌊patch·(1 − overlap)⌋ (at least 1), last window clamped."""
    assert window_starts(size, patch, overlap) == expected


MONAI_STARTS = json.loads((Path(__file__).parent / "monai_window_starts.json").read_text())


def test_window_starts_equal_monais_recorded_placements():
    """MONAI's own placements (recorded from MONAI 1.6.1, an optional extra), checked without MONAI."""
    assert len(MONAI_STARTS["starts"]) == 102
    for key, theirs in MONAI_STARTS["starts"].items():
        size, overlap = key.split("@")
        assert window_starts(int(size), MONAI_STARTS["patch"], float(overlap)) == theirs, key


def test_recorded_placements_are_monais_where_installed():
    data_utils = pytest.importorskip("monai.data.utils", reason="MONAI is the optional bench extra")
    from monai.inferers.utils import _get_scan_interval

    for key, recorded in MONAI_STARTS["starts"].items():
        size, overlap = int(key.split("@")[0]), float(key.split("@")[1])
        interval = _get_scan_interval((size,), (64,), 1, (overlap,))
        assert [int(s[0].start) for s in data_utils.dense_patch_slices((size,), (64,), interval)] == recorded, key


def test_fast_path_only_for_a_prepared_model_in_plain_cpu_inference():
    x = torch.zeros(1, 1, 4, 4, 4)
    model = _random_network()
    with torch.inference_mode():
        assert not fast.use_fast_path(x, model)  # as built or loaded: PyTorch's layers (the benchmark's peer)
        fast.prepare_for_cpu_inference(model)
        assert fast.use_fast_path(x, model) and all(b.cpu_kernels for b in model.encoders[0])
        assert not fast.use_fast_path(x.double(), model)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # opt-in bf16 runs the standard layers
            assert not fast.use_fast_path(x, model)
        assert fast.use_fast_path(x, model)
    assert not fast.use_fast_path(x, model)  # autograd on: training


def test_single_window_convolutions_run_on_onednn_like_batched_ones():
    """aten sends most batch-1 3D convolutions to its slow im2col kernel (a 2D rule); ``fast.conv`` calls
    oneDNN itself, so one window gets the kernel two windows get, with the same values."""
    if not fast._onednn_available():
        pytest.skip("this torch build has no oneDNN: the standard layer is used")
    torch.manual_seed(0)
    layer = torch.nn.Conv3d(16, 16, 3, padding=1, bias=False).to(memory_format=fast.CHANNELS_LAST)
    x = fast.channels_last(torch.randn(1, 16, 16, 16, 16))
    with torch.inference_mode():
        with torch.profiler.profile() as prof:
            y = fast.conv(layer, x)
        ref = layer(x)
    ops = {e.key for e in prof.key_averages()}
    assert "aten::mkldnn_convolution" in ops and "aten::slow_conv3d_forward" not in ops
    assert y.is_contiguous(memory_format=fast.CHANNELS_LAST)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


def test_a_build_whose_onednn_refuses_falls_back_to_the_layer(monkeypatch):
    def refuse(*args, **kwargs):
        raise RuntimeError("mkldnn_convolution: unsupported on this build")

    monkeypatch.setattr(torch.ops.aten, "mkldnn_convolution", refuse)
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: True)
    monkeypatch.setitem(fast._ONEDNN_FAILED, "failed", False)
    layer = torch.nn.Conv3d(4, 4, 3, padding=1, bias=False)
    x = fast.channels_last(torch.randn(1, 4, 8, 8, 8))
    with torch.inference_mode():
        y = fast.conv(layer, x)
        torch.testing.assert_close(y, layer(x))
    assert fast._ONEDNN_FAILED["failed"] and not fast._onednn_available()  # no second try per window
