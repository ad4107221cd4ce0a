#!/usr/bin/env python
"""Regenerate docs/RESULTS.md from the evaluations (numbers are read, never typed in).

    python scripts/make_results.py [--arms runs/arms] [--default evaluation/default] [--data ../shared/data]

Inputs: `mtseg evaluate` outputs of the comparison arms (scripts/experiments.py) and of the
shipped default model; it also draws one example figure per context with the default model.

The small files it reads (each evaluation's metrics.json, each arm's validation.jsonl) are copied
into results/ (committed), and read from there when a run directory is gone: runs/ and evaluation/
are not committed and do not survive a fresh checkout, the numbers behind this page must. A context
whose dedicated arm is in neither place keeps its rows from the previous version of the page, marked.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
ARCHIVE = ROOT / "results"
MARK = " †"  # marks table rows kept from the previous page
DATASETS = ["CardiacCineMR", "LeftAtriumMR", "AbdomenCT", "BrainTumorMR", "BrainStructuresMR"]


def load(path: Path) -> dict | None:
    f = path / "metrics.json"
    return json.loads(f.read_text(encoding="utf-8")) if f.exists() else None


def archive(src: Path, dst: Path, patterns: list[str]) -> Path:
    """Copy the files matching ``patterns`` under ``src`` into ``dst`` (same relative paths); return ``dst``."""
    for pattern in patterns:
        for f in sorted(src.glob(pattern)) if src.is_dir() else []:
            target = dst / f.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, target)
    return dst


def section_lines(page: Path, heading: str) -> list[str]:
    """The lines of the current page from the heading that starts with ``heading`` up to the next "## "."""
    lines = page.read_text(encoding="utf-8").splitlines() if page.exists() else []
    start = next((i for i, l in enumerate(lines) if l.startswith(heading)), len(lines))
    end = next((i for i, l in enumerate(lines[start + 1 :], start + 1) if l.startswith("## ")), len(lines))
    return lines[start:end]


def page_rows(page: Path, section: str, first_cells: list[str], columns: int) -> list[str]:
    """Rows of a ``columns``-column table in ``section`` (a heading prefix such as "## 1.") of the current
    page whose first cells are ``first_cells``, with the first cell marked as kept."""
    rows = []
    for line in section_lines(page, section):
        cells = line.split("|")
        if len(cells) != columns + 2:
            continue
        key = [c.strip().removesuffix(MARK.strip()).strip() for c in cells[1 : 1 + len(first_cells)]]
        if key == first_cells:
            cells[1] = f" {key[0]}{MARK} "
            rows.append("|".join(cells))
    return rows


def kept_footnote(rows: list[str]) -> list[str]:
    if not any(MARK in r for r in rows):
        return []
    return [
        "",
        f"{MARK.strip()} kept from the previous version of this page: the run behind it has no results in results/ "
        "(the commands under *How to regenerate* rerun it).",
    ]


def page_section(page: Path, heading: str) -> list[str]:
    """The section of the current page that starts with ``heading`` (up to the next "## "), with a kept note."""
    lines = section_lines(page, heading)
    if not lines:
        return []
    note = "*Kept from the previous version of this page: the default model's metrics.json is not in results/default/.*"
    body = [l for l in lines[1:] if l != note]
    while body and not body[0]:
        body = body[1:]
    return [lines[0], "", note, "", *body]


def fmt(x, digits=3) -> str:
    return "–" if x is None or (isinstance(x, float) and not np.isfinite(x)) else f"{x:.{digits}f}"


def dice_cell(d: dict | None, key="dice") -> str:
    if not d:
        return "–"
    s = d[key] if key in d else d
    if s.get("mean") is None:
        return "–"
    vals = [v for v in s["cases"].values() if v is not None]
    spread = f" [{min(vals):.2f}–{max(vals):.2f}]" if len(vals) > 1 else ""
    return f"{s['mean']:.3f} ± {s['std']:.3f}{spread} (n={s['n']})"


def paired_p(a: dict | None, b: dict | None) -> tuple[str, str]:
    """(two-sided Wilcoxon signed-rank p of per-patient Dice differences, how many pairs) over the cases
    both arms scored.

    The cases of one patient (ACDC's two frames) are not independent: their differences are averaged
    into one pair per patient (``patient_group``, the split's own grouping). '–' under 6 patients: the
    test cannot reach p < 0.05 with fewer."""
    from scipy.stats import wilcoxon

    from MultiTaskSegTraining.data import patient_group

    if not a or not b:
        return "–", ""
    common = [k for k in a.get("cases", {}) if a["cases"][k] is not None and b.get("cases", {}).get(k) is not None]
    by_patient: dict[str, list[float]] = {}
    for k in common:
        by_patient.setdefault(patient_group(k), []).append(a["cases"][k] - b["cases"][k])
    diffs = [float(np.mean(v)) for v in by_patient.values()]
    n = f"{len(diffs)} patients" + (f", {len(common)} cases" if len(diffs) < len(common) else "")
    if len(diffs) < 6 or not any(diffs):
        return "–", n
    return f"{wilcoxon(diffs).pvalue:.2g}", n


def output_cell(context_metrics: dict, name: str) -> str:
    """Dice of what `mtseg predict` outputs (restricted, post-processed), the raw argmax's mean in brackets."""
    r = context_metrics.get("dice_restricted", {}).get(name)
    u = context_metrics.get("structures", {}).get(name, {}).get("dice", {}).get("mean")
    return dice_cell(r) + (f" ({u:.3f})" if r and u is not None else "")


def paired_tests(joint: dict | None, dedicated: dict, transfer: dict | None) -> str:
    """The table's cell: joint vs dedicated / joint vs transfer / transfer vs dedicated (pairs)."""
    pairs = [(joint, dedicated)] + ([(joint, transfer), (transfer, dedicated)] if transfer else [])
    tests = [paired_p(a, b) for a, b in pairs]
    n = next((n for _, n in tests if n), "")
    return " / ".join(p for p, _ in tests) + (f" ({n})" if n else "")


def arm_context(m: dict | None, ctx: str) -> dict:
    """One context's metrics of an evaluation ({} when the arm or the context is missing)."""
    return (m or {}).get("contexts", {}).get(ctx, {})


def arm_structures(m: dict | None, ctx: str) -> dict:
    return arm_context(m, ctx).get("structures", {})


def comparison_section(arms: Path, page: Path) -> list[str]:
    import yaml
    from arms_curves import TARGETS, curves, plot, table

    cfg = yaml.safe_load((ROOT / "configs" / "arms.yaml").read_text(encoding="utf-8"))
    joint = load(arms / "joint_eval")
    out = [
        "## 1. Joint vs dedicated vs transfer learning (test split, common budget)",
        "",
        "Same architecture, same seeded patient-level split, same budget for every arm "
        f"(`configs/arms.yaml`: {cfg['steps']} steps of batch {cfg['batch_size']} with "
        f"{'×'.join(str(p) for p in cfg['patch_size'])} patches at 2 mm; the shipped model had "
        f"14351). Transfer = pre-train on the other four datasets for {cfg['steps']} steps, then "
        f"fine-tune the whole network on the target for {cfg['steps']} steps. The validation curves "
        "below show whether each arm reached its plateau. Dice on the original image grid, "
        "mean ± std [min–max] over test cases; HD95 in mm. Every arm is scored on what `mtseg predict` outputs "
        "(restricted to the recognised context, then the bundle's largest-component post-processing, chosen "
        "per structure on each arm's own validation cases); the network's unrestricted argmax in brackets.",
        "",
        "| context | structure | joint | dedicated | transfer | joint HD95 | dedicated HD95 | transfer HD95 "
        "| Wilcoxon p, paired per patient: joint vs dedicated / joint vs transfer / transfer vs dedicated |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    wins = {"joint>dedicated": 0, "dedicated>joint": 0, "transfer>dedicated": 0, "dedicated>transfer": 0}
    rerun: list[str] = []
    for ctx in DATASETS:
        ded = load(arms / f"dedicated_{ctx}_eval")
        tra = load(arms / f"transfer_{ctx}_eval")
        js = arm_context(joint, ctx)
        if ded is None:  # not rerun since its per-case data was lost: the page's rows, marked
            kept = page_rows(page, "## 1.", [ctx], 9)
            out += kept
            if kept and js:  # this joint arm on that context, beside the kept (earlier) pair
                rerun.append(
                    f"{ctx} " + ", ".join(f"{n} {fmt(v.get('mean'))}" for n, v in js.get("dice_restricted", {}).items())
                )
        contexts = [js, arm_context(ded, ctx), arm_context(tra, ctx)]  # joint, dedicated, transfer
        for name in arm_structures(ded, ctx):
            # every arm scored on what `mtseg predict` outputs (restricted, post-processed); raw argmax in brackets
            jr, dr, tr = (c.get("dice_restricted", {}).get(name) for c in contexts)
            cells = [output_cell(c, name) for c in contexts]
            hd = [fmt(c.get("hd95_mm_restricted", {}).get(name, {}).get("mean"), 1) for c in contexts]  # "–" if absent
            out.append(
                f"| {ctx} | {name} | {cells[0]} | {cells[1]} | {cells[2] if tr else 'not run'} | "
                f"{' | '.join(hd)} | {paired_tests(jr, dr, tr)} |"
            )
            dj, dd, dt = ((x or {}).get("mean") for x in (jr, dr, tr))
            if dj is not None and dd is not None:
                wins["joint>dedicated" if dj > dd else "dedicated>joint"] += 1
            if dt is not None and dd is not None:
                wins["transfer>dedicated" if dt > dd else "dedicated>transfer"] += 1
    out += kept_footnote(out)
    if rerun:
        out[-1] += (
            " In a † row, joint and dedicated are the earlier run's pair. The joint arm on this page, rerun with "
            "the same config and seed, reaches on those contexts (test Dice, restricted): " + "; ".join(rerun) + "."
        )
    out += [
        "",
        f"Joint beats dedicated on **{wins['joint>dedicated']}** of "
        f"{wins['joint>dedicated'] + wins['dedicated>joint']} structures; transfer beats dedicated on "
        f"**{wins['transfer>dedicated']}** of {wins['transfer>dedicated'] + wins['dedicated>transfer']} "
        "structures where it was run (rows regenerated from results/ only).",
        "",
    ]
    if joint:
        out += [
            "Context recognition of the joint arm on the test cases: head "
            f"{fmt(joint['context_recognition'].get('head'))}, nearest signature "
            f"{fmt(joint['context_recognition'].get('signature'))}. Share of predicted foreground voxels that "
            "carry another context's structure (unrestricted output): "
            + ", ".join(
                f"{c} {fmt(joint['contexts'][c]['confusion_rate']['pooled'])}"
                for c in DATASETS
                if c in joint["contexts"]
            )
            + ".",
            "",
        ]
    data = curves(arms)
    if data:
        plot(data, ROOT / "docs" / "figures" / "arms_validation.png")
        out += [
            "Validation Dice during training (`python scripts/arms_curves.py`; each arm's validation cases, "
            f"every {cfg['validate_every']} steps; an arm whose last point is below {cfg['steps']} is still "
            "training):",
            "",
            "![validation curves of the arms](figures/arms_validation.png)",
            "",
            *(rows := table(data) + [r for c in TARGETS if c not in data for r in page_rows(page, "## 1.", [c], 3)]),
            *kept_footnote(rows),
            "",
        ]
    return out


def kept_arms_sections(page: Path, arms: Path) -> tuple[list[str], list[str]]:
    """Section 1 and the arm rows of section 2 as the page has them (regenerated only with ``--arms``)."""
    lines = page.read_text(encoding="utf-8").splitlines() if page.exists() else []
    start = next((i for i, l in enumerate(lines) if l.startswith("## 1.")), None)
    end = next((i for i, l in enumerate(lines) if l.startswith("## 2.")), None)
    if start is None or end is None:
        return ["## 1. Joint vs dedicated vs transfer learning", "", f"(no arm evaluations in {arms})", ""], []
    note = (
        f"*Kept from the previous version of this page: the arms' evaluations are not in `{arms.name}/` "
        "in this checkout (`scripts/experiments.py` recreates them; then this section is regenerated).*"
    )
    section = lines[start:end]
    if note not in section:
        section = section[:2] + [note, ""] + section[2:]
    rows = [l for l in lines[end:] if l.startswith("| joint arm |") or l.startswith("| dedicated arm |")]
    return section, rows


def calibration_section(
    arms: Path, default: dict | None, kept_rows: list[str] | None = None, page: Path | None = None
) -> list[str]:
    out = [
        "## 2. Calibration (test split)",
        "",
        "ECE and MCE (10 equal-width bins) of each structure's foreground probability, on the canonical "
        "2 mm grid against the nearest-neighbour-resampled label, pooled over the context's test cases; "
        "*boundary* = voxels within 2 voxels of the predicted boundary. Mean over the context's structures. "
        "Before (T=1) and after temperature scaling (T fitted on the validation split).",
        "",
        "| model | context | ECE T=1 | ECE T=fit | MCE T=1 | MCE T=fit | boundary ECE T=1 | boundary ECE T=fit | T |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    out += kept_rows or []
    # the page's rows stand in for a dedicated arm or default evaluation not rerun since its data was lost
    sources: list[tuple[str, dict | None, str | None]] = [("joint arm", load(arms / "joint_eval"), None)]
    sources += [("dedicated arm", load(arms / f"dedicated_{c}_eval"), c) for c in DATASETS]
    sources += [("transfer arm", m, c) for c in DATASETS if (m := load(arms / f"transfer_{c}_eval"))]
    sources += [("shipped default", default, None)]
    for label, m, only in sources:
        if not m:
            if page and (label == "shipped default" or (label == "dedicated arm" and not kept_rows)):
                out += page_rows(page, "## 2.", [label, only] if only else [label], 9)
            continue
        for ctx, c in m["contexts"].items():
            if only and ctx != only:
                continue
            keys = list(c["calibration"].keys())
            before, after = keys[0], keys[-1]

            def mean(key, field, c=c):
                vals = [v[field] for v in c["calibration"][key].values() if v.get(field) is not None]
                return float(np.mean(vals)) if vals else None

            out.append(
                f"| {label} | {ctx} | {fmt(mean(before, 'ece'), 4)} | {fmt(mean(after, 'ece'), 4)} | "
                f"{fmt(mean(before, 'mce'))} | {fmt(mean(after, 'mce'))} | {fmt(mean(before, 'ece_boundary'))} | "
                f"{fmt(mean(after, 'ece_boundary'))} | {fmt(m['temperature'])} |"
            )
    out += kept_footnote(out)
    out += ["", "Reliability diagrams of the shipped model: `docs/figures/reliability_<context>.png`.", ""]
    return out


def ood_section(m: dict | None) -> list[str]:
    if not m:
        return ["## 3. OOD detection", "", "(the default model's evaluation was not found)", ""]
    o = m["ood"]
    out = [
        "## 3. Out-of-distribution detection (shipped default model)",
        "",
        f"In-distribution: the {o['n_in_distribution']} test cases of the five datasets; OOD: the "
        f"{o['n_ood']} volumes of `ood-dev/`. OOD is the positive class; higher score = more OOD.",
        "",
        "| detector | AUROC | FPR at 95 % TPR | n in-dist / OOD |",
        "|---|---|---|---|",
    ]
    for name, d in sorted(o["detectors"].items(), key=lambda kv: -(kv[1]["auroc"] or 0)):
        out.append(
            f"| {name} | {fmt(d['auroc'])} | {fmt(d['fpr_at_95_tpr'])} | {d['n_in_distribution']} / {d['n_ood']} |"
        )
    out += [
        "",
        f"At the shipped threshold ({fmt(o['threshold'], 4)}, {o['detector']}):",
        "",
        "| context | training cases | test cases | false-alarm rate |",
        "|---|---|---|---|",
    ]
    for ctx, c in m["contexts"].items():
        out.append(f"| {ctx} | {c.get('n_training_cases')} | {c['n_cases']} | {fmt(c['false_alarm_rate'], 2)} |")
    flagged = [r for r in o["cases"] if r["ood"]]
    out += [
        "",
        "OOD volumes flagged at the threshold: "
        + ", ".join(
            f"{Path(r['case']).name} ({'yes' if r['spectral_is_ood'] else 'no'}, resembles {r['nearest_context']})"
            for r in flagged
        )
        + ".",
        "",
    ]
    out += [
        "**Size control.** Raw singular values grow with the number of voxels; this project's "
        "signature divides the feature matrix by √voxels (the spectrum of the feature covariance), so "
        "image size alone should not move the score. The `size_control` detector above sees only the "
        "image's size, extent and spacing. Test cases re-scored after cropping to the central 50 % per "
        "axis and padding to 2× per axis:",
        "",
        "| case | context | variant | size | score | flagged |",
        "|---|---|---|---|---|---|",
    ]
    for r in m["size_control"]:
        out.append(
            f"| {r['case']} | {r['context']} | {r['variant']} | {'×'.join(map(str, r['size']))} | "
            f"{fmt(r['score'])} | {'yes' if r['is_ood'] else 'no'} |"
        )
    out += ["", "![PCA of signatures](figures/signatures_pca.png)", "", "![ROC](figures/ood_roc.png)", ""]
    return out


def default_section(m: dict | None) -> list[str]:
    if not m:
        return []
    out = [
        "## 4. The shipped default model on the test split",
        "",
        "| context | structure | Dice (predict's output) | Dice (unrestricted argmax) | HD95 mm (predict's output) |",
        "|---|---|---|---|---|",
    ]
    for ctx, c in m["contexts"].items():
        for name, s in c["structures"].items():
            out.append(
                f"| {ctx} | {name} | {dice_cell(c['dice_restricted'].get(name))} | {dice_cell(s)} | "
                f"{fmt(c['hd95_mm_restricted'].get(name, {}).get('mean'), 1)} |"
            )
    out += [
        "",
        f"Context recognition: head {fmt(m['context_recognition'].get('head'))}, nearest signature "
        f"{fmt(m['context_recognition'].get('signature'))}.",
        "",
        "Example per context (image, segmentation, "
        "uncertainty), test cases: " + " ".join(f"![{c}](figures/example_{c}.png)" for c in m["contexts"]),
        "",
    ]
    return out


def example_figures(m: dict | None, data: Path, figures: Path) -> None:
    if not m or not data.is_dir():
        return
    from MultiTaskSegLib.bundle import load_bundle
    from MultiTaskSegLib.predictor import Predictor
    from MultiTaskSegLib.volume_io import read_volume
    from MultiTaskSegTraining.snapshot import write_overlay_png

    bundle = load_bundle(m["bundle"])
    predictor = Predictor(bundle, "cpu")
    colors = {int(l["value"]): l["color"] for l in bundle.labels}
    for ctx, c in m["contexts"].items():
        case = sorted(c["case_ids"])[0]
        path = data / ctx / "imagesTr" / f"{case}.nii.gz"
        if not path.exists():
            continue
        image = read_volume(path)
        p = predictor.predict(image)
        write_overlay_png(
            image,
            p.labels,
            p.uncertainty,
            colors,
            p.label_names,
            figures / f"example_{ctx}.png",
            f"{ctx} test case {case}: recognised {p.context}, OOD score {p.ood.score:.3f}",
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arms", type=Path, default=ROOT / "runs" / "arms")
    ap.add_argument("--default", type=Path, default=ROOT / "evaluation" / "default")
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "RESULTS.md")
    ap.add_argument("--no-examples", action="store_true")
    args = ap.parse_args()
    figures = args.out.parent / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    # read from the committed copies in results/, refreshed from the run directories where they exist
    args.arms = archive(args.arms, ARCHIVE / "arms", ["*_eval/metrics.json", "*_work/validation.jsonl"])
    default = load(archive(args.default, ARCHIVE / "default", ["metrics.json"]))
    if default:
        for plot in default.get("plots", []):
            src = args.default / plot
            if src.exists():
                shutil.copy(src, figures / plot)
    if not args.no_examples:
        example_figures(default, args.data, figures)
    head = [
        "# Results",
        "",
        "Generated by `python scripts/make_results.py` from `mtseg evaluate` outputs "
        "(`scripts/experiments.py` for the comparison arms; `mtseg evaluate --bundle "
        "MultiTaskSeg/Resources/Models/default ...` for the shipped model, see the end of this page). "
        "All numbers are measured on the held-out test split of the seeded patient-level split "
        "(seed 0: 20 % test, 10 % validation per dataset); nothing was tuned on test cases.",
        "",
    ]
    if (args.arms / "joint_eval" / "metrics.json").exists():
        comp = comparison_section(args.arms, args.out)
        arm_rows: list[str] = []
    else:  # the arms' evaluations are not here: keep their section and calibration rows from this page
        comp, arm_rows = kept_arms_sections(args.out, args.arms)
    body = head + comp + calibration_section(args.arms, default, arm_rows, args.out)
    if default:
        body += ood_section(default) + default_section(default)
    else:  # the default model's evaluation is neither in --default nor in results/: keep sections 3 and 4
        body += page_section(args.out, "## 3.") + page_section(args.out, "## 4.")
    for extra in ("results_notes.md", "results_trust.md"):  # hand-written sections (trust: from `mtseg trust`)
        notes = Path(__file__).with_name(extra)
        if notes.exists():
            body += [notes.read_text(encoding="utf-8")]
    args.out.write_text("\n".join(body) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
