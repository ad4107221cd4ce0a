"""Worker processes: one benchmark case, or the training throughput, in a fresh process each."""

from __future__ import annotations

import gc
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np

from .summary import median


def _peak_rss_mb() -> float:
    """Peak resident set size of this process (ru_maxrss is KiB on Linux, bytes on macOS)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1024 * 1024) if sys.platform == "darwin" else r / 1024


def _time_predict(spec: dict, predictor, paths: dict[str, Path]) -> tuple[list[dict], object, str]:
    """End-to-end ``predict`` as `mtseg predict` runs it (read, predict, write), ``repeats`` times:
    the same calls, the heap kept over all three (``reuse_freed_memory``), the two files written at once."""
    from MultiTaskSegLib.outputs import save_prediction
    from MultiTaskSegLib.predictor import PredictOptions
    from MultiTaskSegLib.process_memory import reuse_freed_memory
    from MultiTaskSegLib.volume_io import read_volume

    runs, image, modality = [], None, ""
    for _ in range(spec["repeats"]):
        image = None
        gc.collect()
        t0, c0 = time.perf_counter(), time.process_time()
        with reuse_freed_memory():
            image = read_volume(spec["path"])
            t_load = time.perf_counter() - t0
            prediction = predictor.predict(image, PredictOptions(device=spec["device"]))
            t = time.perf_counter()
            save_prediction(prediction, paths)
            t_write = time.perf_counter() - t
        total = time.perf_counter() - t0
        runs.append(
            {
                "load": t_load,
                **{k: float(v) for k, v in prediction.timings_s.items() if k != "total"},
                "write": t_write,
                "total": total,
                "cpu_total": time.process_time() - c0,
            }
        )
        modality = prediction.modality
        del prediction
    return runs, image, modality


def _interleaved(variants: list[tuple], repeats: int) -> tuple[dict, dict, dict]:
    """Wall and CPU seconds of each variant, alternating who goes first so all see the same load.

    Each variant runs once untimed first: the first call of PyTorch's standard layers in a process
    creates their oneDNN primitives (MONAI's sliding window: ~2.5 s more on its first call, which
    had doubled its median of two repeats on a one-window volume)."""
    for _, fn in variants:
        fn()
    times: dict[str, list[float]] = {name: [] for name, _ in variants}
    cpu: dict[str, list[float]] = {name: [] for name, _ in variants}
    values: dict = {}
    for r in range(repeats):
        for name, fn in variants if r % 2 == 0 else variants[::-1]:
            values.pop(name, None)
            gc.collect()
            t, c = time.perf_counter(), time.process_time()
            values[name] = fn()
            times[name].append(time.perf_counter() - t)
            cpu[name].append(time.process_time() - c)
    return times, cpu, values


def _compare_sliding_windows(spec: dict, predictor, bundle, pre, result: dict) -> None:
    """Our sliding window against MONAI's on the same preprocessed array (see the package doc)."""
    from MultiTaskSegLib.inference import WindowConfig, sliding_window

    from .peers import agreement, monai_sliding_window

    device, window = predictor.device, predictor.window
    model, taps = predictor.model, predictor.detector.layers
    plain_model = bundle.load_model(device)  # unprepared: PyTorch's standard layers, contiguous weights
    bf16_window = WindowConfig(window.patch_size, window.overlap, window.batch_size, cpu_bf16=True)
    variants = [
        ("ours", lambda: sliding_window(model, pre.array, window, device, taps)),
        ("monai", lambda: monai_sliding_window(plain_model, pre.array, window, device)),
    ]
    if device.type == "cpu":  # MONAI's sliding window over our CPU inference kernels
        variants.append(("monai_our_kernels", lambda: monai_sliding_window(model, pre.array, window, device)))
    if spec.get("bf16", True) and device.type == "cpu":
        variants.append(("ours_bf16", lambda: sliding_window(model, pre.array, bf16_window, device, taps)))
    times, cpu, values = _interleaved(variants, spec["repeats"])
    mine, other = values["ours"], values["monai"]
    temperature = bundle.temperature
    result["n_windows"] = mine.n_windows
    result["n_reused"] = mine.n_reused
    if "monai_our_kernels" in times:
        result["sw_monai_our_kernels_s"] = times["monai_our_kernels"]
        result["agreement_monai_kernels"] = agreement(mine.logits, values["monai_our_kernels"], temperature)
    result["sw_ours_s"] = times["ours"]
    result["sw_monai_s"] = times["monai"]
    result["sw_cpu_s"] = cpu  # process CPU time per variant: less sensitive to other processes' load
    result["agreement"] = agreement(mine.logits, other, temperature)
    if spec.get("weightmap_check"):
        # MONAI's own Gaussian (mode="gaussian") is floored at 1e-3 and not rescaled to max 1:
        # how far its output moves from ours shows what "the same blending" means
        y = monai_sliding_window(plain_model, pre.array, window, device, mode="gaussian", sigma_scale=0.125)
        result["weightmap_check"] = agreement(mine.logits, y, temperature)
    if "ours_bf16" in values:
        half = values["ours_bf16"]
        detector = predictor.detector
        sig32, sig16 = detector.signature(mine.gram), detector.signature(half.gram)
        head = predictor.head_context(mine.context_logits)  # the same context for both: only the Gram differs
        score32, score16 = detector.score(sig32, *head), detector.score(sig16, *head)
        result["sw_ours_bf16_s"] = times["ours_bf16"]
        result["agreement_bf16_vs_monai"] = agreement(half.logits, other, temperature)
        result["agreement_bf16_vs_ours"] = agreement(half.logits, mine.logits, temperature)
        result["bf16_ood"] = {
            "gram_max_rel_diff": max(
                float(np.abs(half.gram[k] - mine.gram[k]).max() / np.abs(mine.gram[k]).max()) for k in mine.gram
            ),
            "signature_distance": float(np.linalg.norm(sig16 - sig32)),
            "score_fp32": score32.score,
            "score_bf16": score16.score,
            "threshold": score32.threshold,
            "same_decision": score32.is_ood == score16.is_ood,
        }


def run_case_worker(spec: dict) -> dict:
    import torch

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    from MultiTaskSegLib.bundle import load_bundle
    from MultiTaskSegLib.outputs import output_paths
    from MultiTaskSegLib.predictor import Predictor
    from MultiTaskSegLib.preprocessing import preprocess

    result: dict = {"name": spec["name"], "description": spec["description"], "threads": torch.get_num_threads()}
    bundle = load_bundle(spec["bundle"])
    predictor = Predictor(bundle, spec["device"])
    device = predictor.device
    out = Path(spec["out_dir"])
    out.mkdir(parents=True, exist_ok=True)
    paths = output_paths(out, "case")
    runs, image, result["modality"] = _time_predict(spec, predictor, paths)
    report = json.loads(paths["report"].read_text(encoding="utf-8"))
    if bundle.meta.get("inference", {}).get("restrict_to_context"):  # the peer is compared on the same labels
        result["context_labels"] = [
            int(v) for v in bundle.contexts[bundle.context_names.index(report["context"])]["labels"]
        ]
    result["seg_path"] = str(paths["seg"])
    result["input_size"] = list(image.GetSize())
    result["input_spacing"] = [round(s, 3) for s in image.GetSpacing()]
    result["e2e_runs"] = runs
    result["peak_rss_mb"] = _peak_rss_mb()
    if device.type == "cuda":
        result["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
        result["cuda_device"] = torch.cuda.get_device_name(device)
    if spec.get("monai", True):
        pre = preprocess(image, bundle.preprocessing)
        del image
        gc.collect()
        result["canonical_shape_zyx"] = list(pre.array.shape)
        _compare_sliding_windows(spec, predictor, bundle, pre, result)
    return result


def run_training_worker(spec: dict) -> dict:
    """Patches/s of training steps and the share of step time spent on sampling + augmentation."""
    import torch

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    from MultiTaskSegLib.bundle import load_bundle
    from MultiTaskSegLib.network import ResidualUNet3D
    from MultiTaskSegTraining.config import TrainConfig
    from MultiTaskSegTraining.sampling import PatchSampler, augment
    from MultiTaskSegTraining.train import compiled, training_step

    from .phantoms import training_cases

    bundle = load_bundle(spec["bundle"])
    config = bundle.network_config
    patch = tuple(bundle.window.patch_size)
    batch = bundle.window.batch_size
    cases = training_cases(bundle.preprocessing)
    # the shipped training recipe's CPU settings (configs/default_joint.yaml)
    recipe = TrainConfig.from_file(Path(__file__).resolve().parents[1] / "configs" / "default_joint.yaml")
    channels_last, compile_ = recipe.channels_last, recipe.compile
    annotated = [list(range(1, config.out_channels))] * 2  # per phantom dataset: every output

    def timed(memory_format: torch.memory_format, compile_net: bool) -> dict:
        """The loop as `mtseg train` runs it on CPU (fp32), in this memory format, eager or compiled."""
        torch.manual_seed(0)
        sampler = PatchSampler(cases, 2, patch, seed=0)
        rng = np.random.default_rng(0)
        model = ResidualUNet3D(config).train().to(memory_format=memory_format)
        net = compiled(model) if compile_net else model
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        scaler = torch.amp.GradScaler("cuda", enabled=False)
        data_s, step_s = [], []
        for k in range(spec["steps"] + 1):  # the first step warms up (and compiles) and is not counted
            t0 = time.perf_counter()
            x, y, ds = sampler.batch(batch)
            x, y = augment(x, y, rng)
            x = x.to(memory_format=memory_format)
            t1 = time.perf_counter()
            # the real training step (loss, context head, clipping, AdamW)
            training_step(
                net,
                opt,
                scaler,
                x,
                y.clamp_max(config.out_channels - 1),
                ds,
                annotated,
                TrainConfig().context_loss_weight,
                ("cpu", torch.bfloat16, False),
            )
            t2 = time.perf_counter()
            if k:
                data_s.append(t1 - t0)
                step_s.append(t2 - t0)
        total = sum(step_s)
        return {
            "patches_per_s": batch * len(step_s) / total if total else float("nan"),
            "data_fraction": sum(data_s) / total if total else float("nan"),
            "median_step_s": median(step_s),
            "median_data_s": median(data_s),
        }

    plain = timed(torch.contiguous_format, False)
    shipped = timed(torch.channels_last_3d if channels_last else torch.contiguous_format, compile_)
    return {
        "patch": list(patch),
        "batch": batch,
        "steps": spec["steps"],
        "threads": torch.get_num_threads(),
        **plain,  # the plain loop: the "today" (contiguous fp32, eager)
        "recipe": {"channels_last": channels_last, "compile": compile_, **shipped},
        "recipe_speedup": shipped["patches_per_s"] / plain["patches_per_s"],
        "peak_rss_mb": _peak_rss_mb(),
    }


def worker_main(spec_path: str) -> int:
    """Run the case or training spec in the JSON file; the result goes where the spec says."""
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    if spec["kind"] == "train":
        result = run_training_worker(spec)
    elif spec["kind"] == "monai_pipeline":
        from .peers import monai_pipeline, segmentation_agreement

        if spec.get("threads"):
            import torch

            torch.set_num_threads(int(spec["threads"]))
        result = monai_pipeline(spec)
        result["peak_rss_mb"] = _peak_rss_mb()
        result["agreement"] = segmentation_agreement(spec["ours_seg"], result["seg_path"], spec.get("keep"))
    else:
        from MultiTaskSegLib.process_memory import allow_malloc_tuning

        allow_malloc_tuning()  # as `mtseg predict` runs (its process is its own)
        result = run_case_worker(spec)
    Path(spec["result"]).write_text(json.dumps(result, indent=2), encoding="utf-8")
    return 0
