"""The prediction worker: one case, with CPU fallback, reporting as JSON lines on stdout.

The Slicer module runs it in a child process with Slicer's Python (DESIGN.md: never a thread,
since Slicer's main thread holds the GIL while its event loop idles)::

    PythonSlicer -m MultiTaskSegLib.worker --bundle DIR --input FILE --output-dir OUT [--device auto] …

It writes one JSON object per line: ``{"event": "progress", "stage", "fraction"}``, ``{"event":
"ood", …}`` as soon as the signature is known, ``{"event": "notice", "message"}``, then
``{"event": "done", "outputs": {seg, uncertainty, report}, "report": {…}}`` or ``{"event":
"error", "message"}``. The outputs are those of ``mtseg predict`` (same Predictor, same writer).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import traceback
from pathlib import Path
from typing import Callable, TextIO

import SimpleITK as sitk
import torch

from .bundle import load_bundle
from .errors import MultiTaskSegError
from .inference import resolve_device
from .ood import OODResult
from .outputs import output_paths, save_prediction
from .predictor import Prediction, PredictOptions, Predictor
from .volume_io import case_name, read_volume

Notice = Callable[[str], None]
PredictorFactory = Callable[[str], Predictor]  # device ('cpu' / 'cuda') → Predictor


def is_cuda_oom(exc: BaseException) -> bool:
    oom = getattr(torch.cuda, "OutOfMemoryError", None)
    return (oom is not None and isinstance(exc, oom)) or (
        isinstance(exc, RuntimeError) and "CUDA out of memory" in str(exc)
    )


def predict_with_fallback(
    factory: PredictorFactory,
    image: sitk.Image,
    options: PredictOptions,
    progress: Callable[[str, float], None] | None = None,
    on_ood: Callable[[OODResult], None] | None = None,
    notice: Notice | None = None,
) -> Prediction:
    """Predict on the requested device; on a missing GPU or CUDA out-of-memory, redo it on the CPU."""
    notice = notice or (lambda text: None)
    device, message = resolve_device(options.device)
    if message:
        notice(message)
    try:
        return factory(device).predict(
            image, dataclasses.replace(options, device=device), progress=progress, on_ood=on_ood
        )
    except Exception as exc:
        if device != "cuda" or not is_cuda_oom(exc):
            raise
    torch.cuda.empty_cache()
    notice("The GPU ran out of memory: running again on the CPU (slower).")
    return factory("cpu").predict(image, dataclasses.replace(options, device="cpu"), progress=progress, on_ood=on_ood)


class EventWriter:
    """One JSON object per line, flushed at once so the parent sees it while the work goes on."""

    def __init__(self, stream: TextIO):
        self.stream = stream
        self._last_progress: tuple[str, int] | None = None

    def emit(self, event: str, **fields) -> None:
        self.stream.write(json.dumps({"event": event, **fields}) + "\n")
        self.stream.flush()

    def progress(self, stage: str, fraction: float) -> None:
        key = (stage, int(fraction * 100))  # at most one line per percent and stage
        if key != self._last_progress:
            self._last_progress = key
            self.emit("progress", stage=stage, fraction=round(float(fraction), 4))


def run(args: argparse.Namespace, events: EventWriter) -> dict:
    """Predict one case and write its outputs; returns the output paths (as strings)."""
    bundle = load_bundle(args.bundle)
    image = read_volume(args.input)
    options = PredictOptions(
        args.device, args.tta, args.mc_dropout, args.modality, args.restrict, cpu_bf16=args.cpu_bf16
    )
    prediction = predict_with_fallback(
        lambda device: Predictor(bundle, device),
        image,
        options,
        events.progress,
        lambda ood: events.emit("ood", **ood.to_dict()),
        lambda text: events.emit("notice", message=text),
    )
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = output_paths(out, args.case or case_name(Path(args.input)), ".nrrd" if args.raw_outputs else ".nii.gz")
    report = save_prediction(
        prediction, paths, {"input": str(args.input), "bundle": str(bundle.path)}, raw=args.raw_outputs
    )
    outputs = {key: str(path) for key, path in paths.items()}
    events.emit("done", outputs=outputs, report=report)
    return outputs


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m MultiTaskSegLib.worker", description=__doc__.splitlines()[0])
    p.add_argument("--bundle", required=True)
    p.add_argument("--input", required=True, help="volume file (NIfTI, NRRD, MHA)")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--case", help="case name for the output files (default: from the input file name)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "gpu"])
    p.add_argument("--tta", action="store_true")
    p.add_argument("--mc-dropout", type=int, default=0)
    p.add_argument("--modality", choices=["CT", "MR"])
    p.add_argument("--restrict-to-context", dest="restrict", action="store_true", default=None)
    p.add_argument("--no-restrict-to-context", dest="restrict", action="store_false")
    p.add_argument("--cpu-bf16", action="store_true")
    p.add_argument(
        "--raw-outputs",
        action="store_true",
        help="uncompressed NRRD outputs (for a reader on a GUI thread); default: the files of mtseg predict",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    events = EventWriter(sys.stdout)
    try:
        run(parser().parse_args(argv), events)
        return 0
    except MultiTaskSegError as exc:
        events.emit("error", message=str(exc))
    except Exception as exc:  # a bug: the message for the user, the traceback for the log
        traceback.print_exc(file=sys.stderr)
        events.emit("error", message=f"{type(exc).__name__}: {exc}")
    return 1


if __name__ == "__main__":
    from .process_memory import allow_malloc_tuning

    allow_malloc_tuning()  # the child process is ours alone: the heap tuning cannot reach Slicer from here
    sys.exit(main())
