"""Summaries, targets and the Markdown report of a benchmark run (BENCHMARKS.md)."""
from __future__ import annotations

import os
import platform
import statistics
from pathlib import Path

import numpy as np


def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


# --- summary and report ---------------------------------------------------------------------
def summarise(case: dict) -> dict:
    if "error" in case:
        return dict(case)  # a copy: the caller attaches the raw case to the summary
    runs = case["e2e_runs"]
    med = {k: median([r[k] for r in runs]) for k in runs[0]}
    cpu_total = med.pop("cpu_total", None)
    total = med["total"]
    # uncertainty: MC dropout (if asked) + context merge + entropy (the softmax the labels need is "probabilities") + its
    # resampling to the input grid + writing it; OOD: the Gram accumulation inside the window loop + spectrum and score
    unc = med.get("uncertainty", 0.0) + med.get("resample_uncertainty", 0.0)
    ood = med.get("ood", 0.0) + med.get("ood_gram", 0.0)
    s = {"name": case["name"], "description": case["description"], "input_size": case["input_size"],
         "stages_median_s": med, "total_s": total,
         "uncertainty_share": unc / total, "ood_share": ood / total,
         "uncertainty_ood_share": (unc + ood) / total,
         "uncertainty_write_share": med.get("write_uncertainty", 0.0) / total,
         "peak_rss_mb": case["peak_rss_mb"], "repeats": len(runs), "threads": case["threads"]}
    if "sw_ours_s" in case:
        s.update({"canonical_shape_zyx": case["canonical_shape_zyx"], "n_windows": case["n_windows"],
                  "sw_ours_s": median(case["sw_ours_s"]), "sw_monai_s": median(case["sw_monai_s"]),
                  "agreement": case["agreement"]})
        s["ratio_ours_over_monai"] = s["sw_ours_s"] / s["sw_monai_s"]
        s["speedup_vs_monai"] = s["sw_monai_s"] / s["sw_ours_s"]
        s["n_reused"] = case.get("n_reused", 0)
        if "sw_monai_our_kernels_s" in case:
            s["sw_monai_our_kernels_s"] = median(case["sw_monai_our_kernels_s"])
            s["engine_speedup"] = s["sw_monai_our_kernels_s"] / s["sw_ours_s"]
            s["kernel_speedup"] = s["sw_monai_s"] / s["sw_monai_our_kernels_s"]
            s["agreement_monai_kernels"] = case["agreement_monai_kernels"]
        if "sw_cpu_s" in case:
            s["cpu_s"] = {k: median(v) for k, v in case["sw_cpu_s"].items()}
            s["cpu_speedup_vs_monai"] = s["cpu_s"]["monai"] / s["cpu_s"]["ours"]
            if "ours_bf16" in s["cpu_s"]:
                s["cpu_speedup_bf16_vs_monai"] = s["cpu_s"]["monai"] / s["cpu_s"]["ours_bf16"]
    if "sw_ours_bf16_s" in case:
        s["sw_ours_bf16_s"] = median(case["sw_ours_bf16_s"])
        s["speedup_bf16_vs_monai"] = s["sw_monai_s"] / s["sw_ours_bf16_s"]
        for k in ("agreement_bf16_vs_monai", "agreement_bf16_vs_ours", "bf16_ood"):
            s[k] = case[k]
    peer = case.get("monai_pipeline")
    if peer and "error" not in peer:
        pm = {k: median([r[k] for r in peer["runs"]]) for k in peer["runs"][0]}
        s["monai_pipeline"] = {"cpu_total_s": pm.pop("cpu_total"), "stages_median_s": pm, "total_s": pm["total"],
                               "peak_rss_mb": peer["peak_rss_mb"], "agreement": peer["agreement"]}
        s["monai_e2e_s"] = pm["total"]
        s["e2e_speedup_vs_monai"] = pm["total"] / total
        if cpu_total:
            s["e2e_cpu_speedup_vs_monai"] = s["monai_pipeline"]["cpu_total_s"] / cpu_total
    elif peer:
        s["monai_pipeline"] = {"error": peer["error"]}
    for k in ("cuda_max_allocated_mb", "cuda_device", "weightmap_check"):
        if k in case:
            s[k] = case[k]
    return s


def machine_info() -> dict:
    import torch

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "logical_cores": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform(), "torch": torch.__version__, "numpy": np.__version__,
            "torch_threads": torch.get_num_threads(), "cuda_available": torch.cuda.is_available()}
    try:
        import psutil
        info["ram_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    except (ImportError, OSError):
        pass
    try:
        import SimpleITK
        info["SimpleITK"] = SimpleITK.Version_VersionString()
    except Exception:  # noqa: BLE001
        pass
    try:
        import monai
        info["monai"] = monai.__version__
    except ImportError:
        pass
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8")
        info["cpu_flags"] = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f" {f}" in flags]
    except OSError:
        pass
    return info


def _fmt(x, digits=1):
    return "—" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.{digits}f}"


def render_markdown(report: dict) -> str:
    m = report["machine"]
    lines = ["# Benchmarks", "",
             "Generated by `mtseg bench` (benchmarks/cli.py); raw numbers in "
             f"`{Path(report['json']).name}`. Medians over the repeats given per row.", "",
             "## Machine and versions", "",
             f"- CPU: {m.get('cpu')} — {m.get('logical_cores')} logical cores, flags {', '.join(m.get('cpu_flags', []))}; "
             f"RAM {m.get('ram_gb', '?')} GB; torch threads {m.get('torch_threads')}",
             f"- {m.get('platform')}; Python {m.get('python')}; torch {m.get('torch')}; MONAI {m.get('monai', 'not installed')}; "
             f"numpy {m.get('numpy')}; SimpleITK {m.get('SimpleITK', '?')}",
             "- GPU: " + ("CUDA available (peak CUDA memory listed below the table)" if m.get("cuda_available") else
                          "none — no GPU was available to this run, so every figure here is CPU-only; on a GPU machine "
                          "`mtseg bench --device cuda` measures the same table there (bf16 autocast as `predict` uses "
                          "it, plus the peak CUDA memory allocated)"),
             f"- load average at start {m.get('load_average')}, at end {report.get('load_average_end')}",
             f"- bundle: {report['bundle_note']}", f"- run took {report['wall_s'] / 60:.1f} min", ""]
    for note in report.get("notes", []):
        lines.append(f"> {note}")
    if report.get("notes"):
        lines.append("")
    load = m.get("load_average") or [0.0]
    if load[0] > 0.5 * (m.get("logical_cores") or 1):
        lines += [f"> The machine was shared with other jobs during this run (load average {load[0]:.1f} on "
                  f"{m.get('logical_cores')} cores at the start): absolute times are inflated and noisy. Our and "
                  "MONAI's sliding windows run interleaved in the same process on the same array (alternating who "
                  "goes first), so their ratio remains meaningful; the CPU-time ratio is the least load-sensitive.", ""]
    lines += ["## Command", "", "```", report["command"], "```", ""]
    cases = [c for c in report["cases"] if "error" not in c]
    lines += ["## End-to-end `predict` and sliding window vs MONAI", "",
              "| case | input (x×y×z) | canonical (z×y×x), windows | end-to-end s | of which inference s | "
              "ours sliding window s | MONAI s | ours / MONAI | speed-up (wall) | speed-up (CPU time) | Dice (mean / min) | max Δp | "
              "uncertainty + OOD share | peak RSS MB | repeats |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in cases:
        ag = c.get("agreement", {})
        lines.append(
            f"| {c['description']} | {'×'.join(map(str, c['input_size']))} | "
            f"{'×'.join(map(str, c.get('canonical_shape_zyx', []))) or '—'}, {c.get('n_windows', '—')} | "
            f"{_fmt(c['total_s'])} | {_fmt(c['stages_median_s'].get('inference'))} | {_fmt(c.get('sw_ours_s'))} | "
            f"{_fmt(c.get('sw_monai_s'))} | {_fmt(c.get('ratio_ours_over_monai'), 2)} | "
            f"{_fmt(c.get('speedup_vs_monai'), 2)}× | {_fmt(c.get('cpu_speedup_vs_monai'), 2)}× | "
            f"{_fmt(ag.get('dice_mean'), 4)} / {_fmt(ag.get('dice_min'), 4)} | {ag.get('max_abs_prob_diff', float('nan')):.2g} | "
            f"{100 * c['uncertainty_ood_share']:.1f} % ({100 * c['uncertainty_share']:.1f} + {100 * c['ood_share']:.2f}) | "
            f"{c['peak_rss_mb']:.0f} | {c['repeats']} |")
    for c in cases:
        if "cuda_max_allocated_mb" in c:
            lines.append(f"\n{c['name']}: peak CUDA memory allocated {c['cuda_max_allocated_mb']:.0f} MB on {c.get('cuda_device')}")
    for c in report["cases"]:
        if "error" in c:
            lines.append(f"\n**{c['name']} failed:**\n```\n{c['error']}\n```")
    for s in report.get("skipped", []):
        lines.append(f"\n*skipped: {s}*")
    lines += _pipeline_section(cases)
    dec = [c for c in cases if "engine_speedup" in c]
    if dec:
        lines += ["", "### Where the speed-up comes from (same run, same array)", "",
                  "| case | windows (reused: constant input) | MONAI, PyTorch layers s | MONAI, our CPU kernels s | ours s | "
                  "kernels alone | our sliding window alone | total | Dice ours vs MONAI+kernels (mean / min) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for c in dec:
            a = c["agreement_monai_kernels"]
            lines.append(f"| {c['name']} | {c['n_windows']} ({c['n_reused']}) | {_fmt(c['sw_monai_s'], 2)} | "
                         f"{_fmt(c['sw_monai_our_kernels_s'], 2)} | {_fmt(c['sw_ours_s'], 2)} | "
                         f"{_fmt(c['kernel_speedup'], 2)}× | {_fmt(c['engine_speedup'], 2)}× | "
                         f"{_fmt(c['speedup_vs_monai'], 2)}× | {a['dice_mean']:.4f} / {a['dice_min']:.4f} |")
        lines += ["", "Kernels alone = MONAI's time on PyTorch's layers / MONAI's time on our inference kernels "
                  "(`fast_inference.py`: channels-last convolutions, in-place instance norm, 1×1 and transposed "
                  "convolutions as matrix products). Our sliding window alone = MONAI on our kernels / ours: the same "
                  "windows and blending; freed activations stay in the heap while the windows run, and windows "
                  "whose input is one constant value run once (the count in brackets: a 128 mm window entirely in "
                  "air or zero background)."]
    wm = [c for c in cases if "weightmap_check" in c]
    for c in wm:
        w = c["weightmap_check"]
        lines += ["", f"MONAI in the table is given our Gaussian weight map (`roi_weight_map`: same blending). With "
                  f"MONAI's own `mode='gaussian'` instead ({c['name']}), its output differs from ours by max |Δlogit| "
                  f"{w['max_abs_logit_diff']:.2g}, max |Δp| {w['max_abs_prob_diff']:.2g}, Dice {w['dice_mean']:.4f}: "
                  "that Gaussian is floored at 1e-3 and not rescaled to max 1, so window corners weigh ~10⁷× more."]
    bf = [c for c in cases if "sw_ours_bf16_s" in c]
    if bf:
        lines += ["", "### Opt-in CPU bf16 (`mtseg predict --cpu-bf16`), same run, same array", "",
                  "| case | ours fp32 s | ours bf16 s | MONAI fp32 s | bf16 speed-up vs MONAI (wall / CPU time) | Dice vs MONAI (mean / min) | "
                  "Dice vs ours fp32 (mean / min) | max Δp vs ours fp32 | Gram max rel. diff | signature distance | "
                  "OOD score fp32 → bf16 (threshold) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for c in bf:
            a, b, o = c["agreement_bf16_vs_monai"], c["agreement_bf16_vs_ours"], c["bf16_ood"]
            lines.append(f"| {c['name']} | {_fmt(c['sw_ours_s'])} | {_fmt(c['sw_ours_bf16_s'])} | {_fmt(c['sw_monai_s'])} | "
                         f"{_fmt(c['speedup_bf16_vs_monai'], 2)}× / {_fmt(c.get('cpu_speedup_bf16_vs_monai'), 2)}× | {a['dice_mean']:.4f} / {a['dice_min']:.4f} | "
                         f"{b['dice_mean']:.4f} / {b['dice_min']:.4f} | {b['max_abs_prob_diff']:.2g} | "
                         f"{o['gram_max_rel_diff']:.2g} | {o['signature_distance']:.2g} | "
                         f"{o['score_fp32']:.4f} → {o['score_bf16']:.4f} ({o['threshold']:.4f}) |")
    lines += ["", "### Stage breakdown (median seconds)", ""]
    if cases:
        keys = list(cases[0]["stages_median_s"])
        lines += ["| case | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
        for c in cases:
            lines.append(f"| {c['name']} | " + " | ".join(_fmt(c['stages_median_s'].get(k), 2) for k in keys) + " |")
    lines += ["", "Stages: `inference` is the whole sliding window including the OOD Gram accumulation "
              "(`ood_gram`, also listed on its own); `ood` is the spectrum and nearest-neighbour score; "
              "`probabilities` is the temperature softmax the labels need; `uncertainty` is MC dropout when "
              "asked for, the context merge and the entropy on the canonical grid; `resample_uncertainty` maps the "
              "uncertainty to the input grid (inside `resample`). Uncertainty share = uncertainty + "
              "resample_uncertainty; OOD share = ood + ood_gram; writing the uncertainty file is reported "
              "separately (`write_uncertainty`).", ""]
    tr = report.get("training")
    if tr:
        lines += ["## Training throughput", ""]
        if "error" in tr:
            lines.append(f"failed:\n```\n{tr['error']}\n```")
        else:
            keeps = "yes" if tr["data_fraction"] < 0.2 else "no"
            lines += [f"Default training loop (sampling with foreground oversampling + augmentation, forward, "
                      f"partial-label loss, backward, AdamW) on synthetic cases, batch {tr['batch']} × "
                      f"{'×'.join(map(str, tr['patch']))}, {tr['steps']} timed steps, {tr['threads']} threads:", "",
                      "| patches/s | median step s | median data s | data share of step | data loading keeps up |",
                      "|---|---|---|---|---|",
                      f"| {tr['patches_per_s']:.2f} | {tr['median_step_s']:.2f} | {tr['median_data_s']:.3f} | "
                      f"{100 * tr['data_fraction']:.1f} % | {keeps} |", ""]
        if report.get("train_log"):
            lines += [f"From the real training run's log (`{report['train_log']['path']}`, the last "
                      f"{report['train_log']['n']} reports): median {report['train_log']['patches_per_s']:.2f} "
                      f"patches/s, data {report['train_log']['data_percent']:.0f} % of step time.", ""]
    comp = [c for c in cases if "speedup_vs_monai" in c]
    if comp:
        overhead = [c["stages_median_s"].get("ood_gram", 0.0) / c["stages_median_s"]["inference"] for c in comp
                    if c["stages_median_s"].get("inference")]
        lines += ["## Reading the comparison", "",
                  "- The peer is what a user would otherwise run: MONAI's `sliding_window_inference` over the same "
                  "network and weights on PyTorch's standard layers, with the same window, overlap, window placement "
                  f"and Gaussian weight map. Both run the same number of windows ({', '.join(str(c['n_windows']) for c in comp)} "
                  "here); the OOD Gram accumulation, our only extra work, is "
                  f"{100 * max(overhead, default=0):.1f} % of our inference at most.",
                  "- Our speed-up is the product of the two factors in the table above: inference kernels that do the "
                  "same fp32 arithmetic with less memory traffic, and a sliding window that keeps freed activations "
                  "in the heap while the windows run (no page faults on fresh memory for every window) and runs a "
                  "window whose input is one constant value only once. Neither changes the numbers beyond float "
                  "rounding (max |Δp| and Dice in the tables).",
                  "- The opt-in `--cpu-bf16` path is cheaper arithmetic (bf16 on AMX / AVX512-BF16) on the standard "
                  "layers; its agreement and its effect on the OOD signature are listed separately. It is not the "
                  "default because the training signatures of a bundle are computed at full precision.",
                  ""]
    lines += ["## Targets (CPU)", ""]
    for t in report.get("targets", []):
        lines.append(f"- {'✅' if t['met'] else '❌'} {t['text']}")
    lines.append("")
    for extra in report.get("sections", []):
        lines += [extra, ""]
    return "\n".join(lines).rstrip("\n") + "\n"


PEER_STAGES = ("load", "preprocess", "inference", "softmax", "invert", "argmax", "save")


def _pipeline_section(cases: list[dict]) -> list[str]:
    """Ours end to end against the MONAI pipeline a user would write, in the same run on the same files."""
    peers = [c for c in cases if "monai_pipeline" in c]
    if not peers:
        return []
    lines = ["", "### End to end against the MONAI pipeline (same run, same files)", "",
             "| case | ours s | MONAI pipeline s | speed-up (wall) | speed-up (CPU time) | segmentation Dice (mean / min) | "
             "ours peak RSS MB | MONAI peak RSS MB | MONAI " + " / ".join(PEER_STAGES) + " s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for c in peers:
        p = c["monai_pipeline"]
        if "error" in p:
            lines.append(f"| {c['name']} | {_fmt(c['total_s'])} | failed: {p['error'].splitlines()[-1][:120]} |||||||")
            continue
        a = p["agreement"]
        dice = f"{a['dice_mean']:.4f} / {a['dice_min']:.4f}" if "dice_mean" in a else a.get("error", "—")
        lines.append(f"| {c['name']} | {_fmt(c['total_s'])} | {_fmt(p['total_s'])} | "
                     f"{_fmt(c['e2e_speedup_vs_monai'], 2)}× | {_fmt(c.get('e2e_cpu_speedup_vs_monai'), 2)}× | {dice} | "
                     f"{c['peak_rss_mb']:.0f} | {p['peak_rss_mb']:.0f} | "
                     + " / ".join(_fmt(p["stages_median_s"].get(k), 2) for k in PEER_STAGES) + " |")
    lines += ["", "The peer: `LoadImaged → EnsureChannelFirstd → Orientationd(LPS) → Spacingd(bilinear) → "
              "ScaleIntensityRanged (CT window) or ScaleIntensityRangePercentilesd (MR) → sliding_window_inference → "
              "softmax → Invertd → AsDiscreted(argmax) → SaveImaged`, over the same network and weights on PyTorch's "
              "layers, with our window, overlap, weight map, target spacing and intensity rule; it runs in a process "
              "of its own right after ours. Ours also computes the uncertainty (written as a file), the OOD score and "
              "the report; the peer only segments. Dice compares the two written segmentations on the labels of the "
              "context ours recognised (ours keeps only those; the peer's other labels count as background); the "
              "peer has no anti-aliasing and MONAI's own output grid, so the two are close, not equal."]
    return lines


def _speed_target(cases: list[dict], speedup: str, agreement: str, what: str, factor: float = 1.5) -> dict | None:
    """≥ ``factor`` × faster than MONAI with Dice ≥ 0.99, judged on the slowest case and the lowest mean Dice."""
    timed = [c for c in cases if speedup in c]
    if not timed:
        return None
    worst = min(timed, key=lambda c: c[speedup])
    dice = min(c[agreement]["dice_mean"] for c in timed)
    return {"met": worst[speedup] >= factor and dice >= 0.99,
            "text": f"{what} with Dice ≥ 0.99: slowest case {worst['name']} {worst[speedup]:.2f}×, "
                    f"lowest mean Dice {dice:.4f}"}


def evaluate_targets(cases: list[dict]) -> list[dict]:
    out = [t for t in (
        _speed_target(cases, "speedup_vs_monai", "agreement", "sliding window ≥ 1.6× faster than MONAI's at equal "
                      "settings", 1.6),
        _speed_target(cases, "speedup_bf16_vs_monai", "agreement_bf16_vs_monai",
                      "(opt-in `--cpu-bf16`, not the default) ≥ 1.5× faster than MONAI fp32")) if t]
    ok = [c for c in cases if "uncertainty_ood_share" in c]
    if ok:
        worst = max(ok, key=lambda c: c["uncertainty_ood_share"])
        out.append({"met": worst["uncertainty_ood_share"] <= 0.10,
                    "text": f"uncertainty + OOD ≤ 10 % of end-to-end: worst {worst['name']} "
                            f"{100 * worst['uncertainty_ood_share']:.1f} %"})
    peers = [c for c in cases if "e2e_speedup_vs_monai" in c]
    if peers:
        worst = min(peers, key=lambda c: c["e2e_speedup_vs_monai"])
        out.append({"met": worst["e2e_speedup_vs_monai"] >= 2.0,
                    "text": f"end to end ≥ 2× faster than the MONAI pipeline on every volume: slowest case "
                            f"{worst['name']} {worst['e2e_speedup_vs_monai']:.2f}× (CPU time "
                            f"{_fmt(worst.get('e2e_cpu_speedup_vs_monai'), 2)}×)"})
    ct = [c for c in ok if c["name"] == "ct"]
    if ct:
        out.append({"met": ct[0]["total_s"] <= 10.0,
                    "text": f"512×512×300 CT end to end ≤ 10 s: {ct[0]['total_s']:.1f} s"})
        out.append({"met": ct[0]["peak_rss_mb"] <= 3072,
                    "text": f"peak RSS ≤ 3 GB for the 512×512×300 CT: {ct[0]['peak_rss_mb']:.0f} MB"})
    return out


def train_log_summary() -> dict | None:
    path = Path(__file__).resolve().parents[1] / "runs" / "default_work" / "train.log"
    if not path.is_file():
        return None
    rates, data = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        if "patches/s data" in line:
            parts = line.split()
            try:
                rates.append(float(parts[parts.index("patches/s") - 1]))
                data.append(float(parts[parts.index("data") + 1].rstrip("%")))
            except (ValueError, IndexError):
                continue
    if not rates:
        return None
    return {"path": str(path.relative_to(path.parents[2])), "n": min(len(rates), 20),
            "patches_per_s": median(rates[-20:]), "data_percent": median(data[-20:])}


