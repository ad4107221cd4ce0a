#!/usr/bin/env python
"""Write MODEL_CARD.md beside a bundle from its bundle.json and an `mtseg evaluate` metrics.json.

    python scripts/model_card.py MultiTaskSeg/Resources/Models/default --metrics evaluation/default

Also stores the headline test metrics in bundle.json's `metrics` (bundle.json is not hashed).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from MultiTaskSegLib.atomic import write_text_atomic

PROVENANCE = {
    "CardiacCineMR": ("ACDC cine bSSFP MR (30 patients × ED/ES), manual labels", "CC BY-NC-SA 4.0 (non-commercial)"),
    "LeftAtriumMR": (
        "2018 Atrial Segmentation Challenge LGE MR (20 cases, UA-MT preprocessing), manual labels",
        "challenge terms, research use only",
    ),
    "AbdomenCT": (
        "3D-IRCADb-01 (2 patients, manual masks) + TotalSegmentator example CTs (2, model pseudo-labels)",
        "IRCADb CC BY-NC-ND 4.0 (non-commercial, no derivatives); TotalSegmentator Apache-2.0",
    ),
    "BrainTumorMR": (
        "BraTS 2015 FLAIR via DeepMedic (6) + BraTS 2021 (1, oedema-only label), manual labels",
        "CC BY-NC-SA 3.0 / BraTS terms (non-commercial)",
    ),
    "BrainStructuresMR": (
        "voxelmorph test scan + a FreeSurfer subject (niivue demos), FreeSurfer automated labels",
        "Apache-2.0 / BSD-2-Clause; scan provenance not stated",
    ),
}


def fmt(x, d=3):
    return "–" if x is None else f"{x:.{d}f}"


def ood_text(ood: dict) -> str:
    if not ood.get("detector", "").startswith("spectral-ctx"):  # the first bundles: one global nearest neighbour
        return (
            f"OOD: {ood['signature']}, layers {ood['layers']}; score = distance to the nearest training "
            f"signature; threshold {ood['threshold']:.4f} = {ood['threshold_rule']}."
        )
    return (
        f"OOD ({ood['detector']}): {ood['signature']}, layers {ood['layers']}; scoring: {ood['scoring']}; "
        f"signatures of {ood['fitted_on']}; threshold {ood['threshold']:.3f} = {ood['threshold_rule']}."
    )


def quality_text(quality: dict | None) -> str:
    if not quality:
        return ""
    return (
        f" Quality: a logistic expected-Dice model per structure on {', '.join(quality['features'])}, fitted on "
        f"{quality['fitted_on']} (TorchIO artefacts), flag when the expected Dice is below "
        f"{quality['flag_below']} or the image is OOD; coefficients (each within the sign its evidence implies: "
        "more OOD, entropy, volume deviation or fragments never raise the expected Dice) in bundle.json."
    )


def postprocessing_text(post: dict | None, names: dict) -> str:
    if not post:
        return ""
    kept = [names.get(v, str(v)) for v in post.get("largest_component") or []]
    return (
        f" Post-processing chosen on {post.get('chosen_on') or 'the validation split'}: keep only the largest "
        "connected component of " + (", ".join(kept) if kept else "no structure") + "."
    )


def augmentation(config: dict) -> str:
    """The training run's augmentation in words (its config as stored in the bundle)."""
    if not config.get("augment", True):
        return "no augmentation"
    kinds = "rotation/scaling/intensity/noise/low-resolution"
    if config.get("artefact_augmentation"):
        kinds += " + artefact (smooth bias field, anisotropic blur, stronger noise)"
    return f"{kinds} augmentation"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--metrics", type=Path, help="folder with metrics.json from mtseg evaluate")
    ap.add_argument("--note", default="", help="a sentence on the training run's history (resumes, changes)")
    args = ap.parse_args()
    meta = json.loads((args.bundle / "bundle.json").read_text(encoding="utf-8"))
    m = json.loads((args.metrics / "metrics.json").read_text(encoding="utf-8")) if args.metrics else None
    tr = meta["training"]
    lines = [
        "# Model card: MultiTaskSeg default joint model",
        "",
        f"One 3D residual U-Net ({meta['architecture']['widths']} channels, dropout "
        f"{meta['architecture']['dropout']}, context head) trained jointly on five datasets; given only an "
        "image it recognises the context and segments that context's structures, with a calibrated "
        "uncertainty map and a spectral OOD score.",
        "",
        "## Contexts and structures",
        "",
        "| context | modality | region | structures | training cases |",
        "|---|---|---|---|---|",
    ]
    names = {l["value"]: l["name"] for l in meta["labels"]}
    for c in meta["contexts"]:
        lines.append(
            f"| {c['name']} | {c['modality']} | {c['region']} | "
            f"{', '.join(f'{v} {names[v]}' for v in c['labels'])} | {c['n_training_cases']} |"
        )
    lines += [
        "",
        "## Training data (provenance and licences)",
        "",
        "| dataset | content | licence | sha256 (of listing) |",
        "|---|---|---|---|",
    ]
    for d in tr["datasets"]:
        what, lic = PROVENANCE.get(d["name"], ("", ""))
        lines.append(f"| {d['name']} | {what} | {lic} | `{d['sha256'][:16]}…` |")
    lines += [
        "",
        "**Several training sets are non-commercial (ACDC, LA challenge, BraTS, IRCADb) and IRCADb is "
        "also no-derivatives: use this model for research only.** Geometry of ACDC, LA and voxelmorph is "
        "nominal; TotalSegmentator labels and BrainStructures labels are model-generated.",
        "",
        "## Training",
        "",
        f"`mtseg train --config configs/default_joint.yaml -o MultiTaskSeg/Resources/Models/default` — "
        f"{tr['steps']} steps ({tr['minutes']} min on a 2-core CPU, 1 thread), seed {tr['seed']}, "
        f"code revision `{tr['code_revision'][:10]}`, torch {tr['torch']}. Partial-label marginal loss "
        "(CE + soft Dice), AdamW with warm-up and cosine decay, datasets sampled ∝ √cases, 50 % foreground "
        f"patches, {augmentation(tr.get('config') or {})}. Split (patient level, seed 0): "
        + "; ".join(f"{k} {len(v['train'])}/{len(v['val'])}/{len(v['test'])}" for k, v in tr["split"].items())
        + " (train/val/test)."
        + (f" {args.note}" if args.note else ""),
        "",
        "## Preprocessing",
        "",
        f"Resampled to {meta['preprocessing']['target_spacing']} mm on an identity-direction (LPS) grid; CT "
        "(detected from intensities) clipped to [-200, 300] HU, MR clipped to its 0.5–99.5 percentiles, both "
        f"scaled to [0, 1]. Sliding window {meta['preprocessing']['patch_size']} voxels, overlap "
        f"{meta['preprocessing']['overlap']}, Gaussian blending.",
        "",
        "## Calibration and OOD detection",
        "",
        f"Temperature {meta['calibration']['temperature']:.3f}, fitted on the validation split. "
        + ood_text(meta["ood"])
        + quality_text(meta.get("quality"))
        + postprocessing_text(meta.get("postprocessing"), {l["value"]: l["name"] for l in meta["labels"]}),
    ]
    if m:
        lines += [
            "",
            "## Test-split performance (held-out cases)",
            "",
            "Dice and HD95 of what `mtseg predict` outputs: restricted to the recognised context's structures, "
            "then the largest-component post-processing above.",
            "",
            "| context | structure | Dice | HD95 (mm) | ECE (T=fit) | MCE (T=fit) |",
            "|---|---|---|---|---|---|",
        ]
        headline = {}
        for ctx, c in m["contexts"].items():
            key = list(c["calibration"].keys())[-1]
            for name in c["structures"]:
                d = c["dice_restricted"][name]
                h = c["hd95_mm_restricted"][name]
                cal = c["calibration"][key].get(name, {})
                lines.append(
                    f"| {ctx} | {name} | {fmt(d['mean'])} (n={d['n']}) | {fmt(h['mean'], 1)} | "
                    f"{fmt(cal.get('ece'), 4)} | {fmt(cal.get('mce'))} |"
                )
                headline[f"{ctx}/{name}"] = {"dice": d["mean"], "hd95_mm": h["mean"], "ece": cal.get("ece")}
        o = m["ood"]["detectors"]
        lines += [
            "",
            f"OOD detection on ood-dev ({m['ood']['n_ood']} volumes) vs the {m['ood']['n_in_distribution']} test cases: "
            + ", ".join(f"{k} AUROC {fmt(v['auroc'])}" for k, v in o.items())
            + ".",
            "False alarms at the threshold per context: "
            + ", ".join(f"{k} {fmt(c['false_alarm_rate'], 2)}" for k, c in m["contexts"].items())
            + ".",
        ]
        meta["metrics"] = {
            "test": headline,
            "ood_auroc": {k: v["auroc"] for k, v in o.items()},
            "source": "mtseg evaluate (docs/RESULTS.md)",
        }
        write_text_atomic(args.bundle / "bundle.json", json.dumps(meta, indent=2))
    lines += [
        "",
        "## Intended use and limitations",
        "",
        "- Research and demonstration of joint multi-context segmentation with uncertainty and OOD flags; "
        "**not a medical device**, not for diagnosis.",
        "- Trained on very few cases for some contexts (AbdomenCT 2, BrainStructuresMR 1, BrainTumorMR 6) at "
        "2 mm: expect coarse boundaries and failures on unusual anatomy; small structures (thalamus, kidneys) "
        "suffer most.",
        "- Intensity conventions of the training data (ACDC min-max, LA and BraTS z-scored) are normalised "
        "away by percentile scaling, but new MR sequences are out of distribution by design: watch the OOD gauge.",
        "- The OOD threshold is calibrated for about 5 % false alarms, with a higher one for a context whose own "
        "train/val cases need it (`ood.context_factor`); contexts with 1–3 training cases cannot be checked at "
        "that rate, and their test cases fail segmentation and are flagged (docs/RESULTS.md, Trust). An "
        "ordinary change of field of view is among the references; a crop that cuts into the anatomy or a "
        "heavy padding can still raise a flag.",
        "- Left/right structures rely on correct image orientation in the file header.",
    ]
    (args.bundle / "MODEL_CARD.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {args.bundle / 'MODEL_CARD.md'}")


if __name__ == "__main__":
    main()
