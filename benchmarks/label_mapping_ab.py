"""Labels on the input grid, cell by cell vs the dense separable pass, on the same probabilities, one process.

    python -m benchmarks.label_mapping_ab IMAGE [--bundle B] [--threads N] [--rounds R]

Runs the predictor up to the probabilities once, then times ``labels_on_target`` with each pass
forced (process CPU time and wall, alternating, best of R) and counts the voxels where they differ.
The dense pass is the previous torch implementation, so this is the old/new comparison of issue 14.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from MultiTaskSegLib import DEFAULT_BUNDLE, grid_mapping
from MultiTaskSegLib.bundle import load_bundle
from MultiTaskSegLib.predictor import PredictOptions, Predictor
from MultiTaskSegLib.preprocessing import preprocess
from MultiTaskSegLib.volume_io import read_volume


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("image")
    p.add_argument("--bundle", default=str(DEFAULT_BUNDLE))
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    predictor = Predictor(load_bundle(args.bundle), "cpu")
    image = read_volume(args.image)
    pre = preprocess(image, predictor.preprocessing)
    result = predictor.network_pass(pre.array, predictor.window_config(PredictOptions()))
    probs = predictor.probabilities(result.logits)
    _, ood = predictor.score_ood(result.gram, result.context_logits)
    allowed = predictor.context_labels[predictor.recognise_context(result.context_logits, ood)]
    times: dict[str, list[tuple[float, float]]] = {"cells": [], "dense": []}
    labels = {}
    for _ in range(args.rounds):
        for name, share in (("cells", 2.0), ("dense", -1.0)):
            grid_mapping._DENSE = share  # force the pass
            c, w = time.process_time(), time.perf_counter()
            labels[name] = grid_mapping.labels_on_target(probs, pre.grid, image, allowed)
            times[name].append((time.process_time() - c, time.perf_counter() - w))
    for name, runs in times.items():
        cpu, wall = min(r[0] for r in runs), min(r[1] for r in runs)
        print(f"{name}: CPU {cpu:.2f} s, wall {wall:.2f} s (best of {args.rounds}, {torch.get_num_threads()} threads)")
    differ = int(np.count_nonzero(labels["cells"] != labels["dense"]))
    print(f"input {image.GetSize()}, canonical {pre.grid.GetSize()}, allowed {allowed}: {differ} voxels differ")


if __name__ == "__main__":
    main()
