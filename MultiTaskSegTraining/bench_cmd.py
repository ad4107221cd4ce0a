"""`mtseg bench`: end-to-end and sliding-window timings against MONAI, memory and training throughput.

Every case runs in a fresh subprocess, so its peak RSS (``ru_maxrss``) is its own:

1. end-to-end ``predict`` (load → preprocess → inference → uncertainty → OOD → resample →
   write), ``--repeats`` times; peak RSS is read right after these runs;
2. on the same preprocessed array, our ``sliding_window`` (with the OOD taps, as ``predict``
   runs it) and MONAI's ``sliding_window_inference`` with the same network, weights, window,
   overlap, Gaussian blending (sigma 0.125 × window) and windows per batch, interleaved
   (alternating which goes first) so that both see the same machine load; plus the agreement
   of the two outputs (Dice between the argmax segmentations, max |Δ probability|).

Training throughput (patches/s, and the data share of the step time) runs in one more
subprocess. The report goes to BENCHMARKS.md (and the raw numbers to a JSON file beside it).
MONAI and psutil are benchmark-only extras: ``pip install 'multitaskseg[bench]'``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from MultiTaskSegLib import DEFAULT_BUNDLE
from MultiTaskSegLib.errors import MultiTaskSegError

# name → (size xyz, spacing xyz mm, kind, description)
SIZES = {
    "128": ((128, 128, 128), (1.5, 1.5, 1.5), "mr", "128³ MR head phantom, 1.5 mm"),
    "256": ((256, 256, 160), (1.0, 1.0, 1.5), "mr", "256×256×160 MR head phantom, 1×1×1.5 mm"),
    "ct": ((512, 512, 300), (0.7, 0.7, 1.0), "ct", "512×512×300 CT body phantom, 0.7×0.7×1 mm"),
}
DEFAULT_SIZES = "128,256,ct"
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", help="model bundle (default: the shipped default model, else an untrained "
                   "network of the default architecture — fine for timing, not for agreement figures)")
    p.add_argument("--checkpoint", help="no bundle: use the weights of this training checkpoint (checkpoint.pt of a "
                   "default-architecture `mtseg train` run, e.g. while the default model is still training)")
    p.add_argument("--sizes", default=DEFAULT_SIZES,
                   help=f"comma-separated synthetic sizes: {', '.join(SIZES)} or XxYxZ[@SPACING][:ct|:mr] "
                        f"(default {DEFAULT_SIZES}; 'none' for no synthetic volumes)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per case (median reported)")
    p.add_argument("--large-repeats", type=int, default=2, help="repeats for inputs of 8 M voxels or more")
    p.add_argument("--ct-repeats", type=int, default=1, help="repeats for the 512×512×300 CT")
    p.add_argument("--data", default=str(SHARED_DATA), help="MSD data root for real cases (skipped if absent)")
    p.add_argument("--real-cases", type=int, default=2, help="real cases: the first image of this many datasets")
    p.add_argument("--real-repeats", type=int, default=1, help="repeats for the real cases")
    p.add_argument("--train-steps", type=int, default=4, help="timed training steps (0 = skip training throughput)")
    p.add_argument("--no-monai", action="store_true", help="skip the MONAI comparison")
    p.add_argument("--no-bf16", action="store_true", help="skip timing the opt-in CPU bf16 sliding window")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--output", "-o", default="BENCHMARKS.md", help="markdown report (a .json with the raw numbers beside it)")
    p.add_argument("--work-dir", help="where volumes and outputs go (default: a temporary folder)")
    p.add_argument("--note", action="append", default=[], help="extra line for the report (repeatable)")
    p.add_argument("--from-json", metavar="JSON", help="only re-render the markdown from the raw numbers of an earlier run")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: run one case spec (JSON file)


# --- helpers ------------------------------------------------------------------------------
def _median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def _peak_rss_mb() -> float:
    """Peak resident set size of this process (ru_maxrss is KiB on Linux, bytes on macOS)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1024 * 1024) if sys.platform == "darwin" else r / 1024


def parse_size(token: str) -> dict:
    token = token.strip()
    if token in SIZES:
        size, spacing, kind, desc = SIZES[token]
        return {"name": token, "size": list(size), "spacing": list(spacing), "kind": kind, "description": desc}
    kind = "ct"
    if ":" in token:
        token, kind = token.split(":")
    spacing = [2.0, 2.0, 2.0]
    if "@" in token:
        token, sp = token.split("@")
        spacing = [float(s) for s in sp.split(",")]
        spacing = spacing * 3 if len(spacing) == 1 else spacing
    size = [int(s) for s in token.lower().split("x")]
    if len(size) != 3 or len(spacing) != 3 or kind not in ("ct", "mr"):
        raise MultiTaskSegError(f"--sizes: cannot read {token!r} (expected e.g. 128, ct or 96x96x64@1.5:mr)")
    desc = f"{'×'.join(map(str, size))} {kind.upper()} phantom, {'×'.join(f'{s:g}' for s in spacing)} mm"
    return {"name": "x".join(map(str, size)), "size": size, "spacing": spacing, "kind": kind, "description": desc}


def default_architecture_bundle(path: Path, checkpoint: str | None = None) -> Path:
    """A network of the default architecture (14 outputs, 5 contexts) with real hashes: untrained, or
    with the weights of a training checkpoint (``checkpoint.pt`` of `mtseg train`) of that architecture."""
    import torch

    from MultiTaskSegLib.bundle import save_bundle
    from MultiTaskSegLib.network import NetworkConfig, ResidualUNet3D
    from MultiTaskSegLib.preprocessing import PreprocessingConfig
    from MultiTaskSegLib.terminology import describe

    torch.manual_seed(0)
    contexts = [("CardiacCineMR", "MR", [1, 2, 3]), ("LeftAtriumMR", "MR", [4]), ("AbdomenCT", "CT", [5, 6, 7]),
                ("BrainTumorMR", "MR", [8, 9, 10]), ("BrainStructuresMR", "MR", [11, 12, 13])]
    n_labels = 13  # + background = 14 outputs
    config = NetworkConfig(out_channels=n_labels + 1, widths=(8, 16, 32, 64, 128), dropout=0.1,
                           n_contexts=len(contexts))
    net = ResidualUNet3D(config)
    if checkpoint:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        net.load_state_dict(state["model"])
    layers = ["enc3", "enc4"]
    rng = np.random.default_rng(0)
    signatures = rng.normal(size=(10, 64 + 128))
    signatures /= np.linalg.norm(signatures, axis=1, keepdims=True)
    owner = {v: c[0] for c in contexts for v in c[2]}
    meta = {
        "architecture": config.to_dict(),
        "preprocessing": {**PreprocessingConfig((2.0, 2.0, 2.0)).to_dict(), "patch_size": [64, 64, 64],
                          "overlap": 0.5, "batch_size": 2},
        "labels": [{"value": v, "name": f"structure {v}", "context": owner[v], **describe(f"structure {v}", v - 1)}
                   for v in range(1, n_labels + 1)],
        "contexts": [{"name": n, "modality": m, "region": "unspecified", "labels": lab, "n_training_cases": 2}
                     for n, m, lab in contexts],
        "calibration": {"temperature": 1.0},
        "ood": {"detector": "spectral", "layers": layers, "spectrum_length": None, "threshold": 0.5,
                "threshold_rule": "benchmark placeholder"},
        "inference": {"restrict_to_context": True, "context_source": "head"},
        "training": {"note": f"weights of {checkpoint}" if checkpoint else
                     "untrained network of the default architecture, for timing only"},
    }
    save_bundle(path, meta, net.state_dict(), signatures, [i // 2 for i in range(10)], [f"c{i}" for i in range(10)])
    return path


def write_phantom(spec: dict, folder: Path) -> Path:
    from MultiTaskSegLib.volume_io import write_volume

    from .bench_phantoms import ct_phantom, mr_phantom

    path = folder / f"phantom_{spec['name']}_{spec['kind']}.nii.gz"
    if not path.exists():
        make = ct_phantom if spec["kind"] == "ct" else mr_phantom
        write_volume(make(spec["size"], spec["spacing"], seed=1), path)
    return path


def real_cases(root: Path, n: int) -> list[dict]:
    if n <= 0 or not root.is_dir():
        return []
    out = []
    for ds in sorted(p for p in root.iterdir() if (p / "dataset.json").is_file()):
        images = sorted((ds / "imagesTr").glob("*.nii*"))
        if images:
            out.append({"name": f"{ds.name}/{images[0].name.split('.')[0]}", "path": str(images[0]),
                        "kind": "real", "description": f"real: {ds.name} {images[0].name}"})
        if len(out) >= n:
            break
    return out


# --- worker: one case in a fresh process --------------------------------------------------
def _agreement(ours, theirs, temperature: float) -> dict:
    import torch

    p1 = torch.softmax(ours / temperature, 0)
    p2 = torch.softmax(theirs / temperature, 0)
    a, b = p1.argmax(0), p2.argmax(0)
    dices = {}
    for c in range(1, p1.shape[0]):
        x, y = a == c, b == c
        n = int(x.sum()) + int(y.sum())
        if n:
            dices[c] = 2.0 * int((x & y).sum()) / n
    fg_x, fg_y = a > 0, b > 0
    n_fg = int(fg_x.sum()) + int(fg_y.sum())
    return {"dice_mean": float(np.mean(list(dices.values()))) if dices else 1.0,
            "dice_min": float(min(dices.values())) if dices else 1.0,
            "dice_foreground": 2.0 * int((fg_x & fg_y).sum()) / n_fg if n_fg else 1.0,
            "voxel_agreement": float((a == b).float().mean()),
            "max_abs_prob_diff": float((p1 - p2).abs().max()),
            "max_abs_logit_diff": float((ours - theirs).abs().max())}


def run_case_worker(spec: dict) -> dict:
    import gc

    import torch

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    from MultiTaskSegLib.bundle import load_bundle
    from MultiTaskSegLib.fast_inference import plain_layers
    from MultiTaskSegLib.inference import WindowConfig, autocast_context, sliding_window
    from MultiTaskSegLib.predictor import PredictOptions, Predictor
    from MultiTaskSegLib.preprocessing import preprocess
    from MultiTaskSegLib.volume_io import read_volume, write_volume

    result: dict = {"name": spec["name"], "description": spec["description"], "threads": torch.get_num_threads()}
    bundle = load_bundle(spec["bundle"])
    predictor = Predictor(bundle, spec["device"])
    device = predictor.device
    out = Path(spec["out_dir"])
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    image = None
    for r in range(spec["repeats"]):
        image = None
        gc.collect()
        t0 = time.perf_counter()
        image = read_volume(spec["path"])
        t_load = time.perf_counter() - t0
        prediction = predictor.predict(image, PredictOptions(device=spec["device"]))
        t = time.perf_counter()
        write_volume(prediction.labels, out / "seg.nii.gz")
        t_seg = time.perf_counter() - t
        t = time.perf_counter()
        write_volume(prediction.uncertainty, out / "uncertainty.nii.gz")
        t_unc = time.perf_counter() - t
        (out / "report.json").write_text(json.dumps(prediction.report(), indent=2), encoding="utf-8")
        total = time.perf_counter() - t0
        stages = {"load": t_load, **{k: float(v) for k, v in prediction.timings_s.items() if k != "total"},
                  "write_seg": t_seg, "write_uncertainty": t_unc, "total": total}
        runs.append(stages)
        del prediction
    result["input_size"] = list(image.GetSize())
    result["input_spacing"] = [round(s, 3) for s in image.GetSpacing()]
    result["e2e_runs"] = runs
    result["peak_rss_mb"] = _peak_rss_mb()
    if device.type == "cuda":
        result["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
        result["cuda_device"] = torch.cuda.get_device_name(device)
    if spec.get("monai", True):
        from monai.inferers import sliding_window_inference

        pre = preprocess(image, bundle.preprocessing)
        del image
        gc.collect()
        result["canonical_shape_zyx"] = list(pre.array.shape)
        window = predictor.window
        model, taps = predictor.model, predictor.detector.layers
        plain_model = bundle.load_model(device)  # the network as PyTorch gives it: contiguous weights

        def ours():
            return sliding_window(model, pre.array, window, device, taps)

        bf16_window = WindowConfig(window.patch_size, window.overlap, window.batch_size, cpu_bf16=True)

        def ours_bf16():
            return sliding_window(model, pre.array, bf16_window, device, taps)

        from MultiTaskSegLib.inference import gaussian_importance
        gmap = torch.from_numpy(gaussian_importance(window.patch_size)).to(device)

        def monai(net, kernels: bool, **blending):
            # equal settings: the same window placement (ours follows MONAI's) and, by default, the same
            # Gaussian blending (our sigma = patch/8 map, given to MONAI)
            x = torch.from_numpy(pre.array)[None, None].to(device)
            layers = contextlib.nullcontext() if kernels else plain_layers()
            with torch.inference_mode(), autocast_context(device), layers:
                y = sliding_window_inference(x, tuple(window.patch_size), window.batch_size, lambda t: net(t)[0],
                                             overlap=window.overlap, padding_mode="constant", cval=0.0,
                                             **(blending or {"roi_weight_map": gmap}))
            return y[0].float().cpu()

        def theirs():  # the peer: MONAI's sliding window over the network on PyTorch's standard layers
            return monai(plain_model, kernels=False)

        def theirs_with_our_kernels():  # MONAI's sliding window over our CPU inference kernels
            return monai(model, kernels=True)

        variants = [("ours", ours), ("monai", theirs)]
        if device.type == "cpu":
            variants.append(("monai_our_kernels", theirs_with_our_kernels))
        if spec.get("bf16", True) and device.type == "cpu":
            variants.append(("ours_bf16", ours_bf16))
        times: dict[str, list[float]] = {name: [] for name, _ in variants}
        cpu: dict[str, list[float]] = {name: [] for name, _ in variants}
        values: dict = {}
        for r in range(spec["repeats"]):
            order = variants if r % 2 == 0 else variants[::-1]  # alternate who goes first
            for name, fn in order:
                values.pop(name, None)
                gc.collect()
                t, c = time.perf_counter(), time.process_time()
                values[name] = fn()
                times[name].append(time.perf_counter() - t)
                cpu[name].append(time.process_time() - c)
        mine, other = values["ours"], values["monai"]
        result["n_windows"] = mine.n_windows
        result["n_reused"] = mine.n_reused
        if "monai_our_kernels" in times:
            result["sw_monai_our_kernels_s"] = times["monai_our_kernels"]
            result["agreement_monai_kernels"] = _agreement(mine.logits, values["monai_our_kernels"], bundle.temperature)
        result["sw_ours_s"] = times["ours"]
        result["sw_monai_s"] = times["monai"]
        result["sw_cpu_s"] = cpu  # process CPU time per variant: less sensitive to other processes' load
        result["agreement"] = _agreement(mine.logits, other, bundle.temperature)
        if spec.get("weightmap_check"):
            # MONAI's own Gaussian (mode="gaussian") is floored at 1e-3 and not rescaled to max 1:
            # how far its output moves from ours shows what "the same blending" means
            y = monai(plain_model, kernels=False, mode="gaussian", sigma_scale=0.125)
            result["weightmap_check"] = _agreement(mine.logits, y, bundle.temperature)
        if "ours_bf16" in values:
            half = values["ours_bf16"]
            detector = predictor.detector
            sig32, sig16 = detector.signature(mine.gram), detector.signature(half.gram)
            score32, score16 = detector.score(sig32), detector.score(sig16)
            result["sw_ours_bf16_s"] = times["ours_bf16"]
            result["agreement_bf16_vs_monai"] = _agreement(half.logits, other, bundle.temperature)
            result["agreement_bf16_vs_ours"] = _agreement(half.logits, mine.logits, bundle.temperature)
            result["bf16_ood"] = {
                "gram_max_rel_diff": max(float(np.abs(half.gram[k] - mine.gram[k]).max() / np.abs(mine.gram[k]).max())
                                         for k in mine.gram),
                "signature_distance": float(np.linalg.norm(sig16 - sig32)),
                "score_fp32": score32.score, "score_bf16": score16.score, "threshold": score32.threshold,
                "same_decision": score32.is_ood == score16.is_ood}
    return result


def run_training_worker(spec: dict) -> dict:
    """Patches/s of training steps and the share of step time spent on sampling + augmentation."""
    import torch

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    from MultiTaskSegLib.bundle import load_bundle
    from MultiTaskSegLib.network import ResidualUNet3D
    from MultiTaskSegLib.preprocessing import preprocess

    from .bench_phantoms import ct_phantom, mr_phantom
    from .data import CachedCase
    from .losses import partial_label_loss
    from .sampling import PatchSampler, augment

    bundle = load_bundle(spec["bundle"])
    config = bundle.network_config
    patch = tuple(bundle.window.patch_size)
    batch = bundle.window.batch_size
    cases = []
    for i, (make, size) in enumerate([(ct_phantom, (192, 192, 120)), (mr_phantom, (128, 128, 96))]):
        pre = preprocess(make(size, (1.5, 1.5, 1.5), seed=i), bundle.preprocessing)
        label = (pre.array > np.percentile(pre.array, 70)).astype(np.uint8)
        cases.append(CachedCase(i, f"phantom{i}", pre.array.astype(np.float16), label,
                                tuple(np.array(pre.array.shape) * 2.0)))
    sampler = PatchSampler(cases, 2, patch, seed=0)
    rng = np.random.default_rng(0)
    model = ResidualUNet3D(config).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    annotated = [list(range(1, config.out_channels))] * batch
    data_s, step_s = [], []
    for k in range(spec["steps"] + 1):  # the first step warms up and is not counted
        t0 = time.perf_counter()
        x, y, _ = sampler.batch(batch)
        x, y = augment(x, y, rng)
        t1 = time.perf_counter()
        logits, _ = model(x)
        loss = partial_label_loss(logits.float(), y.clamp_max(config.out_channels - 1), annotated)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        t2 = time.perf_counter()
        if k:
            data_s.append(t1 - t0)
            step_s.append(t2 - t0)
    total = sum(step_s)
    return {"patch": list(patch), "batch": batch, "steps": spec["steps"], "threads": torch.get_num_threads(),
            "patches_per_s": batch * len(step_s) / total if total else float("nan"),
            "data_fraction": sum(data_s) / total if total else float("nan"),
            "median_step_s": _median(step_s), "median_data_s": _median(data_s),
            "peak_rss_mb": _peak_rss_mb()}


def _worker_main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    result = run_training_worker(spec) if spec["kind"] == "train" else run_case_worker(spec)
    Path(spec["result"]).write_text(json.dumps(result, indent=2), encoding="utf-8")
    return 0


def _spawn(spec: dict, work: Path, tag: str) -> dict:
    spec_path = work / f"spec_{tag}.json"
    spec["result"] = str(work / f"result_{tag}.json")
    spec_path.write_text(json.dumps(spec), encoding="utf-8")
    cmd = [sys.executable, "-m", "MultiTaskSegTraining.cli", "bench", "--worker", str(spec_path)]
    env = dict(os.environ)
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join([str(root / "MultiTaskSeg"), str(root), env.get("PYTHONPATH", "")])
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
        return {"name": spec.get("name", tag), "error": "\n".join(tail)}
    return json.loads(Path(spec["result"]).read_text(encoding="utf-8"))


# --- summary and report ---------------------------------------------------------------------
def summarise(case: dict) -> dict:
    if "error" in case:
        return dict(case)  # a copy: the caller attaches the raw case to the summary
    runs = case["e2e_runs"]
    med = {k: _median([r[k] for r in runs]) for k in runs[0]}
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
                  "sw_ours_s": _median(case["sw_ours_s"]), "sw_monai_s": _median(case["sw_monai_s"]),
                  "agreement": case["agreement"]})
        s["ratio_ours_over_monai"] = s["sw_ours_s"] / s["sw_monai_s"]
        s["speedup_vs_monai"] = s["sw_monai_s"] / s["sw_ours_s"]
        s["n_reused"] = case.get("n_reused", 0)
        if "sw_monai_our_kernels_s" in case:
            s["sw_monai_our_kernels_s"] = _median(case["sw_monai_our_kernels_s"])
            s["engine_speedup"] = s["sw_monai_our_kernels_s"] / s["sw_ours_s"]
            s["kernel_speedup"] = s["sw_monai_s"] / s["sw_monai_our_kernels_s"]
            s["agreement_monai_kernels"] = case["agreement_monai_kernels"]
        if "sw_cpu_s" in case:
            s["cpu_s"] = {k: _median(v) for k, v in case["sw_cpu_s"].items()}
            s["cpu_speedup_vs_monai"] = s["cpu_s"]["monai"] / s["cpu_s"]["ours"]
            if "ours_bf16" in s["cpu_s"]:
                s["cpu_speedup_bf16_vs_monai"] = s["cpu_s"]["monai"] / s["cpu_s"]["ours_bf16"]
    if "sw_ours_bf16_s" in case:
        s["sw_ours_bf16_s"] = _median(case["sw_ours_bf16_s"])
        s["speedup_bf16_vs_monai"] = s["sw_monai_s"] / s["sw_ours_bf16_s"]
        for k in ("agreement_bf16_vs_monai", "agreement_bf16_vs_ours", "bf16_ood"):
            s[k] = case[k]
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
             "Generated by `mtseg bench` (MultiTaskSegTraining/bench_cmd.py); raw numbers in "
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


def _speed_target(cases: list[dict], speedup: str, agreement: str, what: str) -> dict | None:
    """≥ 1.5× faster than MONAI with Dice ≥ 0.99, judged on the slowest case and the lowest mean Dice."""
    timed = [c for c in cases if speedup in c]
    if not timed:
        return None
    worst = min(timed, key=lambda c: c[speedup])
    dice = min(c[agreement]["dice_mean"] for c in timed)
    return {"met": worst[speedup] >= 1.5 and dice >= 0.99,
            "text": f"{what} with Dice ≥ 0.99: slowest case {worst['name']} {worst[speedup]:.2f}×, "
                    f"lowest mean Dice {dice:.4f}"}


def evaluate_targets(cases: list[dict]) -> list[dict]:
    out = [t for t in (
        _speed_target(cases, "speedup_vs_monai", "agreement", "inference ≥ 1.5× faster than MONAI at equal settings"),
        _speed_target(cases, "speedup_bf16_vs_monai", "agreement_bf16_vs_monai",
                      "(opt-in `--cpu-bf16`, not the default) ≥ 1.5× faster than MONAI fp32")) if t]
    ok = [c for c in cases if "uncertainty_ood_share" in c]
    if ok:
        worst = max(ok, key=lambda c: c["uncertainty_ood_share"])
        out.append({"met": worst["uncertainty_ood_share"] <= 0.10,
                    "text": f"uncertainty + OOD ≤ 10 % of end-to-end: worst {worst['name']} "
                            f"{100 * worst['uncertainty_ood_share']:.1f} %"})
    ct = [c for c in ok if c["name"] == "ct"]
    if ct:
        out.append({"met": ct[0]["peak_rss_mb"] <= 4096,
                    "text": f"peak RSS ≤ 4 GB for the 512×512×300 CT: {ct[0]['peak_rss_mb']:.0f} MB"})
    return out


def _train_log_summary() -> dict | None:
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
            "patches_per_s": _median(rates[-20:]), "data_percent": _median(data[-20:])}


def run(args: argparse.Namespace) -> int:
    if args.worker:
        return _worker_main(args.worker)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)  # before the long run, not after it
    if args.from_json:
        report = json.loads(Path(args.from_json).read_text(encoding="utf-8"))
        Path(args.output).write_text(render_markdown(report), encoding="utf-8")
        print(f"bench: rendered {args.output} from {args.from_json}", file=sys.stderr)
        return 0
    try:
        import psutil  # noqa: F401
        if not args.no_monai:
            import monai  # noqa: F401
    except ImportError as exc:
        raise MultiTaskSegError(f"'mtseg bench' needs {exc.name}: pip install 'multitaskseg[bench]'") from None
    t_start = time.perf_counter()
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="mtseg_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    if args.checkpoint:
        import torch
        step = torch.load(args.checkpoint, map_location="cpu", weights_only=True).get("step", "?")
        bundle_path = default_architecture_bundle(work / "checkpoint_default_arch", args.checkpoint)
        note = (f"default-architecture network with the weights of `{args.checkpoint}` (training step {step}, "
                "partially trained; the default model did not exist yet; OOD signatures and threshold are placeholders)")
    elif args.bundle:
        bundle_path, note = Path(args.bundle), f"`{args.bundle}`"
    elif (DEFAULT_BUNDLE / "bundle.json").is_file():
        bundle_path, note = DEFAULT_BUNDLE, "the shipped default model (MultiTaskSeg/Resources/Models/default)"
    else:
        bundle_path = work / "untrained_default_arch"
        if not (bundle_path / "bundle.json").is_file():
            default_architecture_bundle(bundle_path)
        note = ("untrained network of the default architecture (the default model did not exist yet); "
                "timings are valid, agreement figures are for untrained weights")
    from MultiTaskSegLib.bundle import load_bundle
    b = load_bundle(bundle_path)
    note += (f" — widths {list(b.network_config.widths)}, {b.network_config.out_channels} outputs, window "
             f"{list(b.window.patch_size)}, overlap {b.window.overlap}, {b.window.batch_size} windows per batch, "
             f"spacing {list(b.preprocessing.target_spacing)} mm, OOD taps {b.detector().layers}")
    machine = machine_info()
    specs = []
    sizes = [] if args.sizes.strip().lower() == "none" else [parse_size(t) for t in args.sizes.split(",") if t.strip()]
    for s in sizes:
        print(f"bench: writing the {s['description']} …", file=sys.stderr)
        s["path"] = str(write_phantom(s, work))
        s["repeats"] = args.ct_repeats if s["name"] == "ct" else \
            args.large_repeats if np.prod(s["size"]) >= 8e6 else args.repeats
        s["weightmap_check"] = not specs  # the first (smallest) synthetic case
        specs.append(s)
    skipped = []
    reals = real_cases(Path(args.data), args.real_cases)
    if args.real_cases > 0 and not reals:
        skipped.append(f"real cases: {args.data} not found")
    for s in reals:
        s["repeats"] = args.real_repeats
        specs.append(s)
    cases = []
    for i, s in enumerate(specs):
        print(f"bench: [{i + 1}/{len(specs)}] {s['description']} ({s['repeats']} repeats) …", file=sys.stderr)
        spec = {**s, "kind": "case", "bundle": str(bundle_path), "device": args.device, "threads": args.threads,
                "monai": not args.no_monai, "bf16": not args.no_bf16, "out_dir": str(work / f"out_{i}")}
        raw = _spawn(spec, work, f"case{i}")
        summary = summarise(raw)
        summary["raw"] = raw
        cases.append(summary)
        if "error" in summary:
            print(f"bench: {s['name']} failed:\n{summary['error']}", file=sys.stderr)
        else:
            print(f"bench:   end-to-end {summary['total_s']:.1f} s; sliding window ours "
                  f"{summary.get('sw_ours_s', float('nan')):.1f} s vs MONAI {summary.get('sw_monai_s', float('nan')):.1f} s; "
                  f"peak RSS {summary['peak_rss_mb']:.0f} MB", file=sys.stderr)
    training = None
    if args.train_steps > 0:
        print("bench: training throughput …", file=sys.stderr)
        training = _spawn({"kind": "train", "bundle": str(bundle_path), "steps": args.train_steps,
                           "threads": args.threads}, work, "train")
    output = Path(args.output)
    report = {"machine": machine, "bundle_note": note, "cases": cases, "training": training, "skipped": skipped,
              "train_log": _train_log_summary(),
              "command": "mtseg bench " + " ".join(shlex.quote(a) for a in sys.argv[2:]) if len(sys.argv) > 1
              and sys.argv[1] == "bench" else "mtseg bench " + " ".join(shlex.quote(a) for a in _argv_of(args)),
              "notes": list(args.note), "targets": evaluate_targets(cases), "json": str(output.with_suffix(".json")),
              "wall_s": time.perf_counter() - t_start}
    try:
        report["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    output.write_text(render_markdown(report), encoding="utf-8")
    output.with_suffix(".json").write_text(json.dumps(report, indent=2, default=str), encoding="utf-8")
    print(f"bench: wrote {output} and {output.with_suffix('.json')} in {report['wall_s'] / 60:.1f} min", file=sys.stderr)
    return 0


def _argv_of(args: argparse.Namespace) -> list[str]:
    """Reconstruct the options when called programmatically (tests)."""
    out = []
    for k, v in vars(args).items():
        if k in ("run", "command", "worker") or v in (None, False, []):
            continue
        flag = "--" + k.replace("_", "-")
        out += [flag] if v is True else [flag, str(v)]
    return out
