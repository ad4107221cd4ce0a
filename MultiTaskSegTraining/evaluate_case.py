"""Per-case scoring of `mtseg evaluate`: one sliding-window pass per image through the public
``Predictor`` stages, then segmentation metrics, pooled calibration bins and OOD scores.

Segmentation is scored on the ORIGINAL image grid, with the labels `mtseg predict` makes
(``Predictor.to_input_grid``): the network's argmax over all structures ("dice", "hd95_mm"), and
what `predict` outputs ("…_restricted": restricted to the recognised context's structures, then the
bundle's largest-component post-processing); calibration on the canonical grid the network sees, against the label resampled
there by nearest neighbour (unrestricted probabilities).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import SimpleITK as sitk
import torch

from MultiTaskSegLib.bundle import Bundle
from MultiTaskSegLib.calibration import structure_calibration
from MultiTaskSegLib.errors import DatasetError, MultiTaskSegError
from MultiTaskSegLib.inference import WindowConfig
from MultiTaskSegLib.ood import OODResult, nearest_neighbour_distances, signature_from_grams
from MultiTaskSegLib.predictor import Predictor
from MultiTaskSegLib.preprocessing import preprocess, resample_label_to_grid
from MultiTaskSegLib.uncertainty import normalised_entropy, restrict_labels, softmax_with_temperature
from MultiTaskSegLib.volume_io import read_volume

from .evaluate_data import EvalDataset
from .evaluate_metrics import PooledReliability, dice, hd95
from .ood_baselines import (
    MahalanobisDetector,
    PooledFeatures,
    SizeControlDetector,
    central_crop,
    image_geometry,
    pad_to_factor,
    uncertainty_scores,
)
from .progress import StageBar


@dataclass
class EvalOptions:
    split: str = "test"
    mc_dropout: int = 5  # passes; 0 = no MC-dropout baseline
    mc_dropout_cases: int | None = 2  # per context (test cases); OOD volumes always; None = all
    max_cases_per_context: int | None = None
    max_train_cases: int | None = 5  # per dataset, for the Mahalanobis fit; None = all
    size_control_cases: int | None = 1  # per context, smallest images first; 0 = skip; None = all
    device: str = "auto"
    cache_dir: str | None = None
    n_bins: int = 10
    band_radius: int = 2
    plots: bool = True
    quiet: bool = False


@dataclass
class _Pass:
    """What one sliding-window pass over an image gives."""

    pre: object
    logits: torch.Tensor
    gram: dict
    context_logits: np.ndarray | None
    pooled: np.ndarray | None
    seconds: float


def log(message: str, quiet: bool) -> None:
    if not quiet:
        print(message, file=sys.stderr, flush=True)


class Evaluator:
    def __init__(self, bundle: Bundle, options: EvalOptions):
        self.bundle = bundle
        self.options = options
        self.predictor = Predictor(bundle, options.device)
        self.model = self.predictor.model
        self.device = self.predictor.device
        self.detector = self.predictor.detector
        # the Mahalanobis baseline's PooledFeatures hook must see every window's forward pass
        self.window: WindowConfig = dataclasses.replace(bundle.window, reuse_constant_windows=False)
        self.temperature = bundle.temperature
        self.layers = list(self.detector.layers)
        self.bottleneck = self.model.encoders[-1]
        self.layer_slices: dict[str, slice] | None = None

    # --- one pass -------------------------------------------------------------------------
    def forward(self, array: np.ndarray, title: str, taps: Sequence[str] | None = None):
        """One sliding-window pass: (WindowResult, pooled bottleneck features)."""
        bar = StageBar(title, disable=self.options.quiet)
        try:
            with PooledFeatures(self.bottleneck) as pooled:
                result = self.predictor.network_pass(array, self.window, taps, bar.update)
        finally:
            bar.close()
        return result, pooled.value

    def run(self, image: sitk.Image, title: str) -> _Pass:
        t = time.perf_counter()
        pre = preprocess(image, self.bundle.preprocessing)
        result, pooled = self.forward(pre.array, title)
        return _Pass(pre, result.logits, result.gram, result.context_logits, pooled, time.perf_counter() - t)

    def _slices(self, gram: dict) -> dict[str, slice]:
        """Where each layer's block sits in the concatenated training signatures."""
        if self.layer_slices is None:
            start, slices = 0, {}
            for layer in self.layers:
                n = len(signature_from_grams(gram, [layer], self.detector.spectrum_length))
                slices[layer] = slice(start, start + n)
                start += n
            if start != self.detector.signatures.shape[1]:
                raise MultiTaskSegError(
                    f"{self.bundle.path}: signatures.npz has {self.detector.signatures.shape[1]} "
                    f"dimensions but the layers {self.layers} give {start}"
                )
            self.layer_slices = slices
        return self.layer_slices

    def spectral(self, gram: dict, context_logits: np.ndarray | None) -> tuple[np.ndarray, dict, OODResult]:
        """(multi-layer signature, {detector name: score}, the detector's OODResult)."""
        signature = self.detector.signature(gram)
        result = self.detector.score(signature, *self.predictor.head_context(context_logits))
        scores = {self.detector.name: result.score}
        if len(self.layers) > 1:
            for layer, sl in self._slices(gram).items():
                d, _ = nearest_neighbour_distances(signature[sl][None], self.detector.signatures[:, sl])
                scores[f"spectral:{layer}"] = float(d[0])
        return signature, scores, result

    def mc_dropout_entropy(self, array: np.ndarray, base_probs: torch.Tensor, title: str) -> float:
        """Mean normalised entropy of the average of the deterministic and N dropout softmaxes."""
        bar = StageBar(title, disable=self.options.quiet)
        try:
            probs = self.predictor.mc_dropout_average(
                base_probs.clone(), array, self.window, self.options.mc_dropout, bar.update
            )
        finally:
            bar.close()
        return float(normalised_entropy(probs).mean())


@dataclass
class Baselines:
    """The baseline OOD scores fitted on the training split."""

    mahalanobis: MahalanobisDetector | None
    size_detector: SizeControlDetector

    def scores(self, p: _Pass, probs_t: torch.Tensor, geometry: np.ndarray) -> dict:
        scores = uncertainty_scores(probs_t)
        if self.mahalanobis is not None and p.pooled is not None:
            scores["mahalanobis"] = self.mahalanobis.score(p.pooled)
        scores["size_control"] = self.size_detector.score(geometry)
        return scores


def new_calibration_bins(datasets: Sequence[EvalDataset], temps: list[tuple[str, float]], n_bins: int) -> dict:
    """dataset → temperature key → structure value → {whole, boundary} pooled bins."""
    return {
        ds.spec.name: {
            k: {v: {"whole": PooledReliability(n_bins), "boundary": PooledReliability(n_bins)} for v in ds.structures}
            for k, _ in temps
        }
        for ds in datasets
    }


def score_test_case(
    ev: Evaluator,
    ds: EvalDataset,
    case,
    title: str,
    temps: list[tuple[str, float]],
    calib: dict,
    baselines: Baselines,
    with_mc: bool,
) -> tuple[dict, dict, np.ndarray, OODResult, sitk.Image]:
    """Segmentation, calibration (accumulated into ``calib``) and OOD scores of one labelled case.

    Returns (case record, OOD record, signature, OOD result, image).
    """
    names = ev.bundle.context_names
    context_labels = ev.predictor.context_labels
    options = ev.options
    image = read_volume(case.image)
    label_image = sitk.ReadImage(str(case.label))
    if label_image.GetSize() != image.GetSize():
        raise DatasetError(
            f"{case.label}: label size {label_image.GetSize()} does not match image size {image.GetSize()}"
        )
    p = ev.run(image, title)
    signature, spectral_scores, ood = ev.spectral(p.gram, p.context_logits)
    head = int(np.argmax(p.context_logits)) if p.context_logits is not None else None
    by_signature = int(ev.detector.context_index[ev.detector.nearest(signature)[1]])  # any context's signatures
    recognised = ev.predictor.recognise_context(p.context_logits, ood)

    # calibration on the canonical grid (unrestricted probabilities)
    gt_canon = ds.lut[resample_label_to_grid(label_image, p.pre.grid)]
    probs_t = None
    argmax = p.logits.argmax(0).numpy()
    for key, temp in temps:
        probs = softmax_with_temperature(p.logits, temp)
        for v in ds.structures:
            cal = structure_calibration(
                probs[v].numpy(), gt_canon == v, argmax == v, options.n_bins, options.band_radius
            )
            calib[ds.spec.name][key][v]["whole"].add(cal["whole"])
            calib[ds.spec.name][key][v]["boundary"].add(cal["boundary"])
        if temp == ev.temperature:
            probs_t = probs
        else:
            del probs
    scores = {**spectral_scores, **baselines.scores(p, probs_t, image_geometry(image))}
    if with_mc:
        scores["mc_dropout_entropy"] = ev.mc_dropout_entropy(p.pre.array, probs_t, title)

    # segmentation on the input grid, without and with restriction to the recognised context
    entropy = normalised_entropy(probs_t)
    labels, _ = ev.predictor.to_input_grid(probs_t, entropy, p.pre.grid, image)
    restricted = restrict_labels(labels.copy(), context_labels[recognised])
    ev.predictor.postprocess(restricted)  # what `mtseg predict` outputs: restricted, then post-processed
    del probs_t, entropy
    gt = ds.lut[sitk.GetArrayFromImage(label_image)]
    spacing = image.GetSpacing()[::-1]
    rec = {
        "case": case.case_id,
        "dataset": ds.spec.name,
        "dice": {},
        "hd95_mm": {},
        "dice_restricted": {},
        "hd95_mm_restricted": {},
    }
    for v, name in ds.structures.items():
        g = gt == v
        rec["dice"][name] = dice(labels == v, g)
        rec["hd95_mm"][name] = hd95(labels == v, g, spacing)
        rec["dice_restricted"][name] = dice(restricted == v, g)
        rec["hd95_mm_restricted"][name] = hd95(restricted == v, g, spacing)
    fg = labels > 0
    other = fg & ~np.isin(labels, context_labels[ds.context])
    rec.update(
        {
            "foreground_voxels": int(fg.sum()),
            "other_context_voxels": int(other.sum()),
            "confusion_rate": float(other.sum() / fg.sum()) if fg.any() else None,
            "context_head": names[head] if head is not None else None,
            "context_signature": names[by_signature],
            "context_used": names[recognised],
            "ood": ood.to_dict(),
            "scores": scores,
        }
    )
    ood_record = {
        "case": case.case_id,
        "group": ds.spec.name,
        "ood": False,
        "scores": scores,
        "spectral_is_ood": ood.is_ood,
        "nearest_context": ood.nearest_context,
        "recognised_context": names[recognised],
    }
    return rec, ood_record, signature, ood, image


def size_check(
    ev: Evaluator,
    ds: EvalDataset,
    case,
    image: sitk.Image,
    ood: OODResult,
    score: float,
    size_detector: SizeControlDetector,
    title: str,
) -> list[dict]:
    """The spectral score of the original, its central 50 % crop and its 2× padding."""
    records = [
        {
            "case": case.case_id,
            "context": ds.spec.name,
            "variant": "original",
            "size": list(image.GetSize()),
            "spacing": list(image.GetSpacing()),
            "score": ood.score,
            "threshold": ood.threshold,
            "is_ood": ood.is_ood,
            "size_control_score": score,
        }
    ]
    for variant, make in (("crop_central_50pct", central_crop), ("pad_2x_min", pad_to_factor)):
        ts = time.perf_counter()
        v_img = make(image)
        vp = ev.run(v_img, f"{title} {variant}")
        _, _, v_ood = ev.spectral(vp.gram, vp.context_logits)
        records.append(
            {
                "case": case.case_id,
                "context": ds.spec.name,
                "variant": variant,
                "size": list(v_img.GetSize()),
                "spacing": list(v_img.GetSpacing()),
                "score": v_ood.score,
                "threshold": v_ood.threshold,
                "is_ood": v_ood.is_ood,
                "size_control_score": size_detector.score(image_geometry(v_img)),
            }
        )
        log(
            f"{title} {variant}: size {v_img.GetSize()}, spectral score {v_ood.score:.4f} "
            f"({'OOD' if v_ood.is_ood else 'in distribution'}; original {ood.score:.4f}) "
            f"({time.perf_counter() - ts:.1f} s)",
            ev.options.quiet,
        )
    return records


def score_ood_volume(ev: Evaluator, name: str, path, title: str, baselines: Baselines) -> tuple[dict, np.ndarray]:
    """OOD scores of one unlabelled volume: (OOD record, signature)."""
    image = read_volume(path)
    p = ev.run(image, title)
    signature, spectral_scores, ood = ev.spectral(p.gram, p.context_logits)
    probs_t = ev.predictor.probabilities(p.logits)
    scores = {**spectral_scores, **baselines.scores(p, probs_t, image_geometry(image))}
    if ev.options.mc_dropout > 0:
        scores["mc_dropout_entropy"] = ev.mc_dropout_entropy(p.pre.array, probs_t, title)
    recognised = ev.predictor.recognise_context(p.context_logits, ood)
    record = {
        "case": name,
        "group": "ood",
        "ood": True,
        "path": str(path),
        "scores": scores,
        "spectral_is_ood": ood.is_ood,
        "nearest_context": ood.nearest_context,
        "recognised_context": ev.bundle.context_names[recognised],
    }
    return record, signature
