"""Per-case summaries, the machine, the targets and the training log of a benchmark run."""

from __future__ import annotations

import os
import platform
import statistics
from pathlib import Path

import numpy as np


def _fmt(x, digits=1):
    return "—" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.{digits}f}"


def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


# --- summary and report ---------------------------------------------------------------------
def shares(med: dict) -> dict[str, float]:
    """Shares of end to end from median stage times. Uncertainty: MC dropout (if asked) + context merge +
    entropy (the softmax the labels need is "probabilities") + its resampling to the input grid; OOD: the
    Gram accumulation inside the window loop + spectrum and score; quality: the expected-Dice evidence and
    model (issue 10's trust computation is OOD + quality)."""
    total = med["total"]
    unc = med.get("uncertainty", 0.0) + med.get("resample_uncertainty", 0.0)
    ood = med.get("ood", 0.0) + med.get("ood_gram", 0.0)
    quality = med.get("quality", 0.0)
    return {
        "uncertainty_share": unc / total,
        "ood_share": ood / total,
        "uncertainty_ood_share": (unc + ood) / total,
        "quality_share": quality / total,
        "trust_share": (ood + quality) / total,
    }


def summarise(case: dict) -> dict:
    if "error" in case:
        return dict(case)  # a copy: the caller attaches the raw case to the summary
    runs = case["e2e_runs"]
    med = {k: median([r[k] for r in runs]) for k in runs[0]}
    cpu_total = med.pop("cpu_total", None)
    total = med["total"]
    s = {
        "name": case["name"],
        "description": case["description"],
        "input_size": case["input_size"],
        "stages_median_s": med,
        "total_s": total,
        **shares(med),
        "peak_rss_mb": case["peak_rss_mb"],
        "repeats": len(runs),
        "threads": case["threads"],
    }
    if "sw_ours_s" in case:
        s.update(
            {
                "canonical_shape_zyx": case["canonical_shape_zyx"],
                "n_windows": case["n_windows"],
                "sw_ours_s": median(case["sw_ours_s"]),
                "sw_monai_s": median(case["sw_monai_s"]),
                "agreement": case["agreement"],
            }
        )
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
        s["monai_pipeline"] = {
            "cpu_total_s": pm.pop("cpu_total"),
            "stages_median_s": pm,
            "total_s": pm["total"],
            "peak_rss_mb": peer["peak_rss_mb"],
            "agreement": peer["agreement"],
        }
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
    info = {
        "cpu": cpu,
        "logical_cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda_available": torch.cuda.is_available(),
    }
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


def _speed_target(cases: list[dict], speedup: str, agreement: str, what: str, factor: float = 1.5) -> dict | None:
    """≥ ``factor`` × faster than MONAI with Dice ≥ 0.99, judged on the slowest case and the lowest mean Dice."""
    timed = [c for c in cases if speedup in c]
    if not timed:
        return None
    worst = min(timed, key=lambda c: c[speedup])
    dice = min(c[agreement]["dice_mean"] for c in timed)
    return {
        "met": worst[speedup] >= factor and dice >= 0.99,
        "text": f"{what} with Dice ≥ 0.99: slowest case {worst['name']} {worst[speedup]:.2f}×, "
        f"lowest mean Dice {dice:.4f}",
    }


def evaluate_targets(cases: list[dict]) -> list[dict]:
    out = [
        t
        for t in (
            _speed_target(
                cases,
                "speedup_vs_monai",
                "agreement",
                "sliding window ≥ 1.6× faster than MONAI's at equal settings",
                1.6,
            ),
            _speed_target(
                cases,
                "speedup_bf16_vs_monai",
                "agreement_bf16_vs_monai",
                "(opt-in `--cpu-bf16`, not the default) ≥ 1.5× faster than MONAI fp32",
            ),
        )
        if t
    ]
    for key, what in (
        ("uncertainty_ood_share", "uncertainty + OOD"),
        ("trust_share", "trust (OOD + quality estimate)"),  # runs before the quality estimate have no such share
    ):
        ok = [c for c in cases if key in c]
        if ok:
            worst = max(ok, key=lambda c: c[key])
            out.append(
                {
                    "met": worst[key] <= 0.10,
                    "text": f"{what} ≤ 10 % of end-to-end: worst {worst['name']} {100 * worst[key]:.1f} %",
                }
            )
    peers = [c for c in cases if "e2e_speedup_vs_monai" in c]
    if peers:
        worst = min(peers, key=lambda c: c["e2e_speedup_vs_monai"])
        out.append(
            {
                "met": worst["e2e_speedup_vs_monai"] >= 2.0,
                "text": f"end to end ≥ 2× faster than the MONAI pipeline on every volume: slowest case "
                f"{worst['name']} {worst['e2e_speedup_vs_monai']:.2f}× (CPU time "
                f"{_fmt(worst.get('e2e_cpu_speedup_vs_monai'), 2)}×)",
            }
        )
    ct = [c for c in ok if c["name"] == "ct"]
    if ct:
        out.append(
            {"met": ct[0]["total_s"] <= 10.0, "text": f"512×512×300 CT end to end ≤ 10 s: {ct[0]['total_s']:.1f} s"}
        )
        out.append(
            {
                "met": ct[0]["peak_rss_mb"] <= 3072,
                "text": f"peak RSS ≤ 3 GB for the 512×512×300 CT: {ct[0]['peak_rss_mb']:.0f} MB",
            }
        )
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
    return {
        "path": str(path.relative_to(path.parents[2])),
        "n": min(len(rates), 20),
        "patches_per_s": median(rates[-20:]),
        "data_percent": median(data[-20:]),
    }
