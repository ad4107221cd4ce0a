#!/usr/bin/env python
"""A/B of the training step's CPU cost: fp32 vs bf16 autocast, contiguous vs channels-last 3D, eager vs
torch.compile (the training config's ``compile``).

    python benchmarks/train_step_ab.py [--threads 1] [--steps 4] [--repeats 2] [--no-compile]

Times process CPU time per step (not wall time), so the figures hold on a machine shared with other
jobs; the default architecture, batch 2 of 64³ patches, `mtseg train`'s own training step
(`train.training_step`). The modes alternate, so slow drifts hit all of them alike.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from MultiTaskSegLib.network import NetworkConfig, ResidualUNet3D
from MultiTaskSegTraining.train import compiled, training_step

MODES = {  # (bf16, channels-last, compile)
    "fp32": (False, False, False),
    "bf16": (True, False, False),
    "fp32 channels-last": (False, True, False),
    "bf16 channels-last": (True, True, False),
    "fp32 channels-last compiled": (False, True, True),
    "bf16 channels-last compiled": (True, True, True),
}


def cpu_seconds_per_step(bf16: bool, channels_last: bool, compile_: bool, steps: int) -> float:
    torch.manual_seed(0)
    config = NetworkConfig(1, 14, (8, 16, 32, 64, 128), 1, 0.1, 5)
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    model = ResidualUNet3D(config).train().to(memory_format=fmt)
    net = compiled(model) if compile_ else model
    x = torch.rand(2, 1, 64, 64, 64).to(memory_format=fmt)
    y = (x[:, 0] > 0.7).long() * 3
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    times = []
    for k in range(steps + 1):  # the first step warms up (and compiles)
        t0 = time.process_time()
        training_step(net, opt, scaler, x, y, [0, 1], [[1, 2, 3]] * 2, 0.2, ("cpu", torch.bfloat16, bf16))
        if k:
            times.append(time.process_time() - t0)
    return float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled mode (~1 min to compile)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    modes = {m: v for m, v in MODES.items() if not (args.no_compile and v[2])}
    results: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(args.repeats):
        for mode, (bf16, cl, comp) in modes.items():
            results[mode].append(cpu_seconds_per_step(bf16, cl, comp, args.steps))
    base = np.median(results["fp32"])
    print(f"torch {torch.__version__}, {args.threads} thread(s), batch 2 × 64³, CPU seconds per step (median)")
    for mode, values in results.items():
        print(f"  {mode:20s} {np.median(values):.3f} s  ({base / np.median(values):.2f}× fp32)")


if __name__ == "__main__":
    main()
