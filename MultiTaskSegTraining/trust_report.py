"""The trust benchmark's analysis: fit on the ``fit`` families, score everything else, write
OUT/trust.json and the ROC / risk–coverage plots.

Detector candidates (``trust_fit.fit_detector``) differ in the layers whose signatures they use and in
whether the spectral distance (to the recognised context's signatures) is combined with the context
head's confidence; the previous design (nearest signature of any context) is kept for comparison.
`mtseg finalise` ships ``SHIPPED`` (``DEFAULT_LAYERS``, combined), chosen on the fit families and
ood-dev (never on test cases; see docs/RESULTS.md).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from MultiTaskSegLib.atomic import write_text_atomic
from MultiTaskSegLib.bundle import Bundle

from .evaluate_metrics import json_clean
from .ood_baselines import SizeControlDetector
from .trust_fit import case_dice, case_of, fit_detector, fit_detector_quality, loo_scores, record_scores
from .trust_metrics import failure_table, ood_table, risk_coverage

LAYER_SETS = {
    "enc3+enc4": ["enc3", "enc4"],
    "enc4": ["enc4"],
    "enc2-enc4": ["enc2", "enc3", "enc4"],
    "enc0-enc4": ["enc0", "enc1", "enc2", "enc3", "enc4"],
    "enc1-enc4": ["enc1", "enc2", "enc3", "enc4"],
    "enc0+enc1": ["enc0", "enc1"],
    "dec2": ["dec2"],
    "all": None,
}  # None = every layer of the model
DEFAULT_LAYERS = "enc0+enc1"
SHIPPED = f"spectral+confidence:{DEFAULT_LAYERS}"
RECORDED = "detector of the recorded bundle"
FIT_FAMILIES = ("fit", "fit_shift", "fit_fov")
PER_CONTEXT_SCORES = (
    RECORDED,
    f"spectral:{DEFAULT_LAYERS}",
    SHIPPED,
    "entropy_in_structures",
    "1-expected_dice",
)


def _layers(name: str, records: Sequence[dict]) -> list[str]:
    return LAYER_SETS[name] or list(records[0]["signatures"])


def record_signals(
    rec: dict, ood_score: float, threshold: float, quality, context_labels: list[list[int]], names: dict[int, str]
) -> dict[str, float]:
    """Single signals (higher = less trustworthy) and the quality model's case estimate."""
    allowed = [str(v) for v in context_labels[rec["recognised"]]]
    ev = [rec["evidence"][v] for v in allowed]
    conf = rec["context_probs"][rec["recognised"]] if rec.get("context_probs") is not None else 1.0
    result = quality.assess(
        {int(v): rec["evidence"][v] for v in allowed}, names, ood_score / threshold, conf, ood_score > threshold
    )
    return {
        "1-soft_dice": 1 - float(np.mean([e["soft_dice"] for e in ev])),
        "entropy_in_structures": float(np.mean([e["mean_entropy"] for e in ev])),
        "stray_share": float(np.mean([e.get("stray_share", 0.0) for e in ev])),
        "volume_z": float(np.max([quality.volume_z(names[int(v)], e["volume_ml"]) for v, e in zip(allowed, ev)])),
        "1-context_confidence": 1 - conf,
        "entropy_foreground": rec["uncertainty"]["entropy_foreground"],
        "entropy_whole": rec["uncertainty"]["entropy_whole"],
        "max_softmax": rec["uncertainty"]["max_softmax"],
        "1-expected_dice": 1 - result.expected_dice,
        "flag": float(result.flag),
    }


def _selection(detectors: dict, fit: list, fit_shift: list, rest: list, fam: np.ndarray, clean: dict) -> dict:
    """How each layer set separates, WITHOUT test cases: leave-one-case-out scores of the fit cases
    (negatives) against ood-dev volumes and corrupted fit cases whose Dice dropped by > 0.1."""
    from .ood_baselines import detection_metrics

    oods = [r for r, f in zip(rest, fam) if f in ("ood_far", "ood_near")]
    hurt = [r for r in fit_shift if (clean.get((r["dataset"], case_of(r))) or 0) - (case_dice(r) or 0) > 0.1]
    out = {}
    for name, (det, loo) in detectors.items():
        s_ood = list(record_scores(det, oods)) if oods else []
        s_hurt = list(loo_scores(det, hurt)) if hurt else []
        out[name] = {"ood_dev": detection_metrics(loo, s_ood), "corrupted_fit_cases": detection_metrics(loo, s_hurt)}
    return out


def analyse(bundle: Bundle, records: list[dict]) -> tuple[dict, dict]:
    """(tables, curves for the plots)."""
    names, context_labels = bundle.label_names, [list(c["labels"]) for c in bundle.contexts]
    fit = [r for r in records if r["family"] == "fit"]
    fit_shift = [r for r in records if r["family"] == "fit_shift"]
    refs = fit + [r for r in records if r["family"] == "fit_fov"]  # the detectors' in-distribution references
    rest = [r for r in records if r["family"] not in FIT_FAMILIES]
    fam = np.asarray([r["family"] for r in rest])
    clean = {(r["dataset"], case_of(r)): case_dice(r) for r in records if r["family"] in ("id", "fit")}
    drop = np.asarray(
        [
            (clean.get((r["dataset"], case_of(r))) or np.nan) - (case_dice(r) or 0.0)
            if r["family"] == "shift"
            else np.nan
            for r in rest
        ]
    )

    scores: dict[str, np.ndarray] = {RECORDED: np.asarray([r["shipped_score"] for r in rest])}
    detectors = {}
    names_ctx = bundle.context_names
    for name in LAYER_SETS:
        layers = _layers(name, records)
        detectors[f"spectral:{name}"] = fit_detector(refs, layers, names_ctx, with_confidence=False)
        detectors[f"spectral+confidence:{name}"] = fit_detector(refs, layers, names_ctx)
    previous = f"spectral, nearest of any context:{DEFAULT_LAYERS}"  # the detector shipped before this one
    detectors[previous] = fit_detector(
        refs, LAYER_SETS[DEFAULT_LAYERS], names_ctx, conditioning="any", with_confidence=False
    )
    for name, (det, _) in detectors.items():
        scores[name] = record_scores(det, rest)
    tables_selection = _selection(detectors, fit, fit_shift, rest, fam, clean)
    det, loo_refs = detectors[SHIPPED]
    quality = fit_detector_quality(det, loo_refs, fit, fit_shift, names, context_labels)
    main = scores[SHIPPED]
    signals = [record_signals(r, s, det.threshold, quality, context_labels, names) for r, s in zip(rest, main)]
    for k in signals[0]:
        scores[k] = np.asarray([s[k] for s in signals])
    size = SizeControlDetector.fit(np.stack([r["geometry"] for r in fit]))
    scores["size_control"] = np.asarray([size.score(np.asarray(r["geometry"])) for r in rest])

    negative = fam == "id"
    groups = {
        "far": fam == "ood_far",
        "near": fam == "ood_near",
        "far+near": np.isin(fam, ["ood_far", "ood_near"]),
        "near (tcgalgg T1/T2 only)": np.asarray([r["key"].startswith("ood_near/tcgalgg") for r in rest]),
        "shift (all)": fam == "shift",
        "shift (Dice drop > 0.1)": (fam == "shift") & (drop > 0.1),
    }
    ood_scores = {k: v for k, v in scores.items() if k != "flag"}
    tables = {
        "families": {f: int((fam == f).sum()) for f in sorted(set(fam))}
        | {"fit": len(fit), "fit_shift": len(fit_shift), "fit_fov": len(refs) - len(fit)},
        "detector": {
            "layers": det.layers,
            "threshold": det.threshold,
            "context_scale": det.context_scale,
            "context_factor": det.context_factor,
            "name": det.name,
            "combination": det.combination,
            "rule": "recognised-context kNN combined with the context head's confidence, conformal 95 % of "
            "leave-one-patient-out fit scores (per context where a context's own is higher)",
        },
        "quality_model": quality.to_dict(),
        "layer_selection": tables_selection,
        "ood_vs_test": ood_table(ood_scores, negative, groups),
        "ood_vs_test_and_unseen": ood_table(ood_scores, np.isin(fam, ["id", "id_unseen"]), groups),
        # the test cases as another protocol might frame them count as in-distribution too
        "ood_vs_test_and_reframed": ood_table(ood_scores, np.isin(fam, ["id", "id_fov"]), groups),
    }
    flagged = main > det.threshold
    tables["false_alarms"] = {}
    for f in ("id", "id_unseen", "id_fov"):
        for ctx in sorted({r["dataset"] for r, ff in zip(rest, fam) if ff == f}):
            m = (fam == f) & np.asarray([r["dataset"] == ctx for r in rest])
            tables["false_alarms"].setdefault(f, {})[ctx] = {
                "n": int(m.sum()),
                "ood_flag": float(flagged[m].mean()),
                "quality_flag": float(scores["flag"][m].mean()),
                "shipped_flag": float(np.mean([rest[i]["shipped_is_ood"] for i in np.flatnonzero(m)])),
            }
    tables["flagged"] = {
        f: {
            "n": int((fam == f).sum()),
            "ood_flag": float(flagged[fam == f].mean()),
            "quality_flag": float(scores["flag"][fam == f].mean()),
        }
        for f in sorted(set(fam))
    }
    tables["shift_by_context"] = {}
    ds = np.asarray([r["dataset"] or "" for r in rest])
    for ctx in sorted(set(ds[fam == "shift"])):
        pos, neg = (fam == "shift") & (ds == ctx) & (drop > 0.1), (fam == "id") & (ds == ctx)
        tables["shift_by_context"][ctx] = ood_table(
            {k: scores[k] for k in PER_CONTEXT_SCORES}, neg, {"shift (Dice drop > 0.1)": pos}
        )["shift (Dice drop > 0.1)"]
    tables["shift_by_kind"] = {}
    for i in np.flatnonzero(fam == "shift"):
        kind = f"{rest[i]['corruption'][0]}{rest[i]['corruption'][1]}"
        t = tables["shift_by_kind"].setdefault(kind, {"dice_drop": [], "ood_flag": [], "quality_flag": []})
        t["dice_drop"].append(drop[i])
        t["ood_flag"].append(bool(flagged[i]))
        t["quality_flag"].append(bool(scores["flag"][i]))
    for t in tables["shift_by_kind"].values():
        for k in list(t):
            t[k] = float(np.nanmean(np.asarray(t[k], dtype=np.float64)))
    labelled = np.isin(fam, ["id", "id_unseen", "shift"]) & np.asarray([case_dice(r) is not None for r in rest])
    dice = np.asarray([case_dice(r) if case_dice(r) is not None else np.nan for r in rest])
    fail_signals = {k: v[labelled] for k, v in scores.items() if k != "flag"}
    tables["failure"] = failure_table(fail_signals, dice[labelled])
    tables["quality_calibration"] = {
        "mae_expected_dice": float(np.abs((1 - scores["1-expected_dice"][labelled]) - dice[labelled]).mean())
    }
    tables["cases"] = [
        {
            "key": r["key"],
            "family": r["family"],
            "dice": case_dice(r),
            "dice_drop": d,
            "ood_score": s,
            "expected_dice": 1 - e,
            "flag": bool(f),
            "shipped_score": r["shipped_score"],
        }
        for r, d, s, e, f in zip(rest, drop, main, scores["1-expected_dice"], scores["flag"])
    ]
    curves = {"scores": scores, "negative": negative, "groups": groups, "labelled": labelled, "dice": dice}
    return tables, curves


def _plots(curves: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    shown = [
        f"spectral:{DEFAULT_LAYERS}",
        SHIPPED,
        "1-context_confidence",
        "entropy_foreground",
        "1-expected_dice",
        "size_control",
    ]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, g in zip(axes, ("far", "near", "shift (Dice drop > 0.1)")):
        pos = curves["groups"][g]
        for k in shown:
            s = curves["scores"][k]
            y = np.concatenate([np.zeros(curves["negative"].sum()), np.ones(pos.sum())])
            if pos.sum() and curves["negative"].sum():
                fpr, tpr, _ = roc_curve(y, np.concatenate([s[curves["negative"]], s[pos]]))
                ax.plot(fpr, tpr, label=k)
        ax.plot([0, 1], [0, 1], "k:", lw=0.8)
        ax.set(title=f"test cases vs {g}", xlabel="false-positive rate", ylabel="true-positive rate")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "trust_roc.png", dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    m = curves["labelled"]
    risk = 1 - curves["dice"][m]
    for k in (SHIPPED, "entropy_foreground", "1-expected_dice", "1-soft_dice"):
        cov, r = risk_coverage(curves["scores"][k][m], risk)
        ax.plot(cov, r, label=k)
    cov, r = risk_coverage(risk, risk)
    ax.plot(cov, r, "k--", label="oracle")
    ax.axhline(risk.mean(), color="grey", ls=":", label="random")
    ax.set(
        xlabel="coverage",
        ylabel="risk (1 − Dice) of the covered cases",
        title="risk–coverage: test + unseen + corrupted test cases",
    )
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "trust_risk_coverage.png", dpi=110)
    plt.close(fig)
    return ["trust_roc.png", "trust_risk_coverage.png"]


def write_report(bundle: Bundle, records: list[dict], out: Path, plots: bool = True) -> dict:
    tables, curves = analyse(bundle, records)
    if plots:
        tables["plots"] = _plots(curves, out)
    tables = json_clean(tables)
    write_text_atomic(out / "trust.json", json.dumps(tables, indent=2, allow_nan=False))
    (out / "trust.md").write_text(markdown(tables), encoding="utf-8")
    return tables


def _f(v, nd: int = 3) -> str:
    return "–" if v is None else f"{v:.{nd}f}"


def markdown(t: dict) -> str:
    """The tables of trust.json as Markdown (docs/RESULTS.md, *Trust*)."""
    lines = [
        "Families: " + ", ".join(f"{k} {v}" for k, v in t["families"].items()),
        "",
        "Detector choice without test cases (AUROC: leave-one-case-out fit scores vs ood-dev / vs corrupted fit "
        "cases with Dice drop > 0.1):",
        "",
        "| detector | ood-dev | corrupted fit cases |",
        "|---|---|---|",
    ]
    for name, v in t["layer_selection"].items():
        lines.append(
            f"| {name} | {_f(v['ood_dev']['auroc'])} | {_f(v['corrupted_fit_cases']['auroc'])} "
            f"({v['corrupted_fit_cases']['n_ood']}) |"
        )
    lines.append("")
    for title, key in (
        ("vs the test split", "ood_vs_test"),
        ("vs test + unseen cases", "ood_vs_test_and_unseen"),
        ("vs test cases and a field-of-view variant of each", "ood_vs_test_and_reframed"),
    ):
        if key not in t:  # a trust.json written before the field-of-view family
            continue
        groups = list(t[key])
        lines += [
            f"OOD detection {title} (AUROC / FPR at 95 % TPR; n positive in brackets):",
            "",
            "| score | " + " | ".join(groups) + " |",
            "|---" * (len(groups) + 1) + "|",
        ]
        for name in t[key][groups[0]]:
            cells = [
                f"{_f(t[key][g][name]['auroc'])} / {_f(t[key][g][name]['fpr_at_95_tpr'], 2)} "
                f"({t[key][g][name]['n_ood']})"
                for g in groups
            ]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [
        "False alarms (share of in-distribution cases flagged):",
        "",
        "| family | context | n | new detector | quality flag | shipped detector |",
        "|---|---|---|---|---|---|",
    ]
    for fam, per in t["false_alarms"].items():
        for ctx, v in per.items():
            lines.append(
                f"| {fam} | {ctx} | {v['n']} | {_f(v['ood_flag'], 2)} | {_f(v['quality_flag'], 2)} | "
                f"{_f(v['shipped_flag'], 2)} |"
            )
    lines += [
        "",
        "Share flagged per family (new detector / quality flag):",
        "",
        "| family | n | OOD flag | quality flag |",
        "|---|---|---|---|",
    ]
    for fam, v in t["flagged"].items():
        lines.append(f"| {fam} | {v['n']} | {_f(v['ood_flag'], 2)} | {_f(v['quality_flag'], 2)} |")
    lines += [
        "",
        "Shift per context (AUROC, the context's corrupted test cases with Dice drop > 0.1 vs its test cases; "
        "n positive / negative):",
        "",
        "| context | " + " | ".join(PER_CONTEXT_SCORES) + " |",
        "|---" * (len(PER_CONTEXT_SCORES) + 1) + "|",
    ]
    for ctx, v in t["shift_by_context"].items():
        cells = [f"{_f(v[k]['auroc'])} ({v[k]['n_ood']}/{v[k]['n_in_distribution']})" for k in PER_CONTEXT_SCORES]
        lines.append(f"| {ctx} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Artefacts (mean over corrupted test cases):",
        "",
        "| artefact | Dice drop | OOD flag | quality flag |",
        "|---|---|---|---|",
    ]
    for kind, v in sorted(t["shift_by_kind"].items()):
        lines.append(f"| {kind} | {_f(v['dice_drop'])} | {_f(v['ood_flag'], 2)} | {_f(v['quality_flag'], 2)} |")
    f = t["failure"]
    lines += [
        "",
        f"Failure detection over test + unseen + corrupted test cases ({f['n_cases']} cases, "
        f"{f['n_failures']} with Dice < 0.5; AURC oracle {_f(f['aurc_oracle'])}, random "
        f"{_f(f['aurc_random'])}; expected-Dice MAE {_f(t['quality_calibration']['mae_expected_dice'])}):",
        "",
        "| signal | AURC | failure AUROC | FPR at 95 % TPR |",
        "|---|---|---|---|",
    ]
    for name, v in sorted(f["signals"].items(), key=lambda kv: kv[1]["aurc"]):
        lines.append(f"| {name} | {_f(v['aurc'])} | {_f(v['failure_auroc'])} | {_f(v['failure_fpr_at_95_tpr'], 2)} |")
    return "\n".join(lines) + "\n"
