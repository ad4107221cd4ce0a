"""Cross-validated choice of the quality model's features, on the fit records only (no test case).

The trust benchmark's fit (train/val cases) and fit_shift (one corrupted variant of each) records
are split into folds by patient (a corrupted variant goes with its clean case); for each feature
set the quality model is fitted on the other folds and scored on the held-out one. The pooled
held-out estimates give a case-level AURC (risk = 1 − Dice) and failure AUROC (Dice < 0.5) per
feature set, beside the same figures of every single signal.

    PYTHONPATH=MultiTaskSeg:. python scripts/quality_cv.py --bundle MultiTaskSeg/Resources/Models/default \
        --records runs/trust_v5/records [--validation-holdout]

--validation-holdout scores only the validation cases (and their corrupted variants), with every model
fitted on the training cases' records: the network has not trained on those images, as on a user's.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from MultiTaskSegLib.bundle import load_bundle
from MultiTaskSegLib.quality import FEATURES
from MultiTaskSegTraining.trust_fit import (
    FIT_FEATURES,
    case_dice,
    case_of,
    fit_detector,
    fit_quality,
    log_volume_stats,
    loo_scores,
    patient_of,
    record_context,
)
from MultiTaskSegTraining.trust_metrics import failure_table

# name: (features, coefficients within their evidence's sign)
FEATURE_SETS = {
    "before (5 features)": ([f for f in FEATURES if f != "stray_share"], False),
    "with stray_share (6)": (list(FEATURES), False),
    "with stray_share (6), sign-constrained": (list(FEATURES), True),
    "without ood_z": ([f for f in FEATURES if f != "ood_z"], False),
    "without soft_dice, sign-constrained": (list(FIT_FEATURES), True),  # the shipped model's features
    "entropy, stray share, context confidence, sign-constrained": (
        ["mean_entropy", "stray_share", "context_confidence"],
        True,
    ),
    "entropy only": (["mean_entropy"], True),
}


def load(records: Path, family: str) -> list[dict]:
    recs = [json.loads(p.read_text(encoding="utf-8")) for p in sorted((records / family).glob("*.json"))]
    if family == "fit_shift":  # one corrupted variant per case, or the held-out folds count some cases twice
        variants: dict[tuple[str, str], list[str]] = {}
        for r in recs:
            variants.setdefault((r["dataset"], case_of(r)), []).append(r["key"])
        mixed = {case: keys for case, keys in variants.items() if len(keys) > 1}
        if mixed:
            (dataset, case), keys = next(iter(mixed.items()))
            raise SystemExit(
                f"{records / family} holds {len(mixed)} case(s) with several corrupted variants (e.g. {dataset} "
                f"{case}: {', '.join(keys)}): the folder mixes plans (the 12-case fit at the end of `mtseg train` "
                "assigned artefacts in another order than --fit-cases all before session 20). Point --records at a "
                "`mtseg trust` run's records/, or move away the variants that run did not list."
            )
    return recs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--records", type=Path, required=True)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--validation-holdout",
        action="store_true",
        help="instead of patient folds: fit on the training cases' records, score the validation cases' "
        "(images the network never trained on, as a user's are)",
    )
    args = ap.parse_args()

    bundle = load_bundle(args.bundle)
    names, ctx_labels = bundle.label_names, [list(c["labels"]) for c in bundle.contexts]
    fit, fit_shift, fit_fov = (load(args.records, f) for f in ("fit", "fit_shift", "fit_fov"))
    det, loo = fit_detector(fit + fit_fov, bundle.meta["ood"]["layers"], bundle.context_names)
    recs = fit + fit_shift
    ood = np.concatenate([loo[: len(fit)], loo_scores(det, fit_shift)])
    keep = [i for i, r in enumerate(recs) if case_dice(r) is not None]
    recs, ood = [recs[i] for i in keep], ood[keep]
    if args.validation_holdout:  # "fold" 1 = the validation cases, the only one scored
        val = {(ds, c) for ds, s in bundle.meta["training"]["split"].items() for c in s["val"]}
        folds = np.asarray([int((r["dataset"], case_of(r)) in val) for r in recs])
        scored_folds = [1]
        how = "fitted on the training cases, scored on the validation cases"
    else:
        patients = sorted({patient_of(r) for r in recs})
        fold_of = dict(zip(patients, np.random.default_rng(args.seed).permutation(len(patients)) % args.folds))
        folds = np.asarray([fold_of[patient_of(r)] for r in recs])
        scored_folds = list(range(args.folds))
        how = f"{len(patients)} patients, {args.folds} folds"
    dice = np.asarray([case_dice(r) for r in recs])

    def structures(r: dict) -> list[str]:  # what predict reports on: the recognised context's structures
        return [str(v) for v in ctx_labels[r["recognised"]]]

    signals: dict[str, np.ndarray] = {}
    for name, (sets, monotone) in FEATURE_SETS.items():
        held_out = np.full(len(recs), np.nan)
        for k in scored_folds:
            train = [r for r, f in zip(recs, folds) if f != k]
            model = fit_quality(
                train,
                ood[folds != k],
                det.threshold,
                log_volume_stats([r for r in train if r["family"] == "fit"], names),
                names,
                ctx_labels,
                features=sets,
                monotone=monotone,
            )
            for i in np.flatnonzero(folds == k):
                r = recs[i]
                evidence = {int(v): r["evidence"][v] for v in structures(r)}
                conf = record_context(r)[1] or 1.0
                held_out[i] = model.assess(evidence, names, ood[i] / det.threshold, conf, False).expected_dice
        signals[f"quality: {name}"] = 1.0 - held_out
    for feature, sign in (("soft_dice", -1.0), ("mean_entropy", 1.0), ("stray_share", 1.0)):
        signals[feature] = np.asarray(
            [sign * np.mean([r["evidence"][v][feature] for v in structures(r)]) for r in recs]
        )
    signals["1-context_confidence"] = np.asarray([1.0 - (record_context(r)[1] or 1.0) for r in recs])
    scored = np.isin(folds, scored_folds)
    table = failure_table({k: v[scored] for k, v in signals.items()}, dice[scored])
    print(
        f"{int(scored.sum())} fit + fit_shift cases scored, {how}; "
        f"{table['n_failures']} with Dice < 0.5; AURC oracle {table['aurc_oracle']:.4f}, random {table['aurc_random']:.4f}"
    )
    print("| signal | AURC (held out) | failure AUROC |\n|---|---|---|")
    for name, v in sorted(table["signals"].items(), key=lambda kv: kv[1]["aurc"]):
        print(f"| {name} | {v['aurc']:.4f} | {v['failure_auroc']:.3f} |")


if __name__ == "__main__":
    main()
