"""Re-finalising a bundle's trust parts from its own weights and its stored split:
the per-context spectral OOD detector (signatures, scales, threshold) and the quality model.

    mtseg finalise --bundle B --data DATASET... -o NEW_BUNDLE [--fit-cases N|all] [--records DIR]

Only train and validation cases of the split stored in B (``training.split``) are read, so a
dataset that has grown since training is fine: new cases are simply not used. The weights,
temperature and everything else in bundle.json are kept; ``ood`` and ``quality`` are replaced.
Records are cached per weights (``--records``, default ~/.cache/multitaskseg/trust/<sha>), so
a rerun resumes. `mtseg train` calls the same code at the end of training.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Sequence, cast

from safetensors.torch import load_file

from MultiTaskSegLib.bundle import META_FILE, MODEL_FILE, SIGNATURES_FILE, load_bundle, save_bundle
from MultiTaskSegLib.bundle_schema import BundleMeta, OodBlock
from MultiTaskSegLib.errors import MultiTaskSegError
from MultiTaskSegLib.predictor import Predictor

from .config import DEFAULT_TRUST_FIT_CASES
from .trust_bench import Plan, run_all, work_list
from .trust_fit import fit_detector, fit_detector_quality
from .trust_records import RECORD_VERSION
from .trust_report import DEFAULT_LAYERS, LAYER_SETS

KEEP = object()  # refit_trust's foreground_threshold: the bundle's own


def default_records_dir(bundle_path: Path, schema: BundleMeta | None = None) -> Path:
    """A cache per (weights, temperature, post-processing, record format, foreground threshold): what a record
    holds depends on all of them. ``schema``: the bundle's, as changed by the caller (default: as stored)."""
    schema = schema or load_bundle(bundle_path).schema
    post = schema.postprocessing.largest_component if schema.postprocessing else []
    key: list = [(schema.files or {})[MODEL_FILE], schema.calibration.temperature, sorted(post), RECORD_VERSION]
    if schema.preprocessing.window.foreground_threshold is not None:  # absent: the caches made before it stay valid
        key.append(schema.preprocessing.window.foreground_threshold)
    digest = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]
    return Path.home() / ".cache" / "multitaskseg" / "trust" / digest


def refit_trust(
    bundle_path: str | Path,
    data_dirs: Sequence,
    output: str | Path,
    records_dir: Path | None = None,
    fit_cases: int | None = DEFAULT_TRUST_FIT_CASES,
    device: str = "auto",
    overwrite: bool = False,
    log: Callable[[str], None] = print,
    layers: Sequence[str] | None = None,
    foreground_threshold: float | None | object = KEEP,
) -> Path:
    """Write ``output``: the bundle with a refitted detector and quality model (same weights); with
    ``foreground_threshold`` (a float, or None for a plain mean) the context head's window average changes to
    it (``WindowConfig.foreground_threshold``) before the fit, and the new bundle keeps it."""
    bundle_path, output = Path(bundle_path), Path(output)
    bundle = load_bundle(bundle_path)
    if foreground_threshold is not KEEP:
        bundle.schema.preprocessing.window.foreground_threshold = cast("float | None", foreground_threshold)
    if (output / META_FILE).exists() and not overwrite and output.resolve() != bundle_path.resolve():
        raise MultiTaskSegError(f"{output} already holds a bundle; choose another output or pass --overwrite")
    jobs = work_list(bundle, data_dirs, (), Plan(fit_cases=fit_cases, fit_only=True))
    records = run_all(
        Predictor(bundle, device), jobs, records_dir or default_records_dir(bundle_path, bundle.schema), log
    )
    fit = [r for r in records if r["family"] == "fit"]
    fit_shift = [r for r in records if r["family"] == "fit_shift"]
    fit_fov = [r for r in records if r["family"] == "fit_fov"]
    layers = list(layers or bundle.schema.ood.layers or LAYER_SETS[DEFAULT_LAYERS])  # default: the run's ood_layers
    det, loo = fit_detector(fit + fit_fov, layers, bundle.context_names)
    quality = fit_detector_quality(
        det, loo, fit, fit_shift, bundle.label_names, [list(c["labels"]) for c in bundle.contexts]
    )
    ood = OodBlock(
        detector=det.name.split(":")[0],
        layers=layers,
        spectrum_length=None,
        threshold=det.threshold,
        context_scale=[float(v) for v in det.context_scale],
        conditioning=det.conditioning,
        combination=det.combination,
        context_factor=None if det.context_factor is None else [float(v) for v in det.context_factor],
        threshold_rule="conformal 95 % quantile of the leave-one-patient-out scores of the train/val cases "
        "(about 5 % false alarms on new in-distribution cases); a context whose own cases' quantile is higher "
        "gets that as its threshold, applied as context_factor = threshold / its own on its scores",
        signature="log singular values of the (voxels × channels) feature matrix / sqrt(voxels), "
        "L2-normalised per layer, concatenated",
        scoring="d = (distance to the nearest training signature of the recognised context) / (that "
        "context's mean leave-one-patient-out nearest-neighbour distance, shrunk to the pooled mean with "
        "3 pseudo-cases); score = exp(mean of z(log d) and z(log(1 − context-head confidence))), z on the "
        "median and spread of the train/val cases (combination)",
        fitted_on=f"{len(fit)} train/val cases (bundle split) and a field-of-view variant of each ({len(fit_fov)})",
    )
    meta = dataclasses.replace(copy.deepcopy(bundle.schema), ood=ood, quality=quality.to_dict())
    state = load_file(str(bundle_path / MODEL_FILE), device="cpu")
    with tempfile.TemporaryDirectory(dir=output.parent if output.parent.exists() else None) as tmp:
        staged = Path(tmp) / "bundle"
        save_bundle(staged, meta, state, det.signatures, det.context_index, list(det.case_ids))
        for extra in bundle_path.iterdir():  # model card and other documents travel along
            if extra.is_file() and extra.name not in (META_FILE, MODEL_FILE, SIGNATURES_FILE):
                shutil.copy2(extra, staged / extra.name)
        output.mkdir(parents=True, exist_ok=True)
        for f in staged.iterdir():
            if f.name != META_FILE:
                shutil.copyfile(f, output / f.name)
        shutil.copyfile(staged / META_FILE, output / META_FILE)  # last: the hashes name files already in place
    load_bundle(output)  # hash check of what was written
    log(f"wrote {output}: detector {det.name} threshold {det.threshold:.3f}, quality model on {quality.fitted_on}")
    return output
