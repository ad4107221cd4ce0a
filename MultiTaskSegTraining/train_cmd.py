"""`mtseg train`: joint / dedicated / fine-tune training from MSD-format datasets."""

from __future__ import annotations

import argparse
from pathlib import Path

from MultiTaskSegLib.errors import MultiTaskSegError

from .config import TrainConfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", nargs="*", help="MSD dataset folders (several = joint training, one = dedicated)")
    p.add_argument("--config", help="YAML or JSON file with training options (see configs/)")
    p.add_argument("--output", "-o", required=True, help="bundle directory to write")
    p.add_argument("--work-dir", help="checkpoints, log and split (default: <output>_work)")
    p.add_argument(
        "--mode",
        choices=["joint", "dedicated", "finetune"],
        help="checked against the data given: joint needs ≥2 datasets, dedicated 1, finetune --init-bundle",
    )
    p.add_argument("--init-bundle", help="fine-tune (transfer learning) from this bundle")
    p.add_argument("--finetune", choices=["all", "decoder"], help="what fine-tuning trains (default all)")
    p.add_argument("--steps", type=int)
    p.add_argument("--lr", type=float, help="peak learning rate (e.g. lower for a warm restart from --init-bundle)")
    p.add_argument("--max-minutes", type=float, help="wall-clock budget; the LR schedule anneals within it")
    p.add_argument("--label-mode", choices=["per_structure", "shared_foreground"])
    p.add_argument("--seed", type=int)
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--cache-dir", help="preprocessed-volume cache (default ~/.cache/multitaskseg/preprocessed)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in the work dir")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle at --output")
    p.add_argument("--save-replicas", action="store_true", help=argparse.SUPPRESS)  # DDP test hook


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    config = TrainConfig.from_file(args.config) if args.config else TrainConfig()
    if args.config:  # paths in a config file are relative to it
        base = Path(args.config).resolve().parent
        config = config.updated(
            {
                "data": [str((base / d).resolve()) for d in config.data],
                **{k: str((base / v).resolve()) for k in ("split_from", "init_bundle") if (v := getattr(config, k))},
            }
        )
    overrides = {
        "steps": args.steps,
        "lr": args.lr,
        "max_minutes": args.max_minutes,
        "label_mode": args.label_mode,
        "seed": args.seed,
        "threads": args.threads,
        "cache_dir": args.cache_dir,
        "init_bundle": args.init_bundle,
        "finetune": args.finetune,
    }
    if args.data:
        overrides["data"] = [str(Path(d).resolve()) for d in args.data]
    config = config.updated(overrides)
    n = len(config.data)
    if args.mode == "joint" and n < 2:
        raise MultiTaskSegError(f"--mode joint needs at least two datasets, got {n}")
    if args.mode == "dedicated" and n != 1:
        raise MultiTaskSegError(f"--mode dedicated needs exactly one dataset, got {n}")
    if args.mode == "finetune" and not config.init_bundle:
        raise MultiTaskSegError("--mode finetune needs --init-bundle")
    return config


def run(args: argparse.Namespace) -> int:
    from .train import train  # torch-heavy import only when training

    config = config_from_args(args)
    train(
        config,
        Path(args.output),
        Path(args.work_dir) if args.work_dir else None,
        args.resume,
        args.overwrite,
        args.device,
        args.save_replicas,
    )
    return 0
