"""One record per image for the trust benchmark: everything the OOD detectors and the quality
model can use, from ONE pass through the public ``Predictor`` stages (as `mtseg predict` runs).

A record holds the log-spectrum signature of every tappable layer, the channel energies
(diagonal of each Gram matrix), the context head's probabilities, the shipped detector's
score, image-level uncertainty baselines, the quality evidence of the recognised context's
and the dataset's structures (``quality.structure_evidence``), the image geometry (size
control) and, for labelled images, the Dice of every annotated structure on the input grid
(output restricted to the recognised context, as `predict` writes it). Records are cached as
JSON files, so an interrupted benchmark resumes where it stopped.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from MultiTaskSegLib.atomic import write_text_atomic
from MultiTaskSegLib.ood import signature_from_grams
from MultiTaskSegLib.predictor import PredictOptions, Predictor
from MultiTaskSegLib.preprocessing import preprocess
from MultiTaskSegLib.quality import structure_evidence
from MultiTaskSegLib.uncertainty import class_argmax, merge_other_contexts, normalised_entropy, restrict_labels

from .evaluate_metrics import dice, json_clean
from .ood_baselines import image_geometry, uncertainty_scores

RECORD_VERSION = 3  # 2: "dice" is of the post-processed output (1 had no largest-component filter); 3: stray_share


def all_layers(predictor: Predictor) -> list[str]:
    return list(predictor.model.layer_names)


def image_record(
    predictor: Predictor, image: sitk.Image, label: np.ndarray | None = None, structures: dict[int, str] | None = None
) -> dict:
    """The record of one image; ``label`` holds bundle output values on the input grid (or None)."""
    t0 = time.perf_counter()
    layers = all_layers(predictor)
    pre = preprocess(image, predictor.preprocessing)
    window = predictor.window_config(PredictOptions())
    result = predictor.network_pass(pre.array, window, taps=layers)
    t_pass = time.perf_counter() - t0
    _, shipped = predictor.score_ood(result.gram, result.context_logits)
    probs = predictor.probabilities(result.logits)
    ctx = predictor.recognise_context(result.context_logits, shipped)
    allowed = predictor.context_labels[ctx]
    entropy = normalised_entropy(merge_other_contexts(probs, allowed))
    t = time.perf_counter()
    canon = restrict_labels(class_argmax(probs), allowed)
    voxel_ml = float(np.prod(pre.grid.GetSpacing())) / 1000.0
    wanted = sorted(set(allowed) | set(structures or {}))
    evidence = structure_evidence(probs, canon, entropy, wanted, voxel_ml)
    t_evidence = time.perf_counter() - t
    context_probs = (
        torch.softmax(torch.as_tensor(result.context_logits, dtype=torch.float64), 0).numpy()
        if result.context_logits is not None
        else None
    )
    rec = {
        "version": RECORD_VERSION,
        "signatures": {k: signature_from_grams(result.gram, [k]).tolist() for k in layers},
        "energies": {k: np.log(np.maximum(np.diag(result.gram[k]), 1e-12)).tolist() for k in layers},
        "context_probs": context_probs,
        "recognised": ctx,
        "shipped_score": shipped.score,
        "shipped_is_ood": shipped.is_ood,
        "uncertainty": uncertainty_scores(probs),
        "evidence": {str(v): e for v, e in evidence.items()},
        **record_settings(predictor),
        "geometry": image_geometry(image),
        "size": list(image.GetSize()),
        "spacing": list(image.GetSpacing()),
    }
    if label is not None:  # the Dice of what `predict` outputs: restricted, then post-processed
        labels, _ = predictor.to_input_grid(probs, entropy, pre.grid, image)
        predictor.postprocess(restrict_labels(labels, allowed))
        rec["dice"] = {str(v): dice(labels == v, label == v) for v in structures}
    rec["seconds"] = {"pass": t_pass, "evidence": t_evidence, "total": time.perf_counter() - t0}
    return rec


def record_settings(predictor: Predictor) -> dict:
    """The inference settings a record depends on beyond the bundle's weights (records before them: None)."""
    return {"foreground_threshold": predictor.window.foreground_threshold}


def cached_record(path: Path, make, settings: dict | None = None) -> dict:
    """Read the record at ``path`` or make and write it (temp file + rename: a killed run leaves no half file).
    A cached record of an older format, or made with other ``settings``, is made again."""
    if path.is_file():
        rec = json.loads(path.read_text(encoding="utf-8"))
        if rec.get("version", 1) == RECORD_VERSION and all(rec.get(k) == v for k, v in (settings or {}).items()):
            return rec
    rec = json_clean(make())
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(rec))
    return rec
