"""`mtseg evaluate`: Dice/HD95, calibration and OOD-detection metrics of a bundle on its test split."""

from __future__ import annotations

import argparse
from pathlib import Path

from MultiTaskSegLib.errors import MultiTaskSegError


def _optional_count(text: str) -> int | None:
    """A non-negative integer, or 'all'."""
    if text.lower() == "all":
        return None
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be ≥ 0 or 'all'")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", required=True, help="model bundle directory (from mtseg train)")
    p.add_argument(
        "--data",
        nargs="+",
        required=True,
        metavar="DATASET",
        help="MSD dataset folders the bundle was trained on (matched by dataset name; their split is the bundle's)",
    )
    p.add_argument(
        "--ood",
        nargs="*",
        default=[],
        metavar="FOLDER",
        help="folders of out-of-distribution volumes (ood-dev layout: *_image files only; "
        "MSD folder: imagesTr; otherwise every volume file)",
    )
    p.add_argument("--output-dir", "-o", required=True, help="where metrics.json and the plots go")
    p.add_argument(
        "--split",
        default="test",
        choices=["test", "val", "train"],
        help="which part of the bundle's split to evaluate (default test)",
    )
    p.add_argument(
        "--mc-dropout",
        type=int,
        default=5,
        metavar="N",
        help="MC-dropout passes for the MC-dropout-entropy OOD baseline (default 5; 0 skips it)",
    )
    p.add_argument(
        "--mc-dropout-cases",
        type=_optional_count,
        default=2,
        metavar="N|all",
        help="test cases per context that get MC dropout (default 2; OOD volumes always do)",
    )
    p.add_argument(
        "--max-cases-per-context",
        type=_optional_count,
        default=None,
        metavar="N|all",
        help="evaluate at most N test cases per context (default all)",
    )
    p.add_argument(
        "--max-train-cases",
        type=_optional_count,
        default=5,
        metavar="N|all",
        help="training cases per dataset for the Mahalanobis baseline (default 5)",
    )
    p.add_argument(
        "--size-control-cases",
        type=_optional_count,
        default=1,
        metavar="N|all",
        help="test cases per context (smallest first) re-scored cropped to the central 50 %% and "
        "padded to 2× per axis (default 1; 0 skips; padding makes a pass ~8× dearer)",
    )
    p.add_argument(
        "--cache-dir",
        help="preprocessed-volume cache for the training cases (default: the bundle's "
        "training cache, else ~/.cache/multitaskseg/preprocessed)",
    )
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "gpu"])
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--no-plots", action="store_true", help="metrics.json only")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT/metrics.json")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress display")


def run(args: argparse.Namespace) -> int:
    from .evaluate import EvalOptions, evaluate  # torch-heavy import only when evaluating

    out = Path(args.output_dir)
    if (out / "metrics.json").exists() and not args.overwrite:
        raise MultiTaskSegError(
            f"{out / 'metrics.json'} already exists; choose another --output-dir or pass --overwrite"
        )
    if args.mc_dropout < 0:
        raise MultiTaskSegError("--mc-dropout must be ≥ 0")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    options = EvalOptions(
        split=args.split,
        mc_dropout=args.mc_dropout,
        mc_dropout_cases=args.mc_dropout_cases,
        max_cases_per_context=args.max_cases_per_context,
        max_train_cases=args.max_train_cases,
        size_control_cases=args.size_control_cases,
        device=args.device,
        cache_dir=args.cache_dir,
        plots=not args.no_plots,
        quiet=args.quiet,
    )
    evaluate(args.bundle, args.data, args.ood, out, options)
    return 0
