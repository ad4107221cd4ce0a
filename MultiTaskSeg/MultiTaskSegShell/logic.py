"""The module's Logic: a blocking ``process`` for scripts, ``processInBackground`` for the GUI.

Both go through ``MultiTaskSegMRML.adapter.segment_node`` (node → predict → nodes). The GUI
path predicts in a child process (MultiTaskSegLib.worker, run with PythonSlicer) polled by a
QTimer: the GUI thread only reads the few lines the worker appended, and loads the outputs
into the scene after the worker has succeeded. No Python thread ever runs inference here.
"""

from __future__ import annotations

import logging
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import qt
import slicer
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleLogic

from MultiTaskSegLib import DEFAULT_BUNDLE
from MultiTaskSegLib.errors import BundleError, MultiTaskSegError
from MultiTaskSegMRML import adapter

from .dependencies import ensure_dependencies

DEVICES = ["auto", "gpu", "cpu"]
POLL_INTERVAL_MS = 100


@parameterNodeWrapper
class MultiTaskSegParameterNode:
    """inputVolume → outputSegmentation / outputUncertainty (None = create new)."""

    inputVolume: vtkMRMLScalarVolumeNode
    outputSegmentation: vtkMRMLSegmentationNode
    outputUncertainty: vtkMRMLScalarVolumeNode
    useDefaultModel: bool = True
    modelPath: Path  # used when useDefaultModel is off
    device: Annotated[str, Choice(DEVICES)] = "auto"
    mcDropoutPasses: Annotated[int, WithinRange(0, 50)] = 0
    testTimeAugmentation: bool = False
    uncertaintyOpacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.4


def chosenModelPath(parameterNode: MultiTaskSegParameterNode) -> Optional[str]:
    """The user's model folder, or None for the default model (an unset Path reads as '.')."""
    if parameterNode.useDefaultModel:
        return None
    text = str(parameterNode.modelPath or "")
    return None if text in ("", ".") else text


def pythonSlicerExecutable() -> str:
    """Slicer's Python launcher in the application; this interpreter elsewhere (tests, PythonSlicer)."""
    if getattr(slicer, "app", None) is None:
        return sys.executable
    path = shutil.which("PythonSlicer")
    if not path:
        raise MultiTaskSegError("PythonSlicer was not found next to Slicer; reinstall Slicer.")
    return path


@dataclass
class _Run:
    """One GUI run: the worker and what is needed to load its outputs and report."""

    worker: Any  # MultiTaskSegLib.worker_process.WorkerProcess
    scene: Any
    inputNode: vtkMRMLScalarVolumeNode
    bundle: Any
    segmentationNode: Optional[vtkMRMLSegmentationNode]
    uncertaintyNode: Optional[vtkMRMLScalarVolumeNode]
    opacity: float
    callbacks: dict
    loading: Any = None  # the steps loading the outputs (adapter.load_steps), once the worker is done
    loadedSteps: int = 0


class MultiTaskSegLogic(ScriptedLoadableModuleLogic):
    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._predictors: dict = {}
        self._bundles: dict = {}
        self._run: Optional[_Run] = None
        self._timer = None
        self.pythonExecutable: Optional[str] = None  # None: PythonSlicer in the application
        self.dependencyMessage = ""
        self.tickSeconds: list[float] = []  # GUI-thread time of each poll of the last run

    def getParameterNode(self):
        return MultiTaskSegParameterNode(super().getParameterNode())

    # --- model ---------------------------------------------------------------------
    @staticmethod
    def bundlePath(modelPath: Optional[str] = None) -> Path:
        return Path(modelPath) if modelPath else DEFAULT_BUNDLE

    def bundleProblem(self, modelPath: Optional[str] = None) -> Optional[str]:
        """A message saying why the model folder cannot be used, or None if it is a valid bundle."""
        try:
            self.loadBundle(modelPath)
        except MultiTaskSegError as exc:
            return str(exc)
        except ImportError:
            return None  # dependencies not installed yet; checked again on Apply
        return None

    def loadBundle(self, modelPath: Optional[str] = None):
        """The bundle (hashes checked), cached while its files stay unchanged (size and mtime)."""
        path = self.bundlePath(modelPath)
        if not modelPath and not (path / "bundle.json").is_file():
            raise BundleError(
                f"The default model is not installed ({path}); reinstall the extension or choose a model folder."
            )
        try:
            state = tuple(sorted((f.name, f.stat().st_mtime_ns, f.stat().st_size) for f in path.iterdir()))
        except OSError:
            state = None  # missing folder: load_bundle says so clearly
        key = (str(path.resolve()), state)
        if state is None or key not in self._bundles:
            from MultiTaskSegLib.bundle import load_bundle

            bundle = load_bundle(path)
            self._bundles = {key: bundle}
        return self._bundles[key]

    def _predictor(self, bundle, device: str):
        from MultiTaskSegLib.predictor import Predictor

        key = (str(bundle.path), (bundle.schema.files or {}).get("model.safetensors"), device)
        if key not in self._predictors:
            self._predictors = {key: Predictor(bundle, device)}  # keep one model in memory
        return self._predictors[key]

    @staticmethod
    def _options(device: str, mcDropout: int, tta: bool):
        from MultiTaskSegLib.predictor import PredictOptions

        return PredictOptions(device=device, tta=bool(tta), mc_dropout=int(mcDropout))

    # --- blocking ------------------------------------------------------------------
    def process(
        self,
        inputVolume: vtkMRMLScalarVolumeNode,
        segmentationNode: Optional[vtkMRMLSegmentationNode] = None,
        uncertaintyNode: Optional[vtkMRMLScalarVolumeNode] = None,
        modelPath: Optional[str] = None,
        device: str = "auto",
        mcDropout: int = 0,
        tta: bool = False,
        progress: Optional[Callable] = None,
        onOOD: Optional[Callable] = None,
        onNotice: Optional[Callable] = None,
        showResults: bool = True,
        opacity: float = 0.4,
        scene=None,
        childProcess: bool = False,
    ):
        """Segment ``inputVolume``; blocks until done and returns ``(OutputNodes, SegmentationResult)``.

        In this process by default (a CancelledError raised from ``progress`` stops it before the
        scene is touched); ``childProcess=True`` runs the worker as the GUI does. ``onOOD(oodDict,
        bundleContexts)`` as in ``processInBackground``.
        """
        from MultiTaskSegLib.outputs import SegmentationResult

        scene = scene if scene is not None else slicer.mrmlScene
        bundle = self.loadBundle(modelPath)
        options = self._options(device, mcDropout, tta)

        def predictHere(image):
            from MultiTaskSegLib.worker import predict_with_fallback

            prediction = predict_with_fallback(
                lambda d: self._predictor(bundle, d),
                image,
                options,
                progress,
                onOOD and (lambda ood: onOOD(ood.to_dict(), bundle.contexts)),
                onNotice or logging.warning,
            )
            return SegmentationResult.from_prediction(prediction)

        def predictInChild(image):
            from MultiTaskSegLib.worker_process import predict_in_child

            return predict_in_child(
                image, bundle.path, options, self.pythonExecutable or pythonSlicerExecutable(), self._childEnvironment()
            )

        outputs, result = adapter.segment_node(
            scene,
            inputVolume,
            predictInChild if childProcess else predictHere,
            bundle.labels,
            segmentationNode,
            uncertaintyNode,
        )
        if showResults:
            self.showResults(scene, inputVolume, outputs, opacity)
        return outputs, result

    @staticmethod
    def showResults(scene, inputVolume, outputs, opacity: float) -> None:
        adapter.show_results(scene, inputVolume, outputs.segmentation, outputs.uncertainty, opacity)
        if getattr(slicer, "app", None) is not None:
            slicer.util.resetSliceViews()

    @staticmethod
    def setUncertaintyOpacity(uncertaintyNode, opacity: float, scene=None) -> None:
        adapter.set_uncertainty_opacity(scene if scene is not None else slicer.mrmlScene, uncertaintyNode, opacity)

    @staticmethod
    def _childEnvironment() -> Optional[dict]:
        """Slicer's startup environment (as slicer.util.launchConsoleProcess uses); PythonSlicer sets up the rest."""
        if getattr(slicer, "app", None) is None or not hasattr(slicer.util, "startupEnvironment"):
            return None
        return dict(slicer.util.startupEnvironment())

    # --- in a child process, for the GUI --------------------------------------------
    def isRunning(self) -> bool:
        return self._run is not None

    def processInBackground(
        self,
        inputVolume,
        segmentationNode=None,
        uncertaintyNode=None,
        modelPath=None,
        device: str = "auto",
        mcDropout: int = 0,
        tta: bool = False,
        opacity: float = 0.4,
        onProgress: Optional[Callable] = None,
        onOOD: Optional[Callable] = None,
        onNotice: Optional[Callable] = None,
        onFinished: Optional[Callable] = None,
        scene=None,
    ) -> None:
        """Start the worker and return; callbacks run on the GUI thread from the poll timer.

        ``onOOD(oodDict, bundleContexts)`` comes before the outputs; ``onFinished(outputs, result,
        error, cancelled)`` exactly once.
        """
        from MultiTaskSegLib.worker_process import WorkerProcess

        if self._run is not None:
            raise MultiTaskSegError("A segmentation is already running; cancel it first.")
        if uncertaintyNode is not None and uncertaintyNode.GetID() == inputVolume.GetID():
            raise MultiTaskSegError("The uncertainty output cannot be the input volume; choose another output or none.")
        bundle = self.loadBundle(modelPath)
        image = adapter.volume_node_to_image(inputVolume)  # copy now: the node may change meanwhile
        worker = WorkerProcess(
            image,
            bundle.path,
            self._options(device, mcDropout, tta),
            self.pythonExecutable or pythonSlicerExecutable(),
            self._childEnvironment(),
        )
        callbacks = {"progress": onProgress, "ood": onOOD, "notice": onNotice, "finished": onFinished}
        self._run = _Run(
            worker,
            scene if scene is not None else slicer.mrmlScene,
            inputVolume,
            bundle,
            segmentationNode,
            uncertaintyNode,
            opacity,
            callbacks,
        )
        self.tickSeconds = []
        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_INTERVAL_MS)
        self._timer.connect("timeout()", self._poll)
        self._timer.start()

    def cancel(self) -> None:
        """Kill the worker now; the scene is left as it was (outputs half loaded are removed again)."""
        if self._run is not None:
            if self._run.loading is not None:
                self._run.loading.close()  # removes the nodes it created, restores a reused uncertainty node
            self._run.worker.cancel()
            self._finish(cancelled=True)

    @staticmethod
    def _notify(run: _Run, name: str, *args) -> None:
        """A failing callback is logged, never left to stop the run (or leave the button on Cancel)."""
        callback = run.callbacks.get(name)
        if callback is not None:
            try:
                callback(*args)
            except Exception:
                logging.exception(f"MultiTaskSeg: the {name} callback failed")

    def _poll(self) -> None:
        """The timer's slot: read what the worker appended since the last tick and act on it."""
        start = time.perf_counter()
        try:
            if self._run is not None and self._run.loading is not None:
                self._loadStep(self._run)
            elif self._run is not None:
                self._handle(self._run, self._run.worker.poll())
        except Exception as exc:
            self._finish(error=exc)
        self.tickSeconds.append(time.perf_counter() - start)

    def _loadStep(self, run: _Run) -> None:
        """One step of loading the outputs per tick, so that no tick blocks the GUI for long."""
        try:
            next(run.loading)
        except StopIteration as done:
            outputs, result = done.value
            self.showResults(run.scene, run.inputNode, outputs, run.opacity)
            return self._finish(outputs, result)
        run.loadedSteps += 1
        self._notify(run, "progress", "loading into the scene", run.loadedSteps / adapter.LOAD_STEPS)

    def _handle(self, run: _Run, events: list) -> None:
        from MultiTaskSegLib.worker_process import WorkerError

        for event in events:
            kind = event.get("event")
            if kind == "progress":
                self._notify(run, "progress", event.get("stage", ""), float(event.get("fraction", 0.0)))
            elif kind == "ood":
                self._notify(run, "ood", event, run.bundle.contexts)
            elif kind == "notice":
                self._notify(run, "notice", event.get("message", ""))
            elif kind == "log":
                logging.info(f"MultiTaskSeg worker: {event.get('message', '')}")
            elif kind == "error":
                return self._finish(error=WorkerError(event.get("message", "the worker failed")))
            elif kind == "done":  # the scene is written from here on, on the GUI thread, in short steps
                run.loading = adapter.load_steps(
                    run.scene,
                    run.inputNode,
                    run.worker.result,
                    run.bundle.labels,
                    run.segmentationNode,
                    run.uncertaintyNode,
                )
                if self._timer is not None:
                    self._timer.setInterval(0)  # the next steps as soon as Qt has handled pending events
                return self._loadStep(run)

    def _finish(self, outputs=None, result=None, error=None, cancelled: bool = False) -> None:
        run, self._run = self._run, None
        if self._timer is not None:
            self._timer.stop()
        if run is None:
            return
        run.worker.cleanup(wait=outputs is None)  # after success the child is only exiting: do not wait
        if error is not None:
            logging.error(f"MultiTaskSeg: {error}")
        self._notify(run, "finished", outputs, result, error, cancelled)

    # --- dependencies --------------------------------------------------------------
    def ensureDependencies(self, askConfirmation: bool = True) -> bool:
        """torch through the PyTorch extension, the rest via pip; asks first. False (and
        ``dependencyMessage`` says why) when the user declined."""
        ok, self.dependencyMessage = ensure_dependencies(askConfirmation)
        return ok
