"""Running a prediction off the GUI thread, with cancel and CPU fallback. No Qt, no scene.

The worker thread only computes (torch releases the GIL, so Slicer stays responsive);
it reports through a queue that the GUI thread drains with a timer. The scene is
written by the GUI thread after the job is done, never from the worker: MRML is not
thread-safe, and a cancelled job must leave the scene untouched.
"""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Any, Callable

import SimpleITK as sitk
import torch

from .errors import CancelledError
from .ood import OODResult
from .predictor import Prediction, PredictOptions, Predictor

Notice = Callable[[str], None]
PredictorFactory = Callable[[str], Predictor]  # device ('cpu' / 'cuda') → Predictor


def resolve_device(requested: str, cuda_available: bool | None = None) -> tuple[str, str | None]:
    """(device to use, notice for the user or None); a missing GPU falls back to CPU."""
    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    requested = (requested or "auto").lower()
    if requested == "cpu":
        return "cpu", None
    if cuda_available:
        return "cuda", None
    if requested == "auto":
        return "cpu", "No CUDA GPU found: running on the CPU (slower)."
    return "cpu", "A GPU was requested but no CUDA GPU is available: running on the CPU instead (slower)."


def is_cuda_oom(exc: BaseException) -> bool:
    oom = getattr(torch.cuda, "OutOfMemoryError", None)
    return (oom is not None and isinstance(exc, oom)) or (isinstance(exc, RuntimeError) and "CUDA out of memory" in str(exc))


def predict_with_fallback(factory: PredictorFactory, image: sitk.Image, options: PredictOptions,
                          progress: Callable[[str, float], None] | None = None,
                          on_ood: Callable[[OODResult], None] | None = None,
                          notice: Notice | None = None) -> Prediction:
    """Predict on the requested device; on a missing GPU or CUDA out-of-memory, redo it on the CPU."""
    notice = notice or (lambda text: None)
    device, message = resolve_device(options.device)
    if message:
        notice(message)
    run_options = PredictOptions(device, options.tta, options.mc_dropout, options.modality, options.restrict_to_context)
    try:
        return factory(device).predict(image, run_options, progress=progress, on_ood=on_ood)
    except Exception as exc:
        if device != "cuda" or not is_cuda_oom(exc):
            raise
    torch.cuda.empty_cache()
    notice("The GPU ran out of memory: running again on the CPU (slower).")
    run_options.device = "cpu"
    return factory("cpu").predict(image, run_options, progress=progress, on_ood=on_ood)


@dataclass
class Event:
    kind: str  # progress | ood | notice | done | error | cancelled
    payload: Any = None


class PredictionJob:
    """One background prediction. ``poll()`` returns the events reported since the last poll."""

    def __init__(self, factory: PredictorFactory, image: sitk.Image, options: PredictOptions):
        self._factory, self._image, self._options = factory, image, options
        self._events: queue.Queue[Event] = queue.Queue()
        self._cancel = threading.Event()
        self._thread = threading.Thread(target=self._run, name="MultiTaskSeg prediction", daemon=True)
        self.finished = False

    def start(self) -> "PredictionJob":
        self._thread.start()
        return self

    def cancel(self) -> None:
        """Ask the worker to stop; it stops at its next progress report (one window batch)."""
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def is_running(self) -> bool:
        return self._thread.is_alive()

    def wait(self, timeout: float | None = None) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def poll(self) -> list[Event]:
        events = []
        while True:
            try:
                events.append(self._events.get_nowait())
            except queue.Empty:
                return events

    def _progress(self, stage: str, fraction: float) -> None:
        if self._cancel.is_set():
            raise CancelledError()
        self._events.put(Event("progress", (stage, float(fraction))))

    def _run(self) -> None:
        try:
            prediction = predict_with_fallback(self._factory, self._image, self._options, self._progress,
                                               lambda ood: self._events.put(Event("ood", ood)),
                                               lambda text: self._events.put(Event("notice", text)))
            # a cancel that arrives after the last progress report still wins
            self._events.put(Event("cancelled") if self._cancel.is_set() else Event("done", prediction))
        except CancelledError:
            self._events.put(Event("cancelled"))
        except Exception as exc:  # reported to the GUI thread, which shows it
            self._events.put(Event("error", exc))
        finally:
            self.finished = True
