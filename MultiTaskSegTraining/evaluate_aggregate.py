"""Aggregation of `mtseg evaluate`'s per-case records into the metrics document."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from MultiTaskSegLib.bundle import Bundle

from .evaluate_data import EvalDataset
from .evaluate_metrics import summarise
from .ood_baselines import detection_metrics


def context_metrics(
    bundle: Bundle, ds: EvalDataset, recs: list[dict], calib: dict, temps: list[tuple[str, float]]
) -> dict:
    """Per-structure Dice/HD95 summaries, pooled calibration, recognition and false alarms of one context."""
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
            calibration[key][name] = {
                "ece": whole.ece,
                "mce": whole.mce,
                "ece_boundary": band.ece,
                "mce_boundary": band.mce,
                "voxels": int(whole.counts.sum()),
                "voxels_boundary": int(band.counts.sum()),
            }
            reliability_data[key][name] = {"whole": whole.to_dict(), "boundary": band.to_dict()}
    head_hits = [r["context_head"] == ds.spec.name for r in recs if r["context_head"] is not None]
    return {
        "n_cases": len(recs),
        "case_ids": ids,
        "structures": {name: {"dice": dice_s[name], "hd95_mm": hd_s[name]} for name in ds.structures.values()},
        "dice_restricted": dice_r,
        "hd95_mm_restricted": hd_r,
        "confusion_rate": {
            "pooled": other / fg if fg else None,
            **summarise({r["case"]: r["confusion_rate"] for r in recs}),
        },
        "context_recognition": {
            "head": float(np.mean(head_hits)) if head_hits else None,
            "signature": float(np.mean([r["context_signature"] == ds.spec.name for r in recs])),
            "used_for_restriction": float(np.mean([r["context_used"] == ds.spec.name for r in recs])),
        },
        "calibration": calibration,
        "reliability": reliability_data,
        "false_alarm_rate": float(np.mean([r["ood"]["is_ood"] for r in recs])),
        "n_training_cases": bundle.contexts[ds.context].get("n_training_cases"),
        "cases": recs,
    }


def detector_metrics(ood_records: Sequence[dict]) -> dict:
    """AUROC / FPR at 95 % TPR of every score found in the records (OOD = positive)."""
    names: list[str] = []
    for r in ood_records:
        names += [k for k in r["scores"] if k not in names]
    detectors = {}
    for k in names:
        ind = [r["scores"].get(k) for r in ood_records if not r["ood"]]
        odd = [r["scores"].get(k) for r in ood_records if r["ood"]]
        detectors[k] = detection_metrics(ind, odd)
    return detectors


def definitions(band_radius: int, spectral_name: str) -> dict:
    return {
        "dice": "2|A∩B|/(|A|+|B|) on the original image grid, of the network's argmax over every structure "
        "(no restriction, no post-processing); null when prediction and reference are both empty",
        "hd95_mm": "max of the two directed 95th percentiles of surface distances (mm, scipy EDT with voxel "
        "spacing); null when either mask is empty",
        "dice_restricted": "Dice of what mtseg predict outputs: restricted to the recognised context's structures, "
        "then the bundle's largest-component post-processing",
        "confusion_rate": "fraction of predicted foreground voxels (unrestricted) labelled with another "
        "context's structure; 'pooled' = over all voxels of the context's cases",
        "calibration": "per-structure foreground probability vs the label resampled by nearest neighbour "
        "onto the canonical grid; equal-width bins pooled over the context's cases; boundary = "
        f"within {band_radius} voxels of the predicted structure's boundary",
        "ood": "OOD is the positive class; in-distribution = the split's cases; scores: higher = more OOD",
        "false_alarm_rate": f"fraction of the context's cases flagged by {spectral_name} at the bundle's threshold",
    }


def recognition_overall(all_recs: list[dict]) -> dict:
    return {
        "head": float(np.mean([r["context_head"] == r["dataset"] for r in all_recs]))
        if all(r["context_head"] is not None for r in all_recs)
        else None,
        "signature": float(np.mean([r["context_signature"] == r["dataset"] for r in all_recs])),
    }
