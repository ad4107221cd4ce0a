"""Inference-only kernels for the residual U-Net on CPU: the same maths as the training layers.

Without autograd, a CPU forward pass at full precision runs in channels-last layout (oneDNN's
3D convolutions with 8–16 channels are ~2× faster on it) and replaces three aten paths that cost
more than the convolutions around them: instance norm (computed through batch norm on a
(1, B·C, …) view), 1×1×1 convolutions (slow im2col) and the stride-2 transposed convolution
followed by a concatenation (two full copies). Everything here works in place on tensors the
caller has just created. Outputs equal the training layers' up to float rounding
(|Δ| ~ 1e-5, tested in Testing/test_fast_inference.py); GPU, bf16 and autograd keep the plain layers.
"""

from __future__ import annotations

import math
from typing import Any, cast

import torch
from torch import nn

CHANNELS_LAST = torch.channels_last_3d


def use_fast_path(x: torch.Tensor, module: nn.Module) -> bool:
    """A module whose kernels were switched on (``enable_cpu_kernels``) running on CPU, float32, no
    autograd, no autocast (opt-in bf16 keeps the standard layers, whose norms autocast handles)."""
    return (
        getattr(module, "cpu_kernels", False)
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and not torch.is_grad_enabled()
        and not torch.is_autocast_enabled("cpu")
    )


def enable_cpu_kernels(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Let ``model`` use these kernels whenever ``use_fast_path`` allows (a model as built or loaded does
    not: it runs PyTorch's standard layers, e.g. as a benchmark's peer)."""
    for m in model.modules():
        if hasattr(m, "cpu_kernels"):
            cast(Any, m).cpu_kernels = enabled  # a plain attribute of the model's own classes
    return model


def prepare_for_cpu_inference(model: nn.Module) -> nn.Module:
    """The kernels on, and channels-last weights: oneDNN then needs no per-call weight reorder (~6 % on
    the default model). Same values; ``save_bundle`` stores contiguous copies, so a bundle written from
    it is unchanged."""
    # Module.to accepts memory_format at runtime; torch's stubs omit it
    return enable_cpu_kernels(model.to(memory_format=CHANNELS_LAST))  # type: ignore[call-overload]


def channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=CHANNELS_LAST)


_ONEDNN_FAILED = {"failed": False}  # set when a build's oneDNN refused a 3D convolution: the layer from then on


def _onednn_available() -> bool:
    return bool(torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled) and not _ONEDNN_FAILED["failed"]


def conv(layer: nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
    """A convolution through oneDNN whose output stays channels-last (with one input channel the
    layout is ambiguous).

    Called directly: aten's dispatcher sends a batch-1 float convolution to its slow im2col kernel
    when N·C·D·H ≤ 20480 and the kernel is ≤ 3 wide, a rule written for 2D images (N·C·H) that on a
    64³ window catches the input layer and every layer from 32³ down. A single window (small
    volumes, an odd last batch) then ran ~1.7× slower per window than two (benchmarks/conv_path_ab.py).
    """
    if _onednn_available() and isinstance(layer.padding, tuple):
        try:
            y = torch.ops.aten.mkldnn_convolution(
                x, layer.weight, layer.bias, layer.padding, layer.stride, layer.dilation, layer.groups
            )
            return channels_last(y)
        except (RuntimeError, NotImplementedError):  # a build whose oneDNN lacks this case: aten's own choice
            _ONEDNN_FAILED["failed"] = True
    return channels_last(layer(x))


def voxel_rows(x: torch.Tensor, k: int = 1) -> torch.Tensor:
    """(B, C, D, H, W) → (B, D·H·W / k, k·C): rows of k voxels' channels; a view for a channels-last tensor
    (a copy otherwise, so in-place use needs channels-last). k = 1 gives the (voxels × channels) matrix;
    k > 1 lets per-channel vectors repeated k times be broadcast over rows, which elementwise kernels
    run ~4× faster than a broadcast over a length-C inner dimension."""
    return x.permute(0, 2, 3, 4, 1).reshape(x.shape[0], -1, k * x.shape[1])


def instance_norm_(x: torch.Tensor, norm: nn.InstanceNorm3d) -> torch.Tensor:
    """``norm(x)`` in place: the mean, then the centred sum of squares (two passes: no cancellation),
    then one fused scale-and-shift. Biased variance and eps inside the root, as ``InstanceNorm3d``."""
    x = channels_last(x)  # the in-place row views below need it (a no-op for conv outputs)
    b, c = x.shape[:2]
    n = x[0, 0].numel()
    k = math.gcd(n, 16)
    rows = voxel_rows(x, k)
    rows.sub_(x.mean(dim=(2, 3, 4)).repeat(1, k).unsqueeze(1))
    v = voxel_rows(x)
    var = torch.bmm(v.transpose(1, 2), v).diagonal(dim1=1, dim2=2) / n  # one GEMM reads x once
    scale = torch.rsqrt(var + norm.eps) * norm.weight  # (B, C)
    torch.addcmul(norm.bias.repeat(k), rows, scale.repeat(1, k).unsqueeze(1), out=rows)
    return x


def conv1x1(x: torch.Tensor, layer: nn.Conv3d, channels_first_out: bool = False) -> torch.Tensor:
    """A 1×1×1 stride-1 convolution as one matrix product over voxels.

    Channels-last output by default; ``channels_first_out`` gives a contiguous (B, O, D, H, W)
    tensor instead (the network's logits) without an extra copy.
    """
    b, c = x.shape[:2]
    out = layer.out_channels
    v = voxel_rows(x)  # (B, V, C)
    w = layer.weight.view(out, c)
    if channels_first_out:
        y = torch.bmm(w.expand(b, -1, -1), v.transpose(1, 2))  # (B, O, V)
        if layer.bias is not None:
            y.add_(layer.bias.view(1, -1, 1))
        return y.view(b, out, *x.shape[2:])
    y = torch.matmul(v, w.t())  # (B, V, O)
    if layer.bias is not None:
        y.add_(layer.bias)
    return y.view(b, *x.shape[2:], out).permute(0, 4, 1, 2, 3)


def up_cat(up: nn.ConvTranspose3d, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    """``cat([up(x), skip], 1)`` for a size-2, stride-2 transposed convolution, channels-last.

    Each input voxel becomes a 2×2×2 block of output voxels. One matrix product per (i, j) offset
    gives the two voxels along x for every input voxel, which lie next to each other in the output:
    they are copied as whole rows straight into the concatenated tensor (one product for all eight
    offsets would leave a scatter of 8-float pieces, ~3× slower; aten writes the up-sampled map and
    then copies it again for the concatenation).
    """
    b, c, d, h, w = x.shape
    co, cs = up.out_channels, skip.shape[1]
    voxels = voxel_rows(x)  # (B, V, c)
    out = torch.empty((b, 2 * d, 2 * h, 2 * w, co + cs), dtype=x.dtype, device=x.device)
    grid = out.view(b, d, 2, h, 2, w, 2, co + cs)
    for i in range(2):
        for j in range(2):
            weight = up.weight[:, :, i, j].permute(0, 2, 1).reshape(c, 2 * co)  # (c, k·co)
            pair = torch.matmul(voxels, weight).view(b, d, h, w, 2, co)
            if up.bias is not None:
                pair.add_(up.bias)
            grid[:, :, i, :, j, :, :, :co].copy_(pair)
    out[..., co:].copy_(skip.permute(0, 2, 3, 4, 1))
    return out.permute(0, 4, 1, 2, 3)
