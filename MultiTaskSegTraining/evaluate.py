"""The evaluation engine behind `mtseg evaluate`: segmentation, calibration and OOD detection.

Every test case (the bundle's own split; test cases were never used for training, model
selection, temperature or threshold) is preprocessed and run through the sliding window once;
the blended logits, the per-layer Gram matrices, the context-head logits and the pooled
bottleneck features all come from that one pass. Then:

Segmentation (on the ORIGINAL image grid, exactly as `mtseg predict` makes labels)
    Labels are the argmax of the temperature-scaled probabilities resampled onto the input
    grid (``Predictor.to_input_grid``), without and with restriction to the recognised
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

import json
import os
import re
import time
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

from MultiTaskSegLib.atomic import write_text_atomic
from MultiTaskSegLib.bundle import load_bundle
from MultiTaskSegLib.errors import MultiTaskSegError

from .data import Case, preprocess_case
from .evaluate_aggregate import context_metrics, definitions, detector_metrics, recognition_overall
from .evaluate_case import (
    Baselines,
    EvalOptions,
    Evaluator,
    log,
    new_calibration_bins,
    score_ood_volume,
    score_test_case,
    size_check,
)
from .evaluate_data import EvalDataset, header_voxels, match_datasets, ood_volumes, pick_even
from .evaluate_metrics import PooledReliability, dice, hd95, json_clean, summarise  # noqa: F401  (public names)
from .ood_baselines import MahalanobisDetector, SizeControlDetector, file_geometry

OOD_POSITIVE = "ood"


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _work_list(datasets: list[EvalDataset], options: EvalOptions) -> tuple[list[tuple[EvalDataset, Case]], set, set]:
    """(test cases, ids that get MC dropout, ids that get the size check)."""
    test_cases: list[tuple[EvalDataset, Case]] = []
    for ds in datasets:
        cases = ds.cases(options.split)
        if options.max_cases_per_context is not None:
            cases = cases[: options.max_cases_per_context]
        if not cases:
            warnings.warn(f"{ds.spec.name}: no {options.split} case in the bundle's split", stacklevel=2)
        test_cases += [(ds, c) for c in cases]
    if not test_cases:
        raise MultiTaskSegError(f"the bundle's split has no {options.split} case for the datasets given")
    mc_ids = set()
    if options.mc_dropout > 0:
        for ds in datasets:
            ids = [c.case_id for d, c in test_cases if d is ds]
            mc_ids |= {
                (ds.spec.name, i)
                for i in (ids if options.mc_dropout_cases is None else ids[: options.mc_dropout_cases])
            }
    size_ids = set()
    for ds in datasets:
        mine = sorted((c for d, c in test_cases if d is ds), key=lambda c: header_voxels(c.image))
        n = options.size_control_cases
        size_ids |= {(ds.spec.name, c.case_id) for c in (mine if n is None else mine[:n])}
    return test_cases, mc_ids, size_ids


def _fit_baselines(ev: Evaluator, datasets: list[EvalDataset], train_cases: list, options: EvalOptions) -> tuple:
    """Size control (all training headers) and Mahalanobis (pooled bottleneck of ``train_cases``)."""
    geometry_train = np.stack([file_geometry(c.image) for ds in datasets for c in ds.cases("train")])
    size_detector = SizeControlDetector.fit(geometry_train)
    bundle = ev.bundle
    cache = Path(
        options.cache_dir
        or (bundle.schema.training.config or {}).get("cache_dir")
        or Path.home() / ".cache" / "multitaskseg" / "preprocessed"
    )
    train_features, train_ctx = [], []
    for i, (ds, case) in enumerate(train_cases):
        t = time.perf_counter()
        cached = preprocess_case(case, ds.spec, bundle.preprocessing, cache, ds.context)
        _, pooled = ev.forward(
            cached.image.astype(np.float32), f"[train {i + 1}/{len(train_cases)}] {case.case_id}", taps=()
        )
        train_features.append(pooled)
        train_ctx.append(ds.context)
        log(
            f"[train {i + 1}/{len(train_cases)}] {ds.spec.name}/{case.case_id}: bottleneck features "
            f"({time.perf_counter() - t:.1f} s)",
            options.quiet,
        )
    mahalanobis = MahalanobisDetector.fit(np.stack(train_features), train_ctx) if train_features else None
    return Baselines(mahalanobis, size_detector), len(train_features), len(geometry_train)


def _plots(
    ev: Evaluator,
    contexts: dict,
    ood_records: list,
    detectors: dict,
    signatures_test: list,
    signatures_ood: list,
    size_records: list,
    spectral_name: str,
    out: Path,
) -> list[str]:
    from . import plots

    bundle = ev.bundle
    with np.load(bundle.path / "signatures.npz", allow_pickle=False) as data:
        train_sig, train_sig_ctx = data["signatures"], data["context_index"]
    files = []
    for name, ctx in contexts.items():
        files.append(plots.reliability_diagram(ctx["reliability"], name, out / f"reliability_{_safe_name(name)}.png"))
    files.append(
        plots.signature_pca(
            train_sig,
            train_sig_ctx,
            [s for s, _ in signatures_test],
            [c for _, c in signatures_test],
            signatures_ood,
            bundle.context_names,
            out / "signatures_pca.png",
        )
    )
    if any(r["ood"] for r in ood_records):
        files.append(plots.roc_curves(ood_records, list(detectors), out / "ood_roc.png"))
    files.append(plots.ood_scores(ood_records, spectral_name, ev.detector.threshold, out / "ood_scores.png"))
    files.append(plots.dice_boxplot(contexts, out / "dice.png"))
    if size_records:
        files.append(plots.size_control(size_records, out / "size_control.png"))
    return [f.name for f in files if f is not None]


def evaluate(
    bundle_path: str | os.PathLike,
    data_dirs: Sequence[str | os.PathLike],
    ood_dirs: Sequence[str | os.PathLike] = (),
    out_dir: str | os.PathLike = "evaluation",
    options: EvalOptions | None = None,
    **overrides,
) -> dict:
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
    temps = [("T=1", 1.0)]
    if f"T={ev.temperature:.4g}" != "T=1":
        temps.append((f"T={ev.temperature:.4g}", ev.temperature))

    test_cases, mc_ids, size_ids = _work_list(datasets, options)
    train_cases = [(ds, c) for ds in datasets for c in pick_even(ds.cases("train"), options.max_train_cases)]
    log(
        f"evaluating {bundle.path} on {len(test_cases)} {options.split} case(s) of "
        f"{', '.join(d.spec.name for d in datasets)}, {len(oods)} OOD volume(s), {len(train_cases)} training "
        f"case(s) for the Mahalanobis fit; MC dropout {options.mc_dropout} pass(es) on {len(mc_ids)} test "
        f"case(s){' and every OOD volume' if options.mc_dropout > 0 else ''}; size check on {len(size_ids)} case(s); "
        f"device {ev.device}",
        quiet,
    )
    baselines, n_mahalanobis, n_geometry = _fit_baselines(ev, datasets, train_cases, options)

    # --- test cases ---------------------------------------------------------------------------
    ood_records: list[dict] = []
    case_records: dict[str, list[dict]] = {ds.spec.name: [] for ds in datasets}
    calib = new_calibration_bins(datasets, temps, options.n_bins)
    size_records: list[dict] = []
    signatures_test: list[tuple[np.ndarray, int]] = []
    signatures_ood: list[np.ndarray] = []
    for i, (ds, case) in enumerate(test_cases):
        t0 = time.perf_counter()
        title = f"[{i + 1}/{len(test_cases)}] {ds.spec.name}/{case.case_id}"
        rec, ood_rec, signature, ood, image = score_test_case(
            ev, ds, case, title, temps, calib, baselines, (ds.spec.name, case.case_id) in mc_ids
        )
        signatures_test.append((signature, ds.context))
        ood_records.append(ood_rec)
        if (ds.spec.name, case.case_id) in size_ids:
            size_records += size_check(
                ev, ds, case, image, ood, rec["scores"]["size_control"], baselines.size_detector, title
            )
        rec["seconds"] = round(time.perf_counter() - t0, 2)
        case_records[ds.spec.name].append(rec)
        dice_txt = ", ".join(f"{n} {v:.3f}" if v is not None else f"{n} n/a" for n, v in rec["dice"].items())
        elapsed = time.perf_counter() - t_start
        log(
            f"{title}: Dice {dice_txt}; context {rec['context_used']}; OOD score {ood.score:.4f}"
            f"{' (OOD)' if ood.is_ood else ''}; {rec['seconds']:.1f} s (elapsed {elapsed / 60:.1f} min)",
            quiet,
        )

    # --- OOD volumes ------------------------------------------------------------------------------
    for i, (name, path) in enumerate(oods):
        t0 = time.perf_counter()
        title = f"[ood {i + 1}/{len(oods)}] {name}"
        record, signature = score_ood_volume(ev, name, path, title, baselines)
        ood_records.append(record)
        signatures_ood.append(signature)
        flagged = record["spectral_is_ood"]
        log(
            f"{title}: OOD score {record['scores'][ev.detector.name]:.4f} "
            f"({'flagged' if flagged else 'NOT flagged'}); {time.perf_counter() - t0:.1f} s",
            quiet,
        )

    # --- aggregate ---------------------------------------------------------------------------------
    contexts = {
        ds.spec.name: context_metrics(bundle, ds, case_records[ds.spec.name], calib, temps)
        for ds in datasets
        if case_records[ds.spec.name]
    }
    detectors = detector_metrics(ood_records)
    spectral_name = ev.detector.name
    all_recs = [r for recs in case_records.values() for r in recs]
    metrics = {
        "bundle": str(bundle.path),
        "split": options.split,
        "temperature": ev.temperature,
        "device": str(ev.device),
        "options": {
            k: getattr(options, k)
            for k in (
                "mc_dropout",
                "mc_dropout_cases",
                "max_cases_per_context",
                "max_train_cases",
                "size_control_cases",
                "n_bins",
                "band_radius",
            )
        },
        "definitions": definitions(options.band_radius, spectral_name),
        "contexts": contexts,
        "context_recognition": recognition_overall(all_recs),
        "ood": {
            "detector": spectral_name,
            "threshold": ev.detector.threshold,
            "n_in_distribution": sum(not r["ood"] for r in ood_records),
            "n_ood": sum(r["ood"] for r in ood_records),
            "detectors": detectors,
            "cases": ood_records,
            "mahalanobis": {
                "n_training_cases": n_mahalanobis,
                "features": f"global average of the bottleneck (enc{len(bundle.network_config.widths) - 1}) output",
            },
            "size_control": {"n_training_cases": int(n_geometry)},
        },
        "size_control": size_records,
        "plots": [],
        "seconds": None,
    }
    if options.plots:
        metrics["plots"] = _plots(
            ev, contexts, ood_records, detectors, signatures_test, signatures_ood, size_records, spectral_name, out
        )
    metrics["seconds"] = round(time.perf_counter() - t_start, 1)
    metrics = json_clean(metrics)
    write_text_atomic(out / "metrics.json", json.dumps(metrics, indent=2, allow_nan=False))
    log(f"wrote {out / 'metrics.json'} and {len(metrics['plots'])} plot(s) in {metrics['seconds'] / 60:.1f} min", quiet)
    return metrics
