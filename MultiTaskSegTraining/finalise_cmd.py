"""`mtseg finalise`: refit a bundle's OOD detector and quality model from its weights and stored split."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .config import DEFAULT_TRUST_FIT_CASES
from .evaluate_cmd import _optional_count


def add_fit_cases_argument(p: argparse.ArgumentParser, note: str = "") -> None:
    """``--fit-cases``, shared by `mtseg finalise` and `mtseg trust` (which must fit the same way)."""
    p.add_argument(
        "--fit-cases",
        type=_optional_count,
        default=DEFAULT_TRUST_FIT_CASES,
        metavar="N|all",
        help=f"train+val cases per context the detector and quality model are fitted on, each also with one "
        f"seeded artefact{note} (default {DEFAULT_TRUST_FIT_CASES})",
    )


def _threshold(text: str) -> tuple[float | None]:
    """``T`` (a number ≥ 0) or ``none``, boxed so that "not given" (None) differs from "none"."""
    if text.lower() == "none":
        return (None,)
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'none', not {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be ≥ 0 (or 'none'), not {text}")
    return (value,)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", required=True, help="the bundle whose weights and training.split are used")
    p.add_argument("--data", nargs="+", required=True, metavar="DATASET", help="the bundle's MSD dataset folders")
    p.add_argument(
        "--output", "-o", required=True, help="the new bundle directory (may equal --bundle with --overwrite)"
    )
    add_fit_cases_argument(p)
    p.add_argument(
        "--layers", nargs="+", metavar="LAYER", help="layers whose signatures the detector uses (default: the bundle's)"
    )
    p.add_argument(
        "--foreground-threshold",
        type=_threshold,
        default=None,
        metavar="T|none",
        help="the context head's window logits count by each window's share of voxels above this normalised "
        "intensity (none: a plain mean over windows); default: the bundle's own",
    )
    p.add_argument("--records", help="record cache (default ~/.cache/multitaskseg/trust/<sha of weights and settings>)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "gpu"])
    p.add_argument("--overwrite", action="store_true", help="replace a bundle already at --output")


def run(args: argparse.Namespace) -> int:
    from .trust_finalise import refit_trust

    refit_trust(
        args.bundle,
        args.data,
        args.output,
        Path(args.records) if args.records else None,
        args.fit_cases,
        args.device,
        args.overwrite,
        log=lambda m: print(m, file=sys.stderr, flush=True),
        layers=args.layers,
        **({} if args.foreground_threshold is None else {"foreground_threshold": args.foreground_threshold[0]}),
    )
    return 0
