"""The whole prediction pipeline, shared by `mtseg predict` and the Slicer module.

image → preprocess → sliding window (+ feature spectra) → OOD score → temperature-scaled
probabilities → (optional context restriction) → labels and uncertainty on the input grid.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import numpy as np
import SimpleITK as sitk
import torch

from .bundle import Bundle
from .errors import InputVolumeError, MultiTaskSegError
from .fast_inference import prepare_for_cpu_inference
from .grid_mapping import labels_on_target
from .inference import ProgressCallback, WindowConfig, WindowResult, select_device, sliding_window
from .network import enable_mc_dropout
from .ood import OODResult
from .postprocessing import keep_largest_component
from .preprocessing import grid_to_input, preprocess
from .process_memory import reuse_freed_memory
from .quality import QualityResult, structure_evidence
from .resampling import axis_maps, resample_map
from .uncertainty import (
    class_argmax,
    merge_other_contexts,
    normalised_entropy,
    restrict_labels,
    softmax_with_temperature,
)
from .volume_io import array_to_image, validate_volume


@dataclass
class PredictOptions:
    device: str = "auto"  # auto | cpu | cuda | gpu
    tta: bool = False  # flip test-time augmentation
    mc_dropout: int = 0  # number of MC-dropout passes (0 = off)
    modality: str | None = None  # 'CT' / 'MR' to override detection
    restrict_to_context: bool | None = None  # None = the bundle's default
    cpu_bf16: bool = False  # opt-in bf16 autocast on CPU: often faster on AMX CPUs, slightly different outputs


@dataclass
class Prediction:
    labels: sitk.Image  # uint8 on the input grid
    uncertainty: sitk.Image  # float32 in [0, 1] on the input grid
    ood: OODResult
    context: str  # recognised context (used for restriction when enabled)
    label_names: dict[int, str]
    volumes_ml: dict[str, float]
    mean_uncertainty: float
    mean_uncertainty_per_label: dict[str, float]
    modality: str
    device: str
    timings_s: dict[str, float] = field(default_factory=dict)
    signature: np.ndarray | None = None
    probabilities: torch.Tensor | None = None  # canonical grid, kept only on request
    quality: QualityResult | None = None  # None when the bundle has no quality model (older bundles)

    def report(self) -> dict:
        """The JSON report written beside the outputs (DESIGN.md keys plus extras)."""
        return {
            "ood": self.ood.to_dict(),
            "quality": self.quality.to_dict() if self.quality else None,
            "labels": {str(k): v for k, v in self.label_names.items()},
            "volumes_ml": self.volumes_ml,
            "mean_uncertainty": self.mean_uncertainty,
            "mean_uncertainty_per_label": self.mean_uncertainty_per_label,
            "context": self.context,
            "modality": self.modality,
            "device": self.device,
            "timings_s": self.timings_s,
        }


class Predictor:
    """Holds a loaded model and detector; ``predict`` may be called for many images."""

    def __init__(self, bundle: Bundle, device: str = "auto"):
        self.bundle = bundle
        try:
            self.device = select_device(device)
        except RuntimeError as exc:
            raise MultiTaskSegError(f"{exc}; use --device cpu (or auto)") from None
        self.model = bundle.load_model(self.device)
        if self.device.type == "cpu":
            prepare_for_cpu_inference(self.model)
        self.detector = bundle.detector()
        self.quality_model = bundle.quality_model()
        self.window: WindowConfig = bundle.window
        self.preprocessing = bundle.preprocessing
        self.context_labels = [list(c["labels"]) for c in bundle.contexts]
        self.inference = bundle.schema.inference

    # --- the stages predict() chains; public so evaluation runs exactly the same steps --------
    def window_config(self, options: PredictOptions) -> WindowConfig:
        # the bundle's window with this call's options: every other setting of the bundle travels along
        return replace(self.window, tta_flips=options.tta, cpu_bf16=options.cpu_bf16)

    def network_pass(
        self,
        array: np.ndarray,
        window: WindowConfig,
        taps: Sequence[str] | None = None,
        progress: ProgressCallback | None = None,
        stage: str = "inference",
    ) -> WindowResult:
        """One sliding-window pass: blended logits, context logits and the Gram matrices of ``taps``
        (default: the detector's layers)."""
        return sliding_window(
            self.model,
            array,
            window,
            self.device,
            self.detector.layers if taps is None else taps,
            progress,
            stage=stage,
        )

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Temperature-scaled softmax over the class axis."""
        return softmax_with_temperature(logits, self.bundle.temperature)

    def mc_dropout_average(
        self,
        probs: torch.Tensor,
        array: np.ndarray,
        window: WindowConfig,
        n: int,
        progress: ProgressCallback | None = None,
    ) -> torch.Tensor:
        """Average ``probs`` (the deterministic pass, counted as one sample) with ``n`` dropout passes, in place."""
        enable_mc_dropout(self.model, True)
        try:
            for k in range(n):
                sample = self.network_pass(array, window, (), progress, stage=f"mc dropout {k + 1}/{n}")
                probs += self.probabilities(sample.logits)
        finally:
            enable_mc_dropout(self.model, False)
        probs /= n + 1
        return probs

    def head_context(self, context_logits: np.ndarray | None) -> tuple[int | None, float | None]:
        """(the context head's choice, its softmax probability); (None, None) when the bundle has no head or
        recognises contexts by signature. The OOD score is conditioned on it."""
        if context_logits is None or self.inference.context_source != "head":
            return None, None
        probs = torch.softmax(torch.as_tensor(context_logits, dtype=torch.float64), 0)
        k = int(torch.argmax(probs))
        return k, float(probs[k])

    def score_ood(self, gram: dict, context_logits: np.ndarray | None) -> tuple[np.ndarray, OODResult]:
        """(signature, the detector's verdict) of an image from its Gram matrices and the context head's logits."""
        signature = self.detector.signature(gram)
        return signature, self.detector.score(signature, *self.head_context(context_logits))

    def postprocess(self, labels: np.ndarray) -> np.ndarray:
        """The bundle's post-processing, in place: the largest component of each structure chosen on validation.
        Evaluation and the trust records call it too, so they score what ``predict`` outputs."""
        post = self.bundle.schema.postprocessing
        return keep_largest_component(labels, post.largest_component if post else [])

    def recognise_context(self, context_logits: np.ndarray | None, ood: OODResult) -> int:
        """Index of the context: the context head's argmax, or the nearest training signature's context."""
        if context_logits is not None and self.inference.context_source == "head":
            return int(np.argmax(context_logits))
        return self.bundle.context_names.index(ood.nearest_context)

    def assess_quality(
        self,
        probs: torch.Tensor,
        entropy: torch.Tensor,
        context_index: int,
        context_logits: np.ndarray | None,
        ood: OODResult,
    ) -> QualityResult | None:
        """Expected Dice of the recognised context's structures (canonical grid; None without a quality model)."""
        if self.quality_model is None:
            return None
        allowed = self.context_labels[context_index]
        labels = restrict_labels(class_argmax(probs), allowed)
        voxel_ml = float(np.prod(self.preprocessing.target_spacing)) / 1000.0
        evidence = structure_evidence(probs, labels, entropy, allowed, voxel_ml)
        confidence = 1.0
        if context_logits is not None:
            confidence = float(torch.softmax(torch.as_tensor(context_logits, dtype=torch.float64), 0)[context_index])
        ood_z = ood.score / ood.threshold if np.isfinite(ood.threshold) and ood.threshold > 0 else 0.0
        return self.quality_model.assess(evidence, self.bundle.label_names, ood_z, confidence, ood.is_ood)

    def predict(
        self,
        image: sitk.Image,
        options: PredictOptions | None = None,
        progress: ProgressCallback | None = None,
        on_ood: Callable[[OODResult], None] | None = None,
        keep_probabilities: bool = False,
    ) -> Prediction:
        # the large temporaries after the network (index tables, masks, component maps) reuse the heap too
        with reuse_freed_memory():
            return self._predict(image, options or PredictOptions(), progress, on_ood, keep_probabilities)

    def _predict(
        self,
        image: sitk.Image,
        options: PredictOptions,
        progress: ProgressCallback | None,
        on_ood: Callable[[OODResult], None] | None,
        keep_probabilities: bool,
    ) -> Prediction:
        report = progress or (lambda stage, fraction: None)
        validate_volume(image)
        timings: dict[str, float] = {}
        t0 = time.perf_counter()

        report("preprocess", 0.0)
        pre = preprocess(image, self.preprocessing, options.modality)
        timings["preprocess"] = time.perf_counter() - t0

        t = time.perf_counter()
        window = self.window_config(options)
        result = self.network_pass(pre.array, window, progress=report)
        timings["inference"] = time.perf_counter() - t
        timings["ood_gram"] = result.gram_s  # part of "inference": the OOD signature's Gram accumulation

        t = time.perf_counter()
        signature, ood = self.score_ood(result.gram, result.context_logits)
        timings["ood"] = time.perf_counter() - t
        if on_ood is not None:
            on_ood(ood)

        t = time.perf_counter()
        probs = self.probabilities(result.logits)  # the labels need it too
        timings["probabilities"] = time.perf_counter() - t

        t = time.perf_counter()
        if options.mc_dropout > 0:
            probs = self.mc_dropout_average(probs, pre.array, window, options.mc_dropout, report)
        context_index = self.recognise_context(result.context_logits, ood)
        restrict = options.restrict_to_context
        if restrict is None:
            restrict = bool(self.inference.restrict_to_context)
        if restrict:
            entropy = normalised_entropy(merge_other_contexts(probs, self.context_labels[context_index]))
        else:
            entropy = normalised_entropy(probs)
        timings["uncertainty"] = time.perf_counter() - t

        t = time.perf_counter()
        quality = self.assess_quality(probs, entropy, context_index, result.context_logits, ood)
        timings["quality"] = time.perf_counter() - t

        t = time.perf_counter()
        report("resample", 0.0)
        allowed = self.context_labels[context_index] if restrict else None
        labels, uncertainty = self.to_input_grid(probs, entropy, pre.grid, image, timings, allowed)
        timings["resample"] = time.perf_counter() - t
        # (post-processing beside the uncertainty's mapping in a second thread saved 0–0.3 s of 10 on the CT
        # phantom, within the machine's noise, and slowed the mapping 2×: not worth the blurred stage times)
        t = time.perf_counter()
        self.postprocess(labels)
        timings["postprocess"] = time.perf_counter() - t

        t = time.perf_counter()  # the report's volumes and means, and the two images on the input grid
        spacing = np.prod(image.GetSpacing()) / 1000.0
        names = self.bundle.label_names
        counts, sums = label_sums(labels, uncertainty, max(names) + 1)
        volumes = {names[v]: float(counts[v] * spacing) for v in sorted(names)}
        per_label = {names[v]: float(sums[v] / counts[v]) for v in sorted(names) if counts[v]}
        label_image, unc_image = array_to_image(labels, image), array_to_image(uncertainty, image)
        timings["summary"] = time.perf_counter() - t
        timings["total"] = time.perf_counter() - t0
        report("done", 1.0)
        return Prediction(
            label_image,
            unc_image,
            ood,
            self.bundle.context_names[context_index],
            names,
            volumes,
            float(sums.sum() / max(counts.sum(), 1)),
            per_label,
            pre.modality,
            str(self.device),
            {k: round(v, 3) for k, v in timings.items()},
            signature,
            probs if keep_probabilities else None,
            quality,
        )

    @staticmethod
    def _to_input_grid(
        probs: torch.Tensor,
        entropy: torch.Tensor,
        grid: sitk.Image,
        reference: sitk.Image,
        timings: dict | None = None,
        allowed: Sequence[int] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Argmax of linearly resampled probabilities on the input grid (restricted to ``allowed``
        when given, as ``restrict_labels``), and the resampled uncertainty.

        The labels are interpolated only where they can change (grid_mapping.py), any grid; the
        uncertainty goes through torch on axis-aligned grids (every scanner volume in practice),
        SimpleITK on oblique ones.
        """
        labels = labels_on_target(probs, grid, reference, allowed)
        t = time.perf_counter()
        maps = axis_maps(grid, reference)
        if maps is None:
            uncertainty = grid_to_input(entropy.numpy().astype(np.float32), grid, reference)
            np.clip(uncertainty, 0.0, 1.0, out=uncertainty)
        else:
            uncertainty = resample_map(entropy, maps, 0.0, clamp=(0.0, 1.0))
        if timings is not None:
            timings["resample_uncertainty"] = time.perf_counter() - t  # part of "resample"
        return labels, uncertainty.astype(np.float32, copy=False)

    to_input_grid = _to_input_grid  # the public name of the stage


def label_sums(labels: np.ndarray, values: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Voxel count and float64 sum of ``values`` per label 0 … n - 1.

    Background is most of a scan: each 1 M-voxel chunk's bincounts run over its labelled voxels only,
    and the background gets the rest (chunk total minus the labelled sums); the chunks are split among
    the caller's torch threads (numpy releases the GIL). A 512×512×300 CT: 0.2 s on 2 cores, against
    1.1 s for bincounts of every voxel (np.bincount of the whole array would also copy it to int64 first)."""
    flat, weights = labels.reshape(-1), values.reshape(-1)
    chunks = -(-flat.size // _SUM_CHUNK)
    workers = max(1, min(torch.get_num_threads(), chunks))
    if workers == 1:
        return _label_sums(flat, weights, n)
    step = -(-chunks // workers) * _SUM_CHUNK
    parts = [slice(i, i + step) for i in range(0, flat.size, step)]
    with ThreadPoolExecutor(len(parts)) as pool:
        results = list(pool.map(lambda part: _label_sums(flat[part], weights[part], n), parts))
    return np.sum([r[0] for r in results], axis=0), np.sum([r[1] for r in results], axis=0)


_SUM_CHUNK = 1 << 20


def _label_sums(flat: np.ndarray, weights: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    counts, sums = np.zeros(n, np.int64), np.zeros(n, np.float64)
    for i in range(0, flat.size, _SUM_CHUNK):
        part, w = flat[i : i + _SUM_CHUNK], weights[i : i + _SUM_CHUNK]
        rest = float(w.sum(dtype=np.float64))
        labelled = np.flatnonzero(part)
        if labelled.size:
            part_counts = np.bincount(part[labelled], minlength=n)[:n]
            part_sums = np.bincount(part[labelled], weights=w[labelled], minlength=n)[:n]
            counts += part_counts
            sums += part_sums
            rest -= float(part_sums.sum())
        counts[0] += part.size - labelled.size
        sums[0] += rest
    return counts, sums


def predict_image(bundle: Bundle, image: sitk.Image, options: PredictOptions | None = None) -> Prediction:
    """One-call convenience for scripts."""
    opts = options or PredictOptions()
    return Predictor(bundle, opts.device).predict(image, opts)


__all__ = ["PredictOptions", "Prediction", "Predictor", "predict_image", "InputVolumeError"]
