"""The evaluation engine behind `mtseg evaluate`: segmentation, calibration and OOD detection.

Every test case (the bundle's own split; test cases were never used for training, model
selection, temperature or threshold) is preprocessed and run through the sliding window once;
the blended logits, the per-layer Gram matrices, the context-head logits and the pooled
bottleneck features all come from that one pass. Then:

Segmentation (on the ORIGINAL image grid, exactly as `mtseg predict` makes labels)
    Labels are the argmax of the temperature-scaled probabilities resampled onto the input
    grid (``Predictor._to_input_grid``), without and with restriction to the recognised
    context's structures. Only the structures the case's dataset annotates are scored; the
    dataset's local label values are mapped to the bundle's outputs by name within the
    dataset's context. Dice = 2|A∩B| / (|A|+|B|): ``None`` when both masks are empty, 0
    when only one is. HD95 (mm) = max of the two directed 95th percentiles of surface-to-
    surface distances (surface = mask minus its 6-connected erosion; Euclidean distance
    transform with the voxel spacing, scipy): ``None`` when either mask is empty. Summaries
    (mean, std, median) skip ``None``s and say how many there were.
    Context confusion rate: the fraction of predicted foreground voxels (unrestricted) that
    carry another context's structure. Context recognition: accuracy of the context head
    and of the nearest training signature.

Calibration (on the canonical grid the network sees, against the label resampled there by
nearest neighbour)
    Per structure: the foreground probability of the unrestricted softmax against the
    binary label, equal-width bins (core ``calibration.structure_calibration``: whole image,
    and the band within ``band_radius`` voxels of the predicted structure's boundary), at
    T = 1 and at the bundle's temperature. Bins are pooled over a context's cases (counts,
    confidence and accuracy sums accumulate), then ECE / MCE are computed from the pooled bins.

OOD detection (OOD = positive class; in-distribution = the test cases)
    Spectral: the bundle's detector (multi-layer) and each of its layers alone (training
    signatures sliced out of ``signatures.npz``: each layer's part is a self-contained,
    separately normalised block); the baselines in ``ood_baselines``. AUROC and FPR at 95 %
    TPR per detector, per-case scores, the false-alarm rate at the shipped threshold per
    context, and a size-robustness check (central 50 % crop and 2× padding of test images).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk
import torch
from scipy import ndimage

from MultiTaskSegLib.bundle import Bundle, load_bundle
from MultiTaskSegLib.calibration import Reliability, structure_calibration
from MultiTaskSegLib.errors import DatasetError, MultiTaskSegError
from MultiTaskSegLib.inference import WindowConfig, sliding_window
from MultiTaskSegLib.network import enable_mc_dropout
from MultiTaskSegLib.ood import nearest_neighbour_distances, signature_from_grams
from MultiTaskSegLib.predictor import Predictor
from MultiTaskSegLib.preprocessing import preprocess, resample_label_to_grid
from MultiTaskSegLib.uncertainty import normalised_entropy, restrict_labels, softmax_with_temperature
from MultiTaskSegLib.volume_io import case_name, is_volume_file, read_volume

from .data import Case, DatasetSpec, load_dataset, preprocess_case
from .ood_baselines import (MahalanobisDetector, PooledFeatures, SizeControlDetector, central_crop,
                            detection_metrics, file_geometry, image_geometry, pad_to_factor, uncertainty_scores)
from .progress import StageBar

OOD_POSITIVE = "ood"


# --- metrics on masks ------------------------------------------------------------------------

def dice(pred: np.ndarray, gt: np.ndarray) -> float | None:
    """Dice of two binary masks; None when both are empty."""
    pred = np.asarray(pred, bool)
    gt = np.asarray(gt, bool)
    total = int(pred.sum()) + int(gt.sum())
    if total == 0:
        return None
    return 2.0 * int(np.logical_and(pred, gt).sum()) / total


def _surface(mask: np.ndarray) -> np.ndarray:
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure)


def hd95(pred: np.ndarray, gt: np.ndarray, spacing_zyx: Sequence[float]) -> float | None:
    """95th-percentile symmetric Hausdorff distance in mm (max of the two directed 95th
    percentiles of surface distances); None when either mask is empty.

    Computed inside the bounding box of both masks (plus one voxel): every surface voxel is
    inside it, so the distances are those of the whole image.
    """
    pred = np.asarray(pred, bool)
    gt = np.asarray(gt, bool)
    if not pred.any() or not gt.any():
        return None
    both = pred | gt
    box = []
    for axis in range(both.ndim):
        nz = np.flatnonzero(both.any(axis=tuple(a for a in range(both.ndim) if a != axis)))
        box.append(slice(max(int(nz[0]) - 1, 0), min(int(nz[-1]) + 2, both.shape[axis])))
    box = tuple(box)
    sp, sg = _surface(pred[box]), _surface(gt[box])
    spacing = [float(s) for s in spacing_zyx]
    to_gt = ndimage.distance_transform_edt(~sg, sampling=spacing)[sp]
    to_pred = ndimage.distance_transform_edt(~sp, sampling=spacing)[sg]
    return float(max(np.percentile(to_gt, 95), np.percentile(to_pred, 95)))


def summarise(values: dict[str, float | None]) -> dict:
    """mean / std / median over the defined per-case values, plus the per-case values."""
    defined = np.array([v for v in values.values() if v is not None and np.isfinite(v)], dtype=np.float64)
    stats = {"mean": None, "std": None, "median": None}
    if len(defined):
        stats = {"mean": float(defined.mean()), "std": float(defined.std()), "median": float(np.median(defined))}
    return {**stats, "n": int(len(defined)), "n_undefined": int(len(values) - len(defined)), "cases": dict(values)}


# --- pooled calibration ----------------------------------------------------------------------

class PooledReliability:
    """Bin counts, confidence sums and accuracy sums accumulated over cases."""

    def __init__(self, n_bins: int = 10):
        self.edges = np.linspace(0.0, 1.0, n_bins + 1)
        self.counts = np.zeros(n_bins)
        self.conf_sum = np.zeros(n_bins)
        self.acc_sum = np.zeros(n_bins)

    def add(self, rel: Reliability | None) -> None:
        if rel is None:
            return
        c = np.asarray(rel.counts, dtype=np.float64)
        self.counts += c
        self.conf_sum += np.nan_to_num(rel.confidence) * c
        self.acc_sum += np.nan_to_num(rel.accuracy) * c

    def result(self) -> Reliability:
        with np.errstate(invalid="ignore", divide="ignore"):
            conf = self.conf_sum / self.counts
            acc = self.acc_sum / self.counts
        nonempty = self.counts > 0
        n = self.counts.sum()
        gaps = np.abs(acc - conf)
        ece = float((self.counts[nonempty] / n * gaps[nonempty]).sum()) if n else float("nan")
        mce = float(gaps[nonempty].max()) if nonempty.any() else float("nan")
        return Reliability(self.edges, conf, acc, self.counts.copy(), ece, mce)


# --- JSON --------------------------------------------------------------------------------------

def json_clean(obj):
    """numpy → Python, NaN/Inf → None, tuples → lists, Paths → str."""
    if isinstance(obj, dict):
        return {str(k): json_clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_clean(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_clean(obj.tolist())
    if isinstance(obj, (np.bool_, bool)):
        return bool(obj)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(float(obj)) else None
    if isinstance(obj, Path):
        return str(obj)
    return obj


# --- datasets and the bundle -------------------------------------------------------------------

@dataclass
class EvalDataset:
    spec: DatasetSpec
    context: int  # index into the bundle's contexts
    split: dict[str, list[str]]
    lut: np.ndarray  # local label value → bundle output value
    structures: dict[int, str]  # bundle output value → name, for the structures this dataset annotates

    def cases(self, part: str) -> list[Case]:
        wanted = set(self.split.get(part, []))
        return [c for c in self.spec.cases if c.case_id in wanted]


def match_datasets(bundle: Bundle, data_dirs: Sequence[str | os.PathLike]) -> list[EvalDataset]:
    """Pair each --data folder with the bundle's context and split; refuse anything that does not match."""
    training = bundle.meta.get("training") or {}
    split = training.get("split")
    if not isinstance(split, dict) or not split:
        raise MultiTaskSegError(f"{bundle.path}: bundle.json has no training.split; evaluation needs the bundle's "
                                "own train/val/test split (bundles from `mtseg train` have it)")
    names = bundle.context_names
    out = []
    for d in data_dirs:
        spec = load_dataset(d)
        if spec.name not in split or spec.name not in names:
            raise MultiTaskSegError(f"{spec.root}: dataset '{spec.name}' is not one this bundle was trained on "
                                    f"(its datasets: {', '.join(sorted(split))}); a bundle can only be evaluated "
                                    "on the test split of its own datasets")
        if any(e.spec.name == spec.name for e in out):
            raise MultiTaskSegError(f"dataset '{spec.name}' given twice")
        have = {c.case_id for c in spec.cases}
        listed = [cid for part in split[spec.name].values() for cid in part]
        missing = sorted(set(listed) - have)
        if missing:
            raise MultiTaskSegError(f"{spec.root}: {len(missing)} case id(s) of the bundle's split for '{spec.name}' "
                                    f"are not in this dataset (e.g. {missing[0]}); is it the same dataset version "
                                    "the bundle was trained on?")
        recorded = {r.get("name"): r.get("sha256") for r in training.get("datasets", []) if isinstance(r, dict)}
        if recorded.get(spec.name) and recorded[spec.name] != spec.content_hash():
            warnings.warn(f"{spec.root}: content hash differs from the one recorded at training time "
                          "(files changed since); evaluating anyway")
        ci = names.index(spec.name)
        allowed = [int(v) for v in bundle.contexts[ci]["labels"]]
        label_names = bundle.label_names
        lut = np.zeros(max(max(spec.labels), 255) + 1, np.uint8)
        structures = {}
        for local, name in sorted(spec.labels.items()):
            if bundle.meta.get("label_mode") == "shared_foreground" and len(allowed) == 1:
                glob = allowed[0]
            else:
                hits = [v for v in allowed if label_names.get(v) == name]
                if not hits:
                    raise MultiTaskSegError(f"{spec.root}: label {local} '{name}' has no output in the bundle's "
                                            f"context '{spec.name}' (its structures: "
                                            f"{', '.join(label_names[v] for v in allowed)})")
                glob = hits[0]
            lut[local] = glob
            structures[glob] = label_names[glob]
        out.append(EvalDataset(spec, ci, split[spec.name], lut, structures))
    if not out:
        raise MultiTaskSegError("no dataset given: pass the bundle's MSD dataset folders with --data")
    return out


def ood_volumes(folders: Sequence[str | os.PathLike]) -> list[tuple[str, Path]]:
    """(name, path) of every OOD volume: ``*_image.*`` where a folder pairs images with labels
    (ood-dev layout), ``imagesTr/`` of an MSD folder, otherwise every volume file."""
    out = []
    for folder in folders:
        folder = Path(folder)
        if folder.is_file() and is_volume_file(folder):
            out.append((case_name(folder), folder))
            continue
        if not folder.is_dir():
            raise MultiTaskSegError(f"{folder}: OOD folder not found")
        if (folder / "imagesTr").is_dir():
            folder = folder / "imagesTr"
        files = sorted(f for f in folder.iterdir() if is_volume_file(f))
        images = [f for f in files if case_name(f).endswith("_image")]
        if images:
            files = images
        else:
            files = [f for f in files if not case_name(f).endswith(("_label", "_seg"))]
        if not files:
            raise MultiTaskSegError(f"{folder}: no volume files (NIfTI, NRRD, MHA) found for --ood")
        out += [(case_name(f).removesuffix("_image"), f) for f in files]
    names = [n for n, _ in out]
    if len(set(names)) != len(names):  # same file name in two folders: qualify with the folder
        out = [(f"{p.parent.name}/{n}", p) for n, p in out]
    return out


# --- the engine ---------------------------------------------------------------------------------

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
                result = sliding_window(self.model, array, self.window, self.device,
                                        self.layers if taps is None else taps, bar.update)
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
                raise MultiTaskSegError(f"{self.bundle.path}: signatures.npz has {self.detector.signatures.shape[1]} "
                                        f"dimensions but the layers {self.layers} give {start}")
            self.layer_slices = slices
        return self.layer_slices

    def spectral(self, gram: dict) -> tuple[np.ndarray, dict, object]:
        """(multi-layer signature, {detector name: score}, the detector's OODResult)."""
        signature = self.detector.signature(gram)
        result = self.detector.score(signature)
        scores = {f"spectral:{'+'.join(self.layers)}": result.score}
        if len(self.layers) > 1:
            for layer, sl in self._slices(gram).items():
                d, _ = nearest_neighbour_distances(signature[sl][None], self.detector.signatures[:, sl])
                scores[f"spectral:{layer}"] = float(d[0])
        return signature, scores, result

    def mc_dropout_entropy(self, array: np.ndarray, base_probs: torch.Tensor, title: str) -> float:
        """Mean normalised entropy of the average of the deterministic and N dropout softmaxes."""
        n = self.options.mc_dropout
        probs = base_probs.clone()
        bar = StageBar(title, disable=self.options.quiet)
        enable_mc_dropout(self.model, True)
        try:
            for k in range(n):
                sample = sliding_window(self.model, array, self.window, self.device, (), bar.update,
                                        stage=f"mc dropout {k + 1}/{n}")
                probs += softmax_with_temperature(sample.logits, self.temperature)
        finally:
            enable_mc_dropout(self.model, False)
            bar.close()
        probs /= n + 1
        return float(normalised_entropy(probs).mean())


def _log(message: str, quiet: bool) -> None:
    if not quiet:
        print(message, file=sys.stderr, flush=True)


def _pick_even(items: list, n: int | None) -> list:
    """n items spread evenly over the (sorted) list; all when n is None or ≥ len."""
    if n is None or n >= len(items):
        return list(items)
    if n <= 0:
        return []
    idx = np.unique(np.round(np.linspace(0, len(items) - 1, n)).astype(int))
    return [items[i] for i in idx]


def _header_voxels(path: Path) -> int:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return int(np.prod(reader.GetSize()))


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def evaluate(bundle_path: str | os.PathLike, data_dirs: Sequence[str | os.PathLike],
             ood_dirs: Sequence[str | os.PathLike] = (), out_dir: str | os.PathLike = "evaluation",
             options: EvalOptions | None = None, **overrides) -> dict:
    """Evaluate a bundle on its test split (and OOD folders); writes OUT/metrics.json and plots."""
    options = options or EvalOptions()
    for k, v in overrides.items():
        if not hasattr(options, k):
            raise TypeError(f"unknown evaluation option {k!r}")
        setattr(options, k, v)
    t_start = time.perf_counter()
    quiet = options.quiet
    bundle = load_bundle(bundle_path)
    datasets = match_datasets(bundle, data_dirs)
    oods = ood_volumes(ood_dirs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if options.split not in ("train", "val", "test"):
        raise MultiTaskSegError(f"--split must be train, val or test, not {options.split!r}")
    ev = Evaluator(bundle, options)
    names = bundle.context_names
    context_labels = ev.predictor.context_labels
    t_key = "T=1"
    temps = [("T=1", 1.0)]
    bundle_t_key = f"T={ev.temperature:.4g}"
    if bundle_t_key != t_key:
        temps.append((bundle_t_key, ev.temperature))

    # the work list
    test_cases: list[tuple[EvalDataset, Case]] = []
    for ds in datasets:
        cases = ds.cases(options.split)
        if options.max_cases_per_context is not None:
            cases = cases[:options.max_cases_per_context]
        if not cases:
            warnings.warn(f"{ds.spec.name}: no {options.split} case in the bundle's split")
        test_cases += [(ds, c) for c in cases]
    if not test_cases:
        raise MultiTaskSegError(f"the bundle's split has no {options.split} case for the datasets given")
    mc_ids = set()
    if options.mc_dropout > 0:
        for ds in datasets:
            ids = [c.case_id for d, c in test_cases if d is ds]
            mc_ids |= {(ds.spec.name, i) for i in (ids if options.mc_dropout_cases is None
                                                   else ids[:options.mc_dropout_cases])}
    size_ids = set()
    for ds in datasets:
        mine = sorted((c for d, c in test_cases if d is ds), key=lambda c: _header_voxels(c.image))
        n = options.size_control_cases
        size_ids |= {(ds.spec.name, c.case_id) for c in (mine if n is None else mine[:n])}
    train_cases = [(ds, c) for ds in datasets for c in _pick_even(ds.cases("train"), options.max_train_cases)]
    _log(f"evaluating {bundle.path} on {len(test_cases)} {options.split} case(s) of "
         f"{', '.join(d.spec.name for d in datasets)}, {len(oods)} OOD volume(s), {len(train_cases)} training "
         f"case(s) for the Mahalanobis fit; MC dropout {options.mc_dropout} pass(es) on {len(mc_ids)} test "
         f"case(s){' and every OOD volume' if options.mc_dropout > 0 else ''}; size check on {len(size_ids)} case(s); "
         f"device {ev.device}", quiet)

    # --- baselines fitted on the training split -----------------------------------------------
    geometry_train = np.stack([file_geometry(c.image) for ds in datasets for c in ds.cases("train")])
    size_detector = SizeControlDetector.fit(geometry_train)
    pre_config = bundle.preprocessing
    cache = Path(options.cache_dir or (bundle.meta.get("training", {}).get("config", {}) or {}).get("cache_dir")
                 or Path.home() / ".cache" / "multitaskseg" / "preprocessed")
    train_features, train_ctx = [], []
    for i, (ds, case) in enumerate(train_cases):
        t = time.perf_counter()
        cached = preprocess_case(case, ds.spec, pre_config, cache, ds.context)
        _, pooled = ev.forward(cached.image.astype(np.float32), f"[train {i + 1}/{len(train_cases)}] "
                               f"{case.case_id}", taps=())
        train_features.append(pooled)
        train_ctx.append(ds.context)
        _log(f"[train {i + 1}/{len(train_cases)}] {ds.spec.name}/{case.case_id}: bottleneck features "
             f"({time.perf_counter() - t:.1f} s)", quiet)
    mahalanobis = MahalanobisDetector.fit(np.stack(train_features), train_ctx) if train_features else None

    def baseline_scores(p: _Pass, probs_t: torch.Tensor, geometry: np.ndarray) -> dict:
        scores = uncertainty_scores(probs_t)
        if mahalanobis is not None and p.pooled is not None:
            scores["mahalanobis"] = mahalanobis.score(p.pooled)
        scores["size_control"] = size_detector.score(geometry)
        return scores

    # --- test cases ---------------------------------------------------------------------------
    ood_records: list[dict] = []
    case_records: dict[str, list[dict]] = {ds.spec.name: [] for ds in datasets}
    calib = {ds.spec.name: {k: {v: {"whole": PooledReliability(options.n_bins),
                                    "boundary": PooledReliability(options.n_bins)}
                                for v in ds.structures} for k, _ in temps} for ds in datasets}
    size_records: list[dict] = []
    signatures_test: list[tuple[np.ndarray, int]] = []
    signatures_ood: list[np.ndarray] = []
    n_total = len(test_cases)
    for i, (ds, case) in enumerate(test_cases):
        t0 = time.perf_counter()
        title = f"[{i + 1}/{n_total}] {ds.spec.name}/{case.case_id}"
        image = read_volume(case.image)
        label_image = sitk.ReadImage(str(case.label))
        if label_image.GetSize() != image.GetSize():
            raise DatasetError(f"{case.label}: label size {label_image.GetSize()} does not match image size "
                               f"{image.GetSize()}")
        p = ev.run(image, title)
        signature, spectral_scores, ood = ev.spectral(p.gram)
        signatures_test.append((signature, ds.context))
        head = int(np.argmax(p.context_logits)) if p.context_logits is not None else None
        by_signature = names.index(ood.nearest_context)
        recognised = ev.predictor._recognise_context(p.context_logits, ood)

        # calibration on the canonical grid (unrestricted probabilities)
        gt_canon = ds.lut[resample_label_to_grid(label_image, p.pre.grid)]
        probs_t = None
        argmax = p.logits.argmax(0).numpy()
        for key, temp in temps:
            probs = softmax_with_temperature(p.logits, temp)
            for v in ds.structures:
                cal = structure_calibration(probs[v].numpy(), gt_canon == v, argmax == v, options.n_bins,
                                            options.band_radius)
                calib[ds.spec.name][key][v]["whole"].add(cal["whole"])
                calib[ds.spec.name][key][v]["boundary"].add(cal["boundary"])
            if temp == ev.temperature:
                probs_t = probs
            else:
                del probs
        scores = {**spectral_scores, **baseline_scores(p, probs_t, image_geometry(image))}
        if (ds.spec.name, case.case_id) in mc_ids:
            scores["mc_dropout_entropy"] = ev.mc_dropout_entropy(p.pre.array, probs_t, title)

        # segmentation on the input grid, without and with restriction to the recognised context
        entropy = normalised_entropy(probs_t)
        labels, _ = Predictor._to_input_grid(probs_t, entropy, p.pre.grid, image)
        restricted = restrict_labels(labels.copy(), context_labels[recognised])
        del probs_t, entropy
        gt = ds.lut[sitk.GetArrayFromImage(label_image)]
        spacing = image.GetSpacing()[::-1]
        rec = {"case": case.case_id, "dataset": ds.spec.name, "dice": {}, "hd95_mm": {}, "dice_restricted": {},
               "hd95_mm_restricted": {}}
        for v, name in ds.structures.items():
            g = gt == v
            rec["dice"][name] = dice(labels == v, g)
            rec["hd95_mm"][name] = hd95(labels == v, g, spacing)
            rec["dice_restricted"][name] = dice(restricted == v, g)
            rec["hd95_mm_restricted"][name] = hd95(restricted == v, g, spacing)
        fg = labels > 0
        other = fg & ~np.isin(labels, context_labels[ds.context])
        rec.update({"foreground_voxels": int(fg.sum()), "other_context_voxels": int(other.sum()),
                    "confusion_rate": float(other.sum() / fg.sum()) if fg.any() else None,
                    "context_head": names[head] if head is not None else None,
                    "context_signature": names[by_signature], "context_used": names[recognised],
                    "ood": ood.to_dict(), "scores": scores})
        ood_records.append({"case": case.case_id, "group": ds.spec.name, "ood": False, "scores": scores,
                            "spectral_is_ood": ood.is_ood, "nearest_context": ood.nearest_context,
                            "recognised_context": names[recognised]})

        if (ds.spec.name, case.case_id) in size_ids:
            size_records.append({"case": case.case_id, "context": ds.spec.name, "variant": "original",
                                 "size": list(image.GetSize()), "spacing": list(image.GetSpacing()),
                                 "score": ood.score, "threshold": ood.threshold, "is_ood": ood.is_ood,
                                 "size_control_score": scores["size_control"]})
            for variant, make in (("crop_central_50pct", central_crop), ("pad_2x_min", pad_to_factor)):
                ts = time.perf_counter()
                v_img = make(image)
                vp = ev.run(v_img, f"{title} {variant}")
                _, _, v_ood = ev.spectral(vp.gram)
                size_records.append({"case": case.case_id, "context": ds.spec.name, "variant": variant,
                                     "size": list(v_img.GetSize()), "spacing": list(v_img.GetSpacing()),
                                     "score": v_ood.score, "threshold": v_ood.threshold, "is_ood": v_ood.is_ood,
                                     "size_control_score": size_detector.score(image_geometry(v_img))})
                _log(f"{title} {variant}: size {v_img.GetSize()}, spectral score {v_ood.score:.4f} "
                     f"({'OOD' if v_ood.is_ood else 'in distribution'}; original {ood.score:.4f}) "
                     f"({time.perf_counter() - ts:.1f} s)", quiet)
        rec["seconds"] = round(time.perf_counter() - t0, 2)
        case_records[ds.spec.name].append(rec)
        dice_txt = ", ".join(f"{n} {v:.3f}" if v is not None else f"{n} n/a" for n, v in rec["dice"].items())
        elapsed = time.perf_counter() - t_start
        _log(f"{title}: Dice {dice_txt}; context {names[recognised]}; OOD score {ood.score:.4f}"
             f"{' (OOD)' if ood.is_ood else ''}; {rec['seconds']:.1f} s (elapsed {elapsed / 60:.1f} min)", quiet)
        del p

    # --- OOD volumes ------------------------------------------------------------------------------
    for i, (name, path) in enumerate(oods):
        t0 = time.perf_counter()
        title = f"[ood {i + 1}/{len(oods)}] {name}"
        image = read_volume(path)
        p = ev.run(image, title)
        signature, spectral_scores, ood = ev.spectral(p.gram)
        signatures_ood.append(signature)
        probs_t = softmax_with_temperature(p.logits, ev.temperature)
        scores = {**spectral_scores, **baseline_scores(p, probs_t, image_geometry(image))}
        if options.mc_dropout > 0:
            scores["mc_dropout_entropy"] = ev.mc_dropout_entropy(p.pre.array, probs_t, title)
        recognised = ev.predictor._recognise_context(p.context_logits, ood)
        ood_records.append({"case": name, "group": OOD_POSITIVE, "ood": True, "path": str(path), "scores": scores,
                            "spectral_is_ood": ood.is_ood, "nearest_context": ood.nearest_context,
                            "recognised_context": names[recognised]})
        _log(f"{title}: OOD score {ood.score:.4f} ({'flagged' if ood.is_ood else 'NOT flagged'}); "
             f"{time.perf_counter() - t0:.1f} s", quiet)
        del p, probs_t

    # --- aggregate ---------------------------------------------------------------------------------
    contexts = {}
    for ds in datasets:
        recs = case_records[ds.spec.name]
        if not recs:
            continue
        ids = [r["case"] for r in recs]

        def per_structure(key: str) -> dict:
            return {name: summarise({r["case"]: r[key][name] for r in recs}) for name in ds.structures.values()}

        fg = sum(r["foreground_voxels"] for r in recs)
        other = sum(r["other_context_voxels"] for r in recs)
        dice_s, hd_s = per_structure("dice"), per_structure("hd95_mm")
        dice_r, hd_r = per_structure("dice_restricted"), per_structure("hd95_mm_restricted")
        calibration, reliability_data = {}, {}
        for key, _ in temps:
            calibration[key], reliability_data[key] = {}, {}
            for v, name in ds.structures.items():
                whole = calib[ds.spec.name][key][v]["whole"].result()
                band = calib[ds.spec.name][key][v]["boundary"].result()
                calibration[key][name] = {"ece": whole.ece, "mce": whole.mce, "ece_boundary": band.ece,
                                          "mce_boundary": band.mce, "voxels": int(whole.counts.sum()),
                                          "voxels_boundary": int(band.counts.sum())}
                reliability_data[key][name] = {"whole": whole.to_dict(), "boundary": band.to_dict()}
        head_hits = [r["context_head"] == ds.spec.name for r in recs if r["context_head"] is not None]
        contexts[ds.spec.name] = {
            "n_cases": len(recs), "case_ids": ids,
            "structures": {name: {"dice": dice_s[name], "hd95_mm": hd_s[name]} for name in ds.structures.values()},
            "dice_restricted": dice_r, "hd95_mm_restricted": hd_r,
            "confusion_rate": {"pooled": other / fg if fg else None,
                               **summarise({r["case"]: r["confusion_rate"] for r in recs})},
            "context_recognition": {
                "head": float(np.mean(head_hits)) if head_hits else None,
                "signature": float(np.mean([r["context_signature"] == ds.spec.name for r in recs])),
                "used_for_restriction": float(np.mean([r["context_used"] == ds.spec.name for r in recs]))},
            "calibration": calibration, "reliability": reliability_data,
            "false_alarm_rate": float(np.mean([r["ood"]["is_ood"] for r in recs])),
            "n_training_cases": bundle.contexts[ds.context].get("n_training_cases"),
            "cases": recs,
        }

    detector_names = []
    for r in ood_records:
        detector_names += [k for k in r["scores"] if k not in detector_names]
    detectors = {}
    for k in detector_names:
        ind = [r["scores"].get(k) for r in ood_records if not r["ood"]]
        odd = [r["scores"].get(k) for r in ood_records if r["ood"]]
        detectors[k] = detection_metrics(ind, odd)
    spectral_name = f"spectral:{'+'.join(ev.layers)}"
    all_recs = [r for recs in case_records.values() for r in recs]
    metrics = {
        "bundle": str(bundle.path), "split": options.split, "temperature": ev.temperature,
        "device": str(ev.device),
        "options": {k: getattr(options, k) for k in ("mc_dropout", "mc_dropout_cases", "max_cases_per_context",
                                                      "max_train_cases", "size_control_cases", "n_bins",
                                                      "band_radius")},
        "definitions": {
            "dice": "2|A∩B|/(|A|+|B|) on the original image grid; null when prediction and reference are both empty",
            "hd95_mm": "max of the two directed 95th percentiles of surface distances (mm, scipy EDT with voxel "
                       "spacing); null when either mask is empty",
            "dice_restricted": "Dice with the output restricted to the recognised context's structures",
            "confusion_rate": "fraction of predicted foreground voxels (unrestricted) labelled with another "
                              "context's structure; 'pooled' = over all voxels of the context's cases",
            "calibration": "per-structure foreground probability vs the label resampled by nearest neighbour "
                           "onto the canonical grid; equal-width bins pooled over the context's cases; boundary = "
                           f"within {options.band_radius} voxels of the predicted structure's boundary",
            "ood": "OOD is the positive class; in-distribution = the split's cases; scores: higher = more OOD",
            "false_alarm_rate": f"fraction of the context's cases flagged by {spectral_name} at the bundle's threshold",
        },
        "contexts": contexts,
        "context_recognition": {
            "head": float(np.mean([r["context_head"] == r["dataset"] for r in all_recs]))
            if all(r["context_head"] is not None for r in all_recs) else None,
            "signature": float(np.mean([r["context_signature"] == r["dataset"] for r in all_recs]))},
        "ood": {"detector": spectral_name, "threshold": ev.detector.threshold,
                "n_in_distribution": sum(not r["ood"] for r in ood_records),
                "n_ood": sum(r["ood"] for r in ood_records), "detectors": detectors, "cases": ood_records,
                "mahalanobis": {"n_training_cases": len(train_features), "features": "global average of the "
                                f"bottleneck (enc{len(bundle.network_config.widths) - 1}) output"},
                "size_control": {"n_training_cases": int(len(geometry_train))}},
        "size_control": size_records,
        "plots": [],
        "seconds": None,
    }
    if options.plots:
        from . import plots
        with np.load(bundle.path / "signatures.npz", allow_pickle=False) as data:
            train_sig, train_sig_ctx = data["signatures"], data["context_index"]
        files = []
        for name, ctx in contexts.items():
            files.append(plots.reliability_diagram(ctx["reliability"], name, out / f"reliability_{_safe_name(name)}.png"))
        files.append(plots.signature_pca(train_sig, train_sig_ctx, [s for s, _ in signatures_test],
                                         [c for _, c in signatures_test], signatures_ood, names,
                                         out / "signatures_pca.png"))
        if any(r["ood"] for r in ood_records):
            files.append(plots.roc_curves(ood_records, list(detectors), out / "ood_roc.png"))
        files.append(plots.ood_scores(ood_records, spectral_name, ev.detector.threshold, out / "ood_scores.png"))
        files.append(plots.dice_boxplot(contexts, out / "dice.png"))
        if size_records:
            files.append(plots.size_control(size_records, out / "size_control.png"))
        metrics["plots"] = [f.name for f in files if f is not None]
    metrics["seconds"] = round(time.perf_counter() - t_start, 1)
    metrics = json_clean(metrics)
    tmp = out / ".metrics.json.partial"
    tmp.write_text(json.dumps(metrics, indent=2, allow_nan=False), encoding="utf-8")
    os.replace(tmp, out / "metrics.json")
    _log(f"wrote {out / 'metrics.json'} and {len(metrics['plots'])} plot(s) in {metrics['seconds'] / 60:.1f} min",
         quiet)
    return metrics
