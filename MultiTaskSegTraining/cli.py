"""The `mtseg` command: train, predict, evaluate (and bench)."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from MultiTaskSegLib.errors import MultiTaskSegError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mtseg", description="MultiTaskSeg: joint multi-context 3D segmentation "
                                     "with calibrated uncertainty and spectral OOD detection")
    sub = parser.add_subparsers(dest="command", required=True)
    from . import predict_cmd
    p = sub.add_parser("predict", help="segment volumes with a model bundle")
    predict_cmd.add_arguments(p)
    p.set_defaults(run=predict_cmd.run)
    try:
        from . import train_cmd
        p = sub.add_parser("train", help="train a bundle on MSD-format datasets (joint, dedicated or fine-tune)")
        train_cmd.add_arguments(p)
        p.set_defaults(run=train_cmd.run)
    except ImportError as exc:  # training extras not installed
        _missing(sub, "train", exc)
    try:
        from . import evaluate_cmd
        p = sub.add_parser("evaluate", help="Dice/HD95, calibration and OOD detection metrics for a bundle")
        evaluate_cmd.add_arguments(p)
        p.set_defaults(run=evaluate_cmd.run)
    except ImportError as exc:
        _missing(sub, "evaluate", exc)
    try:
        from . import finalise_cmd
        p = sub.add_parser("finalise", help="refit a bundle's OOD detector and quality model (same weights)")
        finalise_cmd.add_arguments(p)
        p.set_defaults(run=finalise_cmd.run)
    except ImportError as exc:
        _missing(sub, "finalise", exc)
    try:
        from . import trust_cmd
        p = sub.add_parser("trust", help="trust benchmark: OOD detection, artefacts and failure detection of a bundle")
        trust_cmd.add_arguments(p)
        p.set_defaults(run=trust_cmd.run)
    except ImportError as exc:
        _missing(sub, "trust", exc)
    try:
        bench = _benchmarks()
        p = sub.add_parser("bench", help="benchmark predict and training against MONAI (writes BENCHMARKS.md)")
        bench.add_arguments(p)
        p.set_defaults(run=bench.run)
    except ImportError as exc:
        _missing(sub, "bench", exc, "bench")
    return parser


def _benchmarks():
    """A thin entry point: the benchmark package is the source checkout's benchmarks/, not part of the wheel."""
    root = Path(__file__).resolve().parents[1]
    if not (root / "benchmarks" / "cli.py").is_file():
        raise ImportError("'mtseg bench' runs from a source checkout", name="benchmarks")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from benchmarks import cli
    return cli


def _missing(sub, name: str, exc: ImportError, extra: str = "train") -> None:
    p = sub.add_parser(name, help=f"(unavailable: {exc.name} is not installed)")
    p.set_defaults(run=lambda args: _fail(f"'mtseg {name}' needs {exc.name}: pip install 'multitaskseg[{extra}]'"))


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from MultiTaskSegLib.inference import allow_malloc_tuning
    allow_malloc_tuning()  # this process is ours alone (inside Slicer the core leaves malloc as it is)
    try:
        return int(args.run(args) or 0)
    except MultiTaskSegError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except OSError as exc:  # disk full, permission denied, …: the user can act on these
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # a bug: one line for users, the traceback on request
        if os.environ.get("MTSEG_DEBUG"):
            raise
        print(f"internal error: {type(exc).__name__}: {exc} (set MTSEG_DEBUG=1 for the traceback and "
              "please report it)", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
