"""The `mtseg` command: train, predict, evaluate (and bench)."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Callable

from MultiTaskSegLib.errors import MultiTaskSegError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mtseg",
        description="MultiTaskSeg: joint multi-context 3D segmentation "
        "with calibrated uncertainty and spectral OOD detection",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    from . import predict_cmd

    _add(sub, "predict", "segment volumes with a model bundle", predict_cmd)
    for name, help_text, load, extra in _optional_commands():
        try:
            module = load()
        except ImportError as exc:  # its extra is not installed: the command says so when run
            _missing(sub, name, exc, extra)
            continue
        _add(sub, name, help_text, module)
    return parser


def _optional_commands() -> list[tuple[str, str, Callable[[], ModuleType], str]]:
    """(name, help, loader, the pip extra that provides its dependencies), in the order --help lists them."""

    def local(module: str) -> Callable[[], ModuleType]:
        return lambda: importlib.import_module(f".{module}", __package__)

    return [
        ("train", "train a bundle on MSD-format datasets (joint, dedicated or fine-tune)", local("train_cmd"), "train"),
        ("evaluate", "Dice/HD95, calibration and OOD detection metrics for a bundle", local("evaluate_cmd"), "train"),
        ("finalise", "refit a bundle's OOD detector and quality model (same weights)", local("finalise_cmd"), "train"),
        (
            "trust",
            "trust benchmark: OOD detection, artefacts and failure detection of a bundle",
            local("trust_cmd"),
            "train",
        ),
        ("bench", "benchmark predict and training against MONAI (writes BENCHMARKS.md)", _benchmarks, "bench"),
    ]


def _add(sub, name: str, help_text: str, module: ModuleType) -> None:
    p = sub.add_parser(name, help=help_text)
    module.add_arguments(p)
    p.set_defaults(run=module.run)


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
    from MultiTaskSegLib.process_memory import allow_malloc_tuning

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
        print(
            f"internal error: {type(exc).__name__}: {exc} (set MTSEG_DEBUG=1 for the traceback and please report it)",
            file=sys.stderr,
        )
        return 3


if __name__ == "__main__":
    sys.exit(main())
