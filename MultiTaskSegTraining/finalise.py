"""The last stage of a training run: temperature, post-processing, signatures and threshold, the bundle."""

from __future__ import annotations

import logging
import subprocess
import time
from pathlib import Path

import torch

from MultiTaskSegLib.bundle import save_bundle
from MultiTaskSegLib.bundle_schema import (
    BundleMeta,
    Calibration,
    ContextEntry,
    InferenceBlock,
    LabelEntry,
    OodBlock,
    Postprocessing,
    PreprocessingBlock,
    TrainingBlock,
)
from MultiTaskSegLib.inference import WindowConfig
from MultiTaskSegLib.network import ResidualUNet3D
from MultiTaskSegLib.ood import case_groups, loo_threshold
from MultiTaskSegLib.preprocessing import PreprocessingConfig
from MultiTaskSegLib.terminology import describe

from .config import TrainConfig
from .data import CachedCase, DatasetSpec, LabelSpace
from .postprocess_fit import fit_postprocessing
from .signatures import case_signatures
from .temperature import fit_temperature

log = logging.getLogger("mtseg.train")


def code_revision() -> str:
    try:
        root = Path(__file__).resolve().parents[1]
        return (
            subprocess.run(
                ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
            ).stdout.strip()
            or "unknown"
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def finalise(
    config: TrainConfig,
    model: ResidualUNet3D,
    specs: list[DatasetSpec],
    splits: dict,
    pre: PreprocessingConfig,
    space: LabelSpace,
    cases: dict[str, list[CachedCase]],
    output: Path,
    dev: torch.device,
    step: int,
    elapsed: float,
) -> Path:
    """Temperature on validation cases, training signatures + threshold, then the bundle."""
    window = WindowConfig(
        tuple(config.patch_size), config.overlap, config.batch_size, foreground_threshold=config.foreground_threshold
    )
    annotated = [space.annotated(d) for d in range(len(specs))]
    t0 = time.perf_counter()
    temperature, val_nll = fit_temperature(model, cases["val"], window, dev, annotated)
    log.info(
        "temperature %.3f fitted on %d validation cases (NLL %s) in %.0f s",
        temperature,
        len(cases["val"]),
        val_nll,
        time.perf_counter() - t0,
    )
    t0 = time.perf_counter()
    postprocessing = fit_postprocessing(model, cases["val"], window, dev, annotated, len(space.names))
    log.info(
        "largest-component post-processing for labels %s (validation Dice %s) in %.0f s",
        postprocessing["largest_component"],
        postprocessing["validation_dice"],
        time.perf_counter() - t0,
    )
    t0 = time.perf_counter()
    max_cases, augmentations = config.signature_max_cases, config.signature_augmentations
    if config.trust_fit_cases != 0:  # interim detector: `mtseg train` replaces it by the trust fit's right after
        max_cases, augmentations = 2, 0
    signature_cases = cases["train"]
    if max_cases:
        signature_cases = [
            c for d in range(len(specs)) for c in [c for c in cases["train"] if c.dataset == d][:max_cases]
        ]
    signatures, context_index, case_ids = case_signatures(
        model,
        signature_cases,
        window,
        dev,
        config.ood_layers,
        config.spectrum_length,
        augmentations,
        seed=config.seed,
    )
    try:
        threshold = loo_threshold(signatures, config.threshold_k, case_groups(case_ids))
    except ValueError:  # one training case: no leave-one-out distance exists
        threshold = None
        log.warning("only one training case: the OOD threshold cannot be set; scores are reported unflagged")
    log.info(
        "%d training signatures (%d dims) in %.0f s; OOD threshold %s",
        len(signatures),
        signatures.shape[1],
        time.perf_counter() - t0,
        threshold,
    )
    n_train = {s.name: len(splits[s.name]["train"]) for s in specs}
    labels = [
        LabelEntry(i + 1, name, specs[space.owner[i]].name, **describe(name, i)) for i, name in enumerate(space.names)
    ]
    contexts = [
        ContextEntry(
            s.name,
            s.modality,
            s.meta.get("region", _region(s)),
            s.meta.get("description", "")[:300],
            annotated[d],
            n_train[s.name],
            s.meta.get("licence", ""),
        )
        for d, s in enumerate(specs)
    ]
    meta = BundleMeta(
        architecture=model.config,
        preprocessing=PreprocessingBlock(pre, window),
        labels=labels,
        contexts=contexts,
        label_mode=config.label_mode,
        postprocessing=Postprocessing.from_dict(postprocessing),
        calibration=Calibration(temperature, "validation split", val_nll),
        ood=OodBlock(
            detector="spectral",
            layers=list(config.ood_layers),
            spectrum_length=config.spectrum_length,
            threshold=threshold,
            threshold_rule=f"mean + {config.threshold_k}·std of leave-one-case-out "
            "nearest-neighbour distances among training signatures",
            signature="log singular values of the (voxels × channels) feature matrix / sqrt(voxels), L2-normalised",
            signature_augmentations=config.signature_augmentations,
        ),
        inference=InferenceBlock(
            restrict_to_context=bool(
                config.restrict_to_context and len(specs) > 1 and config.label_mode == "per_structure"
            ),
            context_source=config.context_source if model.context_head is not None else "signature",
        ),
        training=TrainingBlock(
            datasets=[
                {"name": s.name, "path": str(s.root), "sha256": s.content_hash(), "n_cases": len(s.cases)}
                for s in specs
            ],
            split=splits,
            seed=config.seed,
            steps=step,
            minutes=round(elapsed / 60, 1),
            code_revision=code_revision(),
            config=config.to_dict(),
            torch=torch.__version__,
        ),
        metrics={},
    )
    save_bundle(output, meta, model.state_dict(), signatures, context_index, case_ids)
    log.info("bundle written to %s", output)
    return output


def _region(spec: DatasetSpec) -> str:
    text = (spec.name + " " + spec.meta.get("description", "")).lower()
    for key, region in (
        ("brain", "brain"),
        ("cardiac", "heart"),
        ("atri", "heart"),
        ("heart", "heart"),
        ("abdom", "abdomen"),
        ("liver", "abdomen"),
        ("prostate", "pelvis"),
    ):
        if key in text:
            return region
    return "unspecified"
