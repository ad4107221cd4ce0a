"""Labels on the input grid: a git revision's ``labels_on_target`` vs the working tree's, same probabilities, one process.

    python -m benchmarks.label_mapping_ab IMAGE [--rev main] [--bundle B] [--threads 1,2] [--rounds R]

Runs the predictor up to the probabilities once, then times ``labels_on_target`` of both versions
(process CPU time and wall, alternating who goes first, median and best of R), with the process
memory tuning of ``mtseg predict`` on, and counts the voxels where they differ; where some do, each
is checked against a float64 trilinear interpolation of every class (which version is right).
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.stage_ab import _library
from MultiTaskSegLib import DEFAULT_BUNDLE, grid_mapping
from MultiTaskSegLib.bundle import load_bundle
from MultiTaskSegLib.predictor import PredictOptions, Predictor
from MultiTaskSegLib.preprocessing import preprocess
from MultiTaskSegLib.process_memory import allow_malloc_tuning, reuse_freed_memory
from MultiTaskSegLib.resampling import index_affine
from MultiTaskSegLib.volume_io import read_volume


def _float64_label(probs: np.ndarray, matrix: np.ndarray, offset: np.ndarray, voxel, allowed) -> int:
    """ITK's linear rule at one target voxel (z, y, x), in float64, then the argmax and the restriction."""
    c = (matrix @ np.array(voxel[::-1], float) + offset)[::-1]  # source continuous index (z, y, x)
    sizes = probs.shape[1:]
    if not all(-0.5 <= ci < s - 0.5 for ci, s in zip(c, sizes)):
        return 0
    low = [int(np.clip(np.floor(ci), 0, s - 1)) for ci, s in zip(c, sizes)]
    w = [float(np.clip(ci - lo, 0.0, 1.0)) for ci, lo in zip(c, low)]
    value = np.zeros(probs.shape[0])
    for corner in np.ndindex(2, 2, 2):
        at = tuple(min(lo + d, s - 1) for lo, d, s in zip(low, corner, sizes))
        value += np.prod([wi if d else 1.0 - wi for wi, d in zip(w, corner)]) * probs[(slice(None), *at)]
    label = int(np.argmax(value))
    return label if allowed is None or label in allowed else 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("image")
    p.add_argument("--rev", default="main", help="the git revision to compare against (default main)")
    p.add_argument("--bundle", default=str(DEFAULT_BUNDLE))
    p.add_argument("--threads", default="1,2", help="torch intra-op thread counts, comma-separated")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    allow_malloc_tuning(True)
    predictor = Predictor(load_bundle(args.bundle), "cpu")
    image = read_volume(args.image)
    with reuse_freed_memory():
        pre = preprocess(image, predictor.preprocessing)
        result = predictor.network_pass(pre.array, predictor.window_config(PredictOptions()))
        probs = predictor.probabilities(result.logits)
    _, ood = predictor.score_ood(result.gram, result.context_logits)
    allowed = predictor.context_labels[predictor.recognise_context(result.context_logits, ood)]
    if not predictor.inference.restrict_to_context:
        allowed = None
    with tempfile.TemporaryDirectory() as tmp:
        _library(args.rev, Path(tmp))
        versions = {args.rev: importlib.import_module("rev_lib.grid_mapping"), "tree": grid_mapping}
        print(f"{args.image}: input {image.GetSize()}, canonical {pre.grid.GetSize()}, allowed {allowed}")
        for threads in (int(t) for t in args.threads.split(",")):
            torch.set_num_threads(threads)
            times: dict[str, list[tuple[float, float]]] = {name: [] for name in versions}
            labels = {}
            for r in range(args.rounds):
                for name in list(versions)[:: 1 if r % 2 == 0 else -1]:
                    with reuse_freed_memory():
                        c, w = time.process_time(), time.perf_counter()
                        labels[name] = versions[name].labels_on_target(probs, pre.grid, image, allowed)
                        times[name].append((time.process_time() - c, time.perf_counter() - w))
            cells = []
            for name, runs in times.items():
                cpu, wall = [t[0] for t in runs], [t[1] for t in runs]
                cells.append(
                    f"{name}: CPU {statistics.median(cpu):.2f} (best {min(cpu):.2f}) wall {statistics.median(wall):.2f}"
                )
            ratio = statistics.median(t[0] for t in times[args.rev]) / statistics.median(t[0] for t in times["tree"])
            differ = np.argwhere(labels[args.rev] != labels["tree"])
            print(f"{threads} thread(s) {' | '.join(cells)} | CPU ratio {ratio:.2f}x | {len(differ)} voxels differ")
    if len(differ):
        matrix, offset = index_affine(pre.grid, image)
        p64 = probs.double().numpy()
        right = {name: 0 for name in versions}
        for voxel in differ[:100]:
            truth = _float64_label(p64, matrix, offset, tuple(int(v) for v in voxel), allowed)
            for name in versions:
                right[name] += int(labels[name][tuple(voxel)] == truth)
        print(f"of {min(len(differ), 100)} differing voxels, float64 agrees with: {right}")


if __name__ == "__main__":
    main()
