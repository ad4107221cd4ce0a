#!/usr/bin/env python
"""A/B of the inference convolutions' path: oneDNN called directly (``fast_inference.conv``) against the
standard layer's dispatch (aten sends most batch-1 3D convolutions to its slow im2col kernel).

    python -m benchmarks.conv_path_ab IMAGE [--rounds 4] [--threads 2]

One process, the shipped default model, the image's real sliding-window pass (`Predictor.network_pass`,
OOD taps included), timed by the bench's own ``_interleaved`` (one untimed call each, then the two
paths alternating who goes first); wall seconds per pass and the median ratio.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from MultiTaskSegLib import DEFAULT_BUNDLE
from MultiTaskSegLib import fast_inference as fast
from MultiTaskSegLib.bundle import load_bundle
from MultiTaskSegLib.predictor import PredictOptions, Predictor
from MultiTaskSegLib.preprocessing import preprocess
from MultiTaskSegLib.process_memory import allow_malloc_tuning, reuse_freed_memory
from MultiTaskSegLib.volume_io import read_volume

from .workers import _interleaved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("image")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    allow_malloc_tuning()  # as `mtseg predict` runs
    torch.set_num_threads(args.threads)
    predictor = Predictor(load_bundle(DEFAULT_BUNDLE), "cpu")
    pre = preprocess(read_volume(args.image), predictor.preprocessing, None)
    window = predictor.window_config(PredictOptions(device="cpu"))
    onednn = fast._onednn_available

    def network_pass(available) -> int:
        fast._onednn_available = available
        with reuse_freed_memory():
            return predictor.network_pass(pre.array, window).n_windows

    try:
        seconds, _, n_windows = _interleaved(
            [
                ("oneDNN direct", lambda: network_pass(onednn)),
                ("standard dispatch", lambda: network_pass(lambda: False)),
            ],
            args.rounds,
        )
    finally:
        fast._onednn_available = onednn
    print(f"{args.image}: canonical {pre.array.shape}, {n_windows['oneDNN direct']} windows, {args.threads} threads")
    for name, values in seconds.items():
        print(f"  {name:18s} median {statistics.median(values):.3f} s  ({', '.join(f'{v:.2f}' for v in values)})")
    ratio = statistics.median(seconds["standard dispatch"]) / statistics.median(seconds["oneDNN direct"])
    print(f"  standard / direct: {ratio:.2f}×")


if __name__ == "__main__":
    main()
