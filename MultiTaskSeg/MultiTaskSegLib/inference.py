"""Sliding-window inference with Gaussian blending, batched windows and optional flip TTA.

While the windows run, the Gram matrix (channels × channels) of each tapped feature map is
accumulated, each voxel weighted by its window's share of the Gaussian blend (so every
image voxel counts once in total, padding not at all). Its eigenvalues are the squared singular values
of the stacked (voxels × channels) feature matrix, so the spectral OOD signature comes from
activations the segmentation already produced, with no second pass and no feature storage.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Sequence, cast

import numpy as np
import torch
import torch.nn.functional as F

from .errors import CancelledError  # noqa: F401  (re-exported for callers of progress callbacks)
from .process_memory import reuse_freed_memory

if TYPE_CHECKING:
    from .network import NetworkConfig

ProgressCallback = Callable[[str, float], None]


@dataclass
class WindowConfig:
    patch_size: tuple[int, int, int] = (64, 64, 64)  # (z, y, x) voxels on the canonical grid
    overlap: float = 0.5
    batch_size: int = 2
    tta_flips: bool = False
    cpu_bf16: bool = False  # opt-in bf16 autocast on CPU (AMX/AVX512-BF16): outputs differ slightly
    # A window whose input is one constant value (air clipped to 0 in CT, zero-filled MR background)
    # gives the same output wherever it lies: run it once and reuse it. Off for callers that hook
    # every forward pass; always off while dropout is stochastic (each window needs its own sample).
    reuse_constant_windows: bool = True
    # The context head's window logits are averaged with each window's share of voxels whose normalised
    # intensity exceeds this as its weight: a window of air or zero padding then has no say in which context
    # the image shows, however much of it the field of view holds. None (bundles before it): a plain mean.
    # (Counting only such voxels in the OOD Gram matrices too was measured and gained nothing: docs/RESULTS.md.)
    foreground_threshold: float | None = None

    def to_dict(self) -> dict:
        return {"patch_size": list(self.patch_size), "overlap": self.overlap, "batch_size": self.batch_size}


def resolve_device(requested: str = "auto", cuda_available: bool | None = None) -> tuple[str, str | None]:
    """The one reading of a device request ('auto', 'cpu', 'gpu', 'cuda', 'cuda:N'): (device, notice).

    A GPU that is asked for but missing falls back to the CPU with a notice for the user (the Slicer
    module and its worker); ``select_device`` is the strict form.
    """
    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    requested = (requested or "auto").lower()
    if requested == "cpu":
        return "cpu", None
    if cuda_available:
        return (requested if requested.startswith("cuda") else "cuda"), None
    if requested == "auto":
        return "cpu", "No CUDA GPU found: running on the CPU (slower)."
    return "cpu", "A GPU was requested but no CUDA GPU is available: running on the CPU instead (slower)."


def select_device(requested: str = "auto") -> torch.device:
    """Strict form for the Predictor and training: asking for a GPU without one is an error the caller reports."""
    device, notice = resolve_device(requested)
    if notice is not None and (requested or "auto").lower() != "auto":
        raise RuntimeError("CUDA was requested but no CUDA GPU is available")
    return torch.device(device)


def autocast_context(device: torch.device, cpu_bf16: bool = False):
    """bf16 (or fp16 where bf16 is unsupported) on CUDA; full precision on CPU unless ``cpu_bf16``.

    CPU bf16 is opt-in: it runs PyTorch's standard layers in bf16 on AMX / AVX512-BF16. Against the default
    fp32 CPU kernels (fast_inference.py) it measured 0.97–1.9× the speed, varying with the volume and the
    run (BENCHMARKS.md of sessions 19 and 21; slower still in earlier runs: measure on your CPU); its labels
    differ (mean Dice 0.96–0.99 against fp32) and its logits and feature spectra differ from the
    full-precision ones (|Δlogit| ~ 1e-2) that the training signatures were computed with.
    """
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    if cpu_bf16:
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


_GAUSSIAN_CACHE: dict = {}


def gaussian_importance(patch_size: Sequence[int], sigma_scale: float = 0.125) -> np.ndarray:
    """Gaussian weight map (max 1) as in nnU-Net / MONAI: sigma = patch size / 8."""
    key = (tuple(patch_size), sigma_scale)
    if key not in _GAUSSIAN_CACHE:
        axes = []
        for n in patch_size:
            sigma = n * sigma_scale
            x = np.arange(n, dtype=np.float64) - (n - 1) / 2.0
            axes.append(np.exp(-0.5 * (x / sigma) ** 2))
        g = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
        g = g / g.max()
        g = np.maximum(g, g[g > 0].min()).astype(np.float32)
        _GAUSSIAN_CACHE[key] = g
    return _GAUSSIAN_CACHE[key]


def window_starts(size: int, patch: int, overlap: float) -> list[int]:
    """Window starts along one axis, placed as MONAI's ``dense_patch_slices`` places them.

    A fixed interval of ⌊patch·(1 − overlap)⌋ voxels, the last window moved back to end at the
    border. Same placement, same windows: our output equals MONAI's sliding_window_inference given
    the same weight map (checked by ``mtseg bench``), which it would not with evenly spread starts.
    """
    if size <= patch:
        return [0]
    interval = max(int(patch * (1.0 - overlap)), 1)
    starts = list(range(0, size - patch, interval))
    return starts + [size - patch]


@dataclass
class WindowResult:
    logits: torch.Tensor  # (C, D, H, W) float32 on CPU, blended
    gram: dict[str, np.ndarray] = field(default_factory=dict)  # layer → (C×C) Gram / weight
    context_logits: np.ndarray | None = None  # mean context-head logits over windows
    n_windows: int = 0
    gram_s: float = 0.0  # seconds spent accumulating the Gram matrices (the OOD signature's share)
    n_reused: int = 0  # windows of constant input whose output was reused, not recomputed


def _forward(
    model: torch.nn.Module, x: torch.Tensor, taps: Sequence[str], config: WindowConfig, device: torch.device
) -> tuple:
    """One batch of windows: flip-averaged logits, the unflipped pass's tapped features, context logits."""
    flips = [()] + ([(2,), (3,), (4,)] if config.tta_flips else [])
    out, feats = None, {}
    for flip in flips:
        xin = torch.flip(x, flip) if flip else x
        with autocast_context(device, config.cpu_bf16):
            y, f = model(xin, taps=taps if not flip else ())
        y = y.float()
        y = torch.flip(y, flip) if flip else y
        out = y if out is None else out + y
        if not flip:
            feats = f
    assert out is not None  # flips always holds the unflipped pass
    return (out / len(flips) if len(flips) > 1 else out), feats


def _gram_terms(feats: dict, gauss_share: torch.Tensor, taps: Sequence[str]) -> tuple[dict, dict]:
    """Σ over the batch's feature voxels of w·f fᵀ, w = the voxel's share of the blend (see module doc)."""
    grams, weights = {}, {}
    for name in taps:
        f = feats[name].float()
        g = gauss_share if gauss_share.shape[2:] == f.shape[2:] else F.adaptive_avg_pool3d(gauss_share, f.shape[2:])
        # (B, V, C): a view for channels-last maps (no copy), so the full-resolution taps stay cheap
        x = f.permute(0, 2, 3, 4, 1).reshape(f.shape[0], -1, f.shape[1])
        grams[name] = (x.transpose(1, 2) @ (x * g.reshape(g.shape[0], -1, 1))).sum(0)
        weights[name] = g.sum()
    return grams, weights


def _dropout_active(model: torch.nn.Module) -> bool:
    return any(m.training for m in model.modules() if isinstance(m, (torch.nn.Dropout, torch.nn.Dropout3d)))


def _constant_windows(image: torch.Tensor, slices: list[tuple]) -> dict[int, float]:
    """Index → value of every window whose input voxels all hold one value."""
    constant = {}
    for i, sl in enumerate(slices):
        lo, hi = torch.aminmax(image[sl])
        if lo == hi:
            constant[i] = float(lo)
    return constant


def _foreground(image: torch.Tensor, crop: tuple[slice, ...], threshold: float | None) -> torch.Tensor | None:
    """The voxels above ``threshold`` (a bool mask), or None: no threshold, or no image voxel above it (then
    every window counts alike, rather than none)."""
    if threshold is None:
        return None
    mask = image > threshold
    return mask if bool(mask[crop].any()) else None


def _pad_to(array: np.ndarray, patch: Sequence[int]) -> tuple[np.ndarray, tuple[slice, ...]]:
    pads = [max(p - s, 0) for s, p in zip(array.shape, patch)]
    if not any(pads):
        return array, tuple(slice(0, s) for s in array.shape)
    widths = [(p // 2, p - p // 2) for p in pads]
    padded = np.pad(array, widths, mode="constant", constant_values=0.0)
    return padded, tuple(slice(w[0], w[0] + s) for w, s in zip(widths, array.shape))


@torch.inference_mode()
def sliding_window(
    model: torch.nn.Module,
    array: np.ndarray,
    config: WindowConfig,
    device: torch.device,
    taps: Sequence[str] = (),
    progress: ProgressCallback | None = None,
    stage: str = "inference",
) -> WindowResult:
    """Blend window logits over the whole (z, y, x) array; accumulate feature Gram matrices for ``taps``."""
    patch = tuple(config.patch_size)
    padded, crop = _pad_to(array, patch)
    shape = padded.shape
    starts = list(itertools.product(*(window_starts(s, p, config.overlap) for s, p in zip(shape, patch))))
    slices = [tuple(slice(s, s + p) for s, p in zip(st, patch)) for st in starts]
    image = torch.from_numpy(np.ascontiguousarray(padded)).to(device)
    gauss = torch.from_numpy(gaussian_importance(patch)).to(device)
    out_channels = cast("NetworkConfig", model.config).out_channels
    logits = torch.zeros((out_channels, *shape), dtype=torch.float32, device=device)
    weight = torch.zeros(shape, dtype=torch.float32, device=device)
    for sl in slices:  # blending weights first: the Gram weights below need them
        weight[sl] += gauss
    # Feature-voxel weights for the Gram matrices: gauss / Σ gauss is a partition of unity, so
    # every image voxel counts once in total however many windows cover it (one window → plain
    # XᵀX), and padding counts not at all.
    share = None  # only needed when features are tapped
    if taps:
        share = torch.zeros(shape, dtype=torch.float32, device=device)
        share[crop] = 1.0
        share /= weight
    foreground = _foreground(image, crop, config.foreground_threshold)

    constant = {}
    if config.reuse_constant_windows and not _dropout_active(model):
        constant = _constant_windows(image, slices)
    reused = {}
    for v in sorted(set(constant.values())):
        out, feats = _forward(model, torch.full((1, 1, *patch), v, device=device), taps, config, device)
        reused[v] = (out.mul_(gauss), feats)
    computed = [i for i in range(len(slices)) if i not in constant]
    batches = [computed[b0 : b0 + config.batch_size] for b0 in range(0, len(computed), config.batch_size)]
    batches += [[i] for i in constant]

    def run(batch: list[int]) -> tuple:
        sls = [slices[i] for i in batch]
        if batch[0] in constant:
            out, feats = reused[constant[batch[0]]]
        else:
            out, feats = _forward(model, torch.stack([image[sl] for sl in sls])[:, None], taps, config, device)
            out.mul_(gauss)  # in place: the blending weight, without a temporary
        grams: dict[str, torch.Tensor] = {}
        weights: dict[str, torch.Tensor] = {}
        seconds = 0.0
        if taps:
            assert share is not None  # computed above whenever taps are given
            t = time.perf_counter()
            grams, weights = _gram_terms(feats, torch.stack([gauss * share[sl] for sl in sls])[:, None], taps)
            seconds = time.perf_counter() - t
        context = None
        if "context" in feats:  # (Σ w·logits, Σ w) over the batch's windows
            w = torch.ones(len(sls), device=device)
            if foreground is not None:
                w = torch.stack([foreground[sl].float().mean() for sl in sls])
            context = ((feats["context"].float() * w[:, None]).sum(0), w.sum())
        return sls, out, grams, weights, context, seconds

    grams: dict[str, torch.Tensor] = {}
    gram_weight: dict[str, torch.Tensor] = {}
    context_sum, gram_s, done = None, 0.0, 0
    # One batch after another on torch's intra-op threads. Running windows in parallel with one
    # thread each was 1.1–1.35× faster on aten's layers, but on the inference kernels it is ~7 %
    # slower on 2 cores (measured on a 120×150×150 array), so it was removed.
    with reuse_freed_memory(device.type == "cpu"):  # freed activations stay in the heap between windows
        for batch in batches:
            sls, out, batch_grams, batch_weights, context, seconds = run(batch)
            for name in batch_grams:
                grams[name] = grams.get(name, 0) + batch_grams[name]
                gram_weight[name] = gram_weight.get(name, 0) + batch_weights[name]
            if context is not None:
                context_sum = (
                    context if context_sum is None else (context_sum[0] + context[0], context_sum[1] + context[1])
                )
            gram_s += seconds
            for k, sl in enumerate(sls):
                logits[(slice(None),) + sl] += out[k]  # already weighted by the Gaussian
            done += len(sls)
            if progress is not None:
                progress(stage, min(1.0, done / len(slices)))
    logits /= weight
    logits = logits[(slice(None),) + crop].float().cpu()
    gram = {k: (v / gram_weight[k]).double().cpu().numpy() for k, v in grams.items()}
    context = None if context_sum is None else (context_sum[0] / context_sum[1]).cpu().numpy()
    return WindowResult(logits, gram, context, len(slices), gram_s, len(constant))
