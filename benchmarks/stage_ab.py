"""Stages of ``predict`` around the network: a git revision's MultiTaskSegLib vs the working tree, one process.

    python -m benchmarks.stage_ab IMAGE [--rev main] [--stages load,preprocess,...] [--threads 1,2] [--repeats 6]

The network runs once (working tree); each stage then runs on the same inputs with both versions,
alternating who goes first, and prints the median and best process CPU time and wall per version
(CPU time is the least sensitive to other jobs on the machine) and whether the outputs agree, with
the process memory tuning of ``mtseg predict`` on (process_memory.py).
Stages: load (read_volume), preprocess, entropy (context merge + normalised entropy), resample
(probabilities and uncertainty to the input grid), postprocess (largest components), label_sums
(the report's volumes and mean uncertainty per label), write_uncertainty (write_fraction_map).
"""

from __future__ import annotations

import argparse
import gc
import importlib
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("load", "preprocess", "entropy", "resample", "postprocess", "label_sums", "write_uncertainty")


def _library(rev: str, folder: Path) -> dict:
    """The revision's MultiTaskSegLib, imported under another package name beside the working tree's."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", rev, "MultiTaskSeg/MultiTaskSegLib"], check=True, capture_output=True
    ).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")
    (folder / "MultiTaskSeg" / "MultiTaskSegLib").rename(folder / "rev_lib")
    sys.path.insert(0, str(folder))
    names = ("predictor", "preprocessing", "postprocessing", "uncertainty", "volume_io")
    return {n: importlib.import_module(f"rev_lib.{n}") for n in names}


def _stage(name: str, lib: dict, ctx: dict):
    p, v = lib["predictor"], lib["volume_io"]
    if name == "load":
        return lambda: v.read_volume(ctx["path"])
    if name == "preprocess":
        return lambda: lib["preprocessing"].preprocess(ctx["image"], ctx["config"]).array
    if name == "entropy":
        u = lib["uncertainty"]
        return lambda: u.normalised_entropy(u.merge_other_contexts(ctx["probs"], ctx["allowed"] or [])).numpy()
    if name == "resample":
        args = (ctx["probs"], ctx["entropy"], ctx["grid"], ctx["image"], {}, ctx["allowed"])
        return lambda: p.Predictor.to_input_grid(*args)
    if name == "postprocess":
        return lambda: lib["postprocessing"].keep_largest_component(ctx["labels"].copy(), ctx["largest"])
    if name == "label_sums":
        if hasattr(p, "label_sums"):
            return lambda: p.label_sums(ctx["labels"], ctx["uncertainty"], ctx["classes"])[0]
        return lambda: _masked_label_stats(ctx["labels"], ctx["uncertainty"], ctx["classes"])
    if name == "write_uncertainty":
        path = ctx["tmp"] / f"unc_{id(lib)}.nii.gz"
        return lambda: v.write_fraction_map(ctx["unc_image"], path) or path  # read back for the agreement, untimed
    raise SystemExit(f"unknown stage {name!r}; choose from {', '.join(STAGES)}")


def _masked_label_stats(labels: np.ndarray, values: np.ndarray, n: int) -> np.ndarray:
    """What predict() did before label_sums: one bincount, one mask per present label for its mean."""
    counts = np.bincount(labels.ravel(), minlength=n)
    for k in range(n):
        if counts[k]:
            float(values[labels == k].mean())
    return counts


def _agreement(a, b) -> str:
    a, b = (a if isinstance(a, tuple) else (a,)), (b if isinstance(b, tuple) else (b,))
    out = []
    for x, y in zip(a, b):
        x, y = (sitk.ReadImage(str(z)) if isinstance(z, Path) else z for z in (x, y))
        x = sitk.GetArrayFromImage(x) if isinstance(x, sitk.Image) else np.asarray(x)
        y = sitk.GetArrayFromImage(y) if isinstance(y, sitk.Image) else np.asarray(y)
        if x.dtype.kind in "ui":
            out.append(f"{int(np.count_nonzero(x != y))} values differ")
        else:
            out.append(f"max |Δ| {float(np.abs(x.astype(np.float64) - y).max()):.2g}")
    return ", ".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("image")
    ap.add_argument("--rev", default="main", help="the git revision to compare against (default main)")
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--threads", default="1,2", help="torch intra-op thread counts, comma-separated")
    ap.add_argument("--repeats", type=int, default=6)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "MultiTaskSeg"))
    from MultiTaskSegLib import DEFAULT_BUNDLE, postprocessing, predictor, uncertainty, volume_io
    from MultiTaskSegLib.bundle import load_bundle
    from MultiTaskSegLib.preprocessing import preprocess
    from MultiTaskSegLib.process_memory import allow_malloc_tuning, reuse_freed_memory

    allow_malloc_tuning(True)  # as `mtseg predict`: without it page faults on fresh memory dominate

    with tempfile.TemporaryDirectory() as tmp:
        libs = {
            "rev": _library(args.rev, Path(tmp)),
            "tree": {
                "predictor": predictor,
                "preprocessing": importlib.import_module("MultiTaskSegLib.preprocessing"),
                "postprocessing": postprocessing,
                "uncertainty": uncertainty,
                "volume_io": volume_io,
            },
        }
        pred = predictor.Predictor(load_bundle(DEFAULT_BUNDLE), "cpu")
        image = volume_io.read_volume(args.image)
        pre = preprocess(image, pred.preprocessing)
        result = pred.network_pass(pre.array, pred.window_config(predictor.PredictOptions()))
        probs = pred.probabilities(result.logits)
        ood = pred.detector.score(pred.detector.signature(result.gram))
        allowed = pred.context_labels[pred.recognise_context(result.context_logits, ood)]
        if not pred.inference.restrict_to_context:
            allowed = None
        entropy = uncertainty.normalised_entropy(uncertainty.merge_other_contexts(probs, allowed) if allowed else probs)
        labels, unc = pred.to_input_grid(probs, entropy, pre.grid, image, None, allowed)
        post = pred.bundle.schema.postprocessing
        ctx = {
            "path": args.image,
            "image": image,
            "config": pred.preprocessing,
            "probs": probs,
            "allowed": allowed,
            "entropy": entropy,
            "grid": pre.grid,
            "labels": labels,
            "uncertainty": unc,
            "tmp": Path(tmp),
            "largest": post.largest_component if post else [],
            "classes": max(pred.bundle.label_names) + 1,
            "unc_image": volume_io.array_to_image(unc, image),
        }
        load = open("/proc/loadavg").read().split()[:3] if Path("/proc/loadavg").exists() else "?"
        print(f"{args.image}: {image.GetSize()}, revision {args.rev} vs working tree, load average {load}")
        for threads in (int(t) for t in args.threads.split(",")):
            torch.set_num_threads(threads)
            for name in args.stages.split(","):
                runs: dict[str, list[tuple[float, float]]] = {"rev": [], "tree": []}
                outputs = {}
                for r in range(args.repeats):
                    for which in ("rev", "tree") if r % 2 == 0 else ("tree", "rev"):
                        fn = _stage(name, libs[which], ctx)
                        gc.collect()
                        with reuse_freed_memory():
                            c, w = time.process_time(), time.perf_counter()
                            outputs[which] = fn()
                            runs[which].append((time.process_time() - c, time.perf_counter() - w))
                cells = []
                for which in ("rev", "tree"):
                    cpu, wall = [x[0] for x in runs[which]], [x[1] for x in runs[which]]
                    cells.append(
                        f"CPU {statistics.median(cpu):.2f} (best {min(cpu):.2f}) wall {statistics.median(wall):.2f}"
                    )
                ratio = statistics.median(x[0] for x in runs["rev"]) / statistics.median(x[0] for x in runs["tree"])
                print(
                    f"{threads} thread(s) {name:17s} {args.rev}: {cells[0]} | tree: {cells[1]} | "
                    f"CPU ratio {ratio:.2f}x | {_agreement(outputs['rev'], outputs['tree'])}",
                    flush=True,
                )
        print(
            f"load average at the end {open('/proc/loadavg').read().split()[:3] if Path('/proc/loadavg').exists() else '?'}"
        )


if __name__ == "__main__":
    main()
