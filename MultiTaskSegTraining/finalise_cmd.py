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
    p.add_argument("--records", help="record cache (default ~/.cache/multitaskseg/trust/<weights sha>)")
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
    )
    return 0
