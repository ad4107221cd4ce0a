#!/usr/bin/env python
"""A/B of how training uses the cores: one process with N threads, or N data-parallel processes
(`torchrun --nproc_per_node=N … train`, gloo on CPU) with one thread each.

    PYTHONUTF8=1 python benchmarks/train_parallel_ab.py [--procs 2] [--steps 6] [--compile]

Wall-clock patches/s of `mtseg train`'s own step (`train.training_step`, channels-last fp32, batch of
64³ patches sampled and augmented from two phantom cases as the bench's training row does), for:
one process × N threads with batch 2; N processes × 1 thread with batch 2/N each (the same global
batch and the same gradient: instance norm has no batch statistics, and DDP averages the replicas'
mean losses); N processes × 1 thread with batch 2 each (global batch 2N, a different recipe).
The contiguous eager loop (the bench's "plain", issue 11's starting point) is timed first as the unit.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from MultiTaskSegLib import DEFAULT_BUNDLE

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # benchmarks.phantoms (the package itself is installed)


def _timed(rank: int, world: int, batch: int, steps: int, compile_: bool, plain: bool, port: int, out: str) -> None:
    """One replica: `steps` timed training steps after one warm-up (compilation) step; rank 0 writes the rate."""
    from benchmarks.phantoms import training_cases
    from MultiTaskSegLib.bundle import load_bundle
    from MultiTaskSegLib.network import ResidualUNet3D
    from MultiTaskSegTraining.config import TrainConfig
    from MultiTaskSegTraining.sampling import PatchSampler, augment
    from MultiTaskSegTraining.train import compiled, set_memory_format, training_step

    if world > 1:
        torch.set_num_threads(1)
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    bundle = load_bundle(DEFAULT_BUNDLE)
    config = bundle.network_config
    sampler = PatchSampler(training_cases(bundle.preprocessing), 2, tuple(bundle.window.patch_size), seed=rank)
    rng = np.random.default_rng(rank)
    fmt = torch.contiguous_format if plain else torch.channels_last_3d
    torch.manual_seed(0)
    model = ResidualUNet3D(config).train()
    set_memory_format(model, fmt)  # as `mtseg train` does, before DDP
    net: torch.nn.Module = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    net = compiled(net) if compile_ else net
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    annotated = [list(range(1, config.out_channels))] * 2
    step_s = []
    for k in range(steps + 1):
        if world > 1:
            dist.barrier()  # every replica starts the step together: the rate is the slowest one's
        t0 = time.perf_counter()
        x, y, ds = sampler.batch(batch)
        x, y = augment(x, y, rng)
        x = x.to(memory_format=fmt)
        y = y.clamp_max(config.out_channels - 1)
        step_args = (
            opt,
            scaler,
            x,
            y,
            ds,
            annotated,
            TrainConfig().context_loss_weight,
            ("cpu", torch.bfloat16, False),
        )
        training_step(net, *step_args)
        if k:
            step_s.append(time.perf_counter() - t0)
    if rank == 0:
        rate = world * batch * len(step_s) / sum(step_s)
        Path(out).write_text(json.dumps({"patches_per_s": rate, "median_step_s": float(np.median(step_s))}))
    if world > 1:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(world: int, batch: int, steps: int, compile_: bool, plain: bool = False) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "rate.json")
        args = (world, batch, steps, compile_, plain, _free_port(), out)
        if world == 1:
            _timed(0, *args)
        else:
            torch.multiprocessing.spawn(_timed, args=args, nprocs=world)
        return json.loads(Path(out).read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--procs", type=int, default=2, help="cores to use: threads of one process or processes")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--compile", action="store_true", help="torch.compile every variant (~1 min each to compile)")
    args = ap.parse_args()
    n = args.procs
    torch.set_num_threads(n)
    rows = [("plain: 1 process, contiguous, eager", run(1, 2, args.steps, False, plain=True))]
    tag = "compiled" if args.compile else "eager"
    rows.append((f"1 process × {n} threads, batch 2, {tag}", run(1, 2, args.steps, args.compile)))
    if 2 % n == 0:
        rows.append((f"{n} processes × 1 thread, batch {2 // n} each, {tag}", run(n, 2 // n, args.steps, args.compile)))
    rows.append(
        (f"{n} processes × 1 thread, batch 2 each (global {2 * n}), {tag}", run(n, 2, args.steps, args.compile))
    )
    base = rows[0][1]["patches_per_s"]
    print(f"torch {torch.__version__}, {n} cores, 64³ patches, {args.steps} timed steps, wall-clock patches/s")
    for name, r in rows:
        print(f"  {name:58s} {r['patches_per_s']:.2f}  ({r['patches_per_s'] / base:.2f}× plain)")


if __name__ == "__main__":
    main()
