"""The parent side of the worker: start it as a child process, read its events, cancel it.

No Qt and no threads: the Slicer module calls ``poll()`` from a QTimer; each call reads only
what the child has appended to its event file since the last one, so the GUI thread never
waits. The child's stdout goes to a file (not a pipe) so that reading never blocks, on any OS.
Cancel kills the whole process tree (PythonSlicer is a launcher with the real Python below it).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import SimpleITK as sitk

from .errors import MultiTaskSegError
from .outputs import SegmentationResult
from .predictor import PredictOptions

#: The folder holding MultiTaskSegLib: the child runs there, so ``-m MultiTaskSegLib.worker`` imports it.
PACKAGE_PARENT = Path(__file__).resolve().parent.parent
TERMINAL = ("done", "error")


class WorkerError(MultiTaskSegError):
    """The worker reported an error; its message (one line) says what went wrong."""


def worker_arguments(bundle_path: str | Path, options: PredictOptions) -> list[str]:
    args = [
        "--bundle",
        str(Path(bundle_path).resolve()),  # the child runs in another folder
        "--device",
        options.device,
        "--mc-dropout",
        str(int(options.mc_dropout)),
    ]
    if options.tta:
        args.append("--tta")
    if options.modality:
        args += ["--modality", options.modality]
    if options.restrict_to_context is not None:
        args.append("--restrict-to-context" if options.restrict_to_context else "--no-restrict-to-context")
    if options.cpu_bf16:
        args.append("--cpu-bf16")
    return args


class WorkerProcess:
    """One prediction in a child process. ``poll()`` returns the events that arrived since the last call."""

    def __init__(
        self,
        image: sitk.Image,
        bundle_path: str | Path,
        options: PredictOptions,
        python: str | None = None,
        env: dict | None = None,
        extra_args: Sequence[str] = (),
    ):
        self.work_dir = Path(tempfile.mkdtemp(prefix="MultiTaskSeg-"))
        self.output_dir = self.work_dir / "out"
        input_path = self.work_dir / "input.nrrd"
        sitk.WriteImage(image, str(input_path), useCompression=False)  # fast; deleted with the folder
        self.command = [
            python or sys.executable,
            "-m",
            "MultiTaskSegLib.worker",
            "--input",
            str(input_path),
            "--output-dir",
            str(self.output_dir),
            "--case",
            "case",
            "--raw-outputs",
            *worker_arguments(bundle_path, options),
            *extra_args,
        ]
        self._events_path, self._stderr_path = self.work_dir / "events.jsonl", self.work_dir / "stderr.log"
        self._offset, self._partial = 0, b""
        self.final: dict | None = None  # the done / error event, once it arrived
        self.cancelled = False
        self.started = time.perf_counter()
        with open(self._events_path, "wb") as out, open(self._stderr_path, "wb") as err:
            kwargs: dict[str, Any] = {"start_new_session": True}
            if sys.platform == "win32":  # (the spelling mypy understands for a Windows-only constant)
                kwargs = {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}
            self._proc = subprocess.Popen(
                self.command,
                cwd=str(PACKAGE_PARENT),
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
                env=env,
                **kwargs,
            )

    # --- events --------------------------------------------------------------------
    def _read_lines(self) -> list[bytes]:
        with open(self._events_path, "rb") as f:
            f.seek(self._offset)
            data = f.read()
        self._offset += len(data)
        *lines, self._partial = (self._partial + data).split(b"\n")
        return [line for line in lines if line.strip()]

    def poll(self) -> list[dict]:
        """New events; a child that ended without a done/error line yields an error with its last stderr line."""
        if self.final is not None or self.cancelled:
            return []
        exited = self._proc.poll() is not None  # before reading, so no line written before exit is missed
        events = []
        for line in self._read_lines():
            try:
                event = json.loads(line)
            except json.JSONDecodeError:  # a stray print in a library: log it, it is not an event
                event = {"event": "log", "message": line.decode("utf-8", "replace")}
            events.append(event)
            if event.get("event") in TERMINAL:
                self.final = event
                return events
        if exited:
            self.final = {"event": "error", "message": self._crash_message()}
            events.append(self.final)
        return events

    def _crash_message(self) -> str:
        lines = [l for l in self._stderr_path.read_text(encoding="utf-8", errors="replace").splitlines() if l.strip()]
        last = lines[-1].strip() if lines else "no error message"
        return f"the segmentation worker stopped unexpectedly (exit code {self._proc.returncode}): {last}"

    def is_running(self) -> bool:
        return self._proc.poll() is None

    # --- results -------------------------------------------------------------------
    def result(self) -> SegmentationResult:
        """The outputs, once the done event has arrived."""
        if self.final is None or self.final.get("event") != "done":
            raise RuntimeError("the worker has not finished successfully")
        return SegmentationResult.read(self.final["outputs"], self.final.get("report"))

    def wait(self, timeout: float | None = None, interval: float = 0.05) -> list[dict]:
        """Blocking: poll until the done or error event (for scripts and tests); returns all events."""
        events: list[dict] = []
        deadline = None if timeout is None else time.perf_counter() + timeout
        while self.final is None:
            events += self.poll()
            if self.final is None:
                if deadline is not None and time.perf_counter() > deadline:
                    raise TimeoutError(f"the worker did not finish within {timeout} s")
                time.sleep(interval)
        return events

    # --- ending --------------------------------------------------------------------
    def cancel(self) -> None:
        """Kill the process tree now and delete everything it wrote."""
        self.cancelled = True
        self._kill_tree()
        self.cleanup()

    def _kill_tree(self, wait: bool = True) -> None:
        if self._proc.poll() is not None:
            return
        try:
            if os.name == "nt":
                subprocess.run(["taskkill", "/F", "/T", "/PID", str(self._proc.pid)], capture_output=True, check=False)
            else:
                os.killpg(self._proc.pid, signal.SIGKILL)  # the child leads its own session
        except (ProcessLookupError, PermissionError, OSError):
            self._proc.kill()
        if not wait:
            return  # subprocess reaps it later (Popen's own clean-up of finished children)
        try:
            self._proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            self._proc.kill()

    def cleanup(self, wait: bool = True) -> None:
        """Remove the temporary folder (input copy, outputs, logs); the child is stopped first if needed.

        ``wait=False`` (after a done line, when the child only exits) does not wait for it to go:
        the GUI calls this on its main thread."""
        if self._proc.poll() is None:
            self._kill_tree(wait)
        shutil.rmtree(self.work_dir, ignore_errors=True)


def predict_in_child(
    image: sitk.Image,
    bundle_path: str | Path,
    options: PredictOptions,
    python: str | None = None,
    env: dict | None = None,
    timeout: float | None = None,
) -> SegmentationResult:
    """Blocking prediction in a child process (scripts); raises WorkerError with the worker's message."""
    worker = WorkerProcess(image, bundle_path, options, python, env)
    try:
        worker.wait(timeout)
        final = worker.final or {}  # wait() returns only once the final event arrived
        if final.get("event") == "error":
            raise WorkerError(final.get("message", "the worker failed"))
        return worker.result()
    finally:
        worker.cleanup()
