"""MultiTaskSeg Slicer module: a thin shell (widgets, parameter node, background run, progress,
cancel) over the MRML adapter and the core in MultiTaskSegLib (see DESIGN.md, layers)."""
from __future__ import annotations

import logging
import traceback
from pathlib import Path
from typing import Annotated, Callable, Optional

import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

# Only torch-free parts of the core at import time: the module must load (and offer to
# install torch) in a Slicer where torch is not installed yet.
from MultiTaskSegLib import DEFAULT_BUNDLE, SAMPLE_VOLUME
from MultiTaskSegLib.errors import MultiTaskSegError
from MultiTaskSegLib.ood_gauge import context_description, gauge_layout

MODULE_DIR = Path(__file__).resolve().parent
REQUIREMENTS = MODULE_DIR / "Resources" / "requirements.txt"
DEVICES = ["auto", "gpu", "cpu"]
POLL_INTERVAL_MS = 100


#
# MultiTaskSeg
#
class MultiTaskSeg(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("MultiTaskSeg")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["MultiTaskSeg developers"]
        self.parent.helpText = _(
            "Segments organs in CT and MR with one joint 3D network, without being told the dataset or organ. "
            "Every segmentation comes with a voxelwise uncertainty map and an out-of-distribution (OOD) score that "
            "says whether the image resembles anything the model was trained on.")
        self.parent.acknowledgementText = _(
            "Spectral OOD detection after the cnn_ood method; sample CT from TotalSegmentator (Apache-2.0).")


#
# Parameters
#
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


#
# OOD gauge (painting only; the geometry comes from MultiTaskSegLib.ood_gauge)
#
class OODGaugeWidget(qt.QWidget):
    def __init__(self, parent=None):
        qt.QWidget.__init__(self, parent)
        self.layoutInfo = None
        self.setMinimumHeight(56)

    def setResult(self, score: float, threshold: float, context: str) -> None:
        self.layoutInfo = gauge_layout(score, threshold, context)
        self.setToolTip(self.layoutInfo.score_text)
        self.update()

    def clear(self) -> None:
        self.layoutInfo = None
        self.update()

    def paintEvent(self, event) -> None:
        info = self.layoutInfo
        if info is None:
            return
        painter = qt.QPainter(self)
        try:
            margin, barTop, barHeight = 6, 4, 14
            width = self.width - 2 * margin
            for band in info.bands:
                painter.fillRect(qt.QRectF(margin + band.start * width, barTop, (band.end - band.start) * width,
                                           barHeight), qt.QColor(*band.color))
            painter.setPen(qt.QPen(qt.QColor(0, 0, 0), 2))
            x = margin + info.threshold_position * width
            painter.drawLine(qt.QLineF(x, barTop - 3, x, barTop + barHeight + 3))  # threshold marker
            x = margin + info.score_position * width
            painter.setBrush(qt.QBrush(qt.QColor(30, 30, 30)))
            painter.drawPolygon(qt.QPolygonF([qt.QPointF(x, barTop + barHeight), qt.QPointF(x - 6, barTop + barHeight + 9),
                                              qt.QPointF(x + 6, barTop + barHeight + 9)]))  # score pointer
            painter.setPen(self.palette.color(qt.QPalette.WindowText))
            text = info.score_text + (f" — {info.context_text}" if info.context_text else "")
            painter.drawText(qt.QRectF(margin, barTop + barHeight + 12, width, 18), qt.Qt.AlignLeft, text)
        finally:
            painter.end()


#
# MultiTaskSegWidget
#
class MultiTaskSegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/MultiTaskSeg.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.gauge = OODGaugeWidget()
        self.ui.oodGaugeFrame.layout().addWidget(self.gauge)
        self.ui.resultsTable.setColumnCount(3)
        self.ui.resultsTable.setHorizontalHeaderLabels([_("Structure"), _("Volume (ml)"), _("Mean uncertainty")])
        self.ui.resultsTable.horizontalHeader().setSectionResizeMode(qt.QHeaderView.Stretch)
        self._resetResults()

        self.logic = MultiTaskSegLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.modelPathLineEdit.connect("currentPathChanged(QString)", self.onModelPathChanged)
        self.ui.useDefaultModelCheckBox.connect("toggled(bool)", self.onModelPathChanged)

        self.initializeParameterNode()

    def cleanup(self) -> None:
        self.removeObservers()
        if self.logic:
            self.logic.cancel()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)

    def onSceneStartClose(self, caller, event) -> None:
        if self.logic:
            self.logic.cancel()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode:
                self._parameterNode.inputVolume = firstVolumeNode

    def setParameterNode(self, inputParameterNode: Optional[MultiTaskSegParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # connectGui binds each widget whose SlicerParameterName property names a parameter
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
            self._checkCanApply()

    def _checkCanApply(self, caller=None, event=None) -> None:
        if self.logic.isRunning():
            self.ui.applyButton.text = _("Cancel")
            self.ui.applyButton.toolTip = _("Stop the segmentation; the scene is left as it was")
            self.ui.applyButton.enabled = not self.logic.cancelRequested()
            return
        self.ui.applyButton.text = _("Apply")
        p = self._parameterNode
        self.ui.modelPathLineEdit.enabled = bool(p) and not p.useDefaultModel
        if p and p.inputVolume and (p.useDefaultModel or chosenModelPath(p)):
            self.ui.applyButton.toolTip = _("Segment the input volume")
            self.ui.applyButton.enabled = True
        else:
            self.ui.applyButton.toolTip = _("Select an input volume (and a model folder if not using the default)")
            self.ui.applyButton.enabled = False

    def onModelPathChanged(self, *args) -> None:
        """Validate the chosen bundle right away, so a wrong folder is reported before Apply."""
        # read the widgets, not the parameter node: this slot may run before connectGui's own slot
        useDefault = self.ui.useDefaultModelCheckBox.checked
        path = self.ui.modelPathLineEdit.currentPath
        if not useDefault and not path:
            self.ui.modelStatusLabel.visible = False
            return
        message = self.logic.bundleProblem(None if useDefault else path)
        self.ui.modelStatusLabel.text = message or ""
        self.ui.modelStatusLabel.visible = bool(message)

    def onApplyButton(self) -> None:
        if self.logic.isRunning():
            self.logic.cancel()
            self.ui.statusLabel.text = _("Cancelling…")
            self._checkCanApply()
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to start the segmentation."), waitCursor=True):
            if not self.logic.ensureDependencies():
                return
            p = self._parameterNode
            self._resetResults()
            self.logic.processInBackground(
                p.inputVolume, segmentationNode=p.outputSegmentation, uncertaintyNode=p.outputUncertainty,
                modelPath=chosenModelPath(p), device=p.device, mcDropout=p.mcDropoutPasses,
                tta=p.testTimeAugmentation, opacity=p.uncertaintyOpacity, onProgress=self._onProgress,
                onOOD=self._onOOD, onNotice=self._onNotice, onFinished=self._onFinished)
            self.ui.progressBar.visible = True
            self.ui.statusLabel.text = _("Starting…")
        self._checkCanApply()

    # --- reports from the background run (delivered on the GUI thread) ---------------
    def _onProgress(self, stage: str, fraction: float) -> None:
        self.ui.progressBar.value = int(round(100 * fraction))
        self.ui.progressBar.format = f"{stage}: %p%"
        self.ui.statusLabel.text = _("Running: {stage}").format(stage=stage)

    def _onOOD(self, ood, contexts: list) -> None:
        context = context_description(contexts, ood.nearest_context)
        self.gauge.setResult(ood.score, ood.threshold, context)
        self.ui.oodCollapsibleButton.collapsed = False
        self.ui.oodWarningLabel.visible = bool(ood.is_ood)
        if ood.is_ood:
            self.ui.oodWarningLabel.text = _(
                "⚠ This image does not resemble the training data (nearest: {context}). "
                "Check the segmentation carefully; it may be unreliable.").format(context=context)

    def _onNotice(self, text: str) -> None:
        self.ui.deviceNoticeLabel.text = text
        self.ui.deviceNoticeLabel.visible = True
        logging.warning(text)

    def _onFinished(self, outputs, prediction, error: Optional[BaseException], cancelled: bool) -> None:
        self.ui.progressBar.visible = False
        self._checkCanApply()
        if cancelled:
            self.ui.statusLabel.text = _("Cancelled; the scene was not changed.")
            self.gauge.clear()
            self.ui.oodWarningLabel.visible = False
            return
        if error is not None:
            self.ui.statusLabel.text = _("Failed.")
            if isinstance(error, MultiTaskSegError):
                slicer.util.errorDisplay(str(error))
            else:
                detail = "".join(traceback.format_exception(type(error), error, error.__traceback__))
                slicer.util.errorDisplay(_("Segmentation failed: {error}").format(error=error), detailedText=detail)
            return
        # the outputs are now chosen: a second Apply updates them instead of piling up nodes
        self._parameterNode.outputSegmentation = outputs.segmentation
        self._parameterNode.outputUncertainty = outputs.uncertainty
        self._fillResults(prediction)
        self.ui.statusLabel.text = _("Done in {seconds:.1f} s on {device}.").format(
            seconds=prediction.timings_s.get("total", 0.0), device=prediction.device)

    def _resetResults(self) -> None:
        self.gauge.clear()
        self.ui.oodWarningLabel.visible = False
        self.ui.deviceNoticeLabel.visible = False
        self.ui.modelStatusLabel.visible = False
        self.ui.progressBar.visible = False
        self.ui.progressBar.value = 0
        self.ui.resultsTable.setRowCount(0)

    def _fillResults(self, prediction) -> None:
        rows = [(name, prediction.volumes_ml.get(name, 0.0), prediction.mean_uncertainty_per_label.get(name))
                for _value, name in sorted(prediction.label_names.items())]
        table = self.ui.resultsTable
        table.setRowCount(len(rows))
        for row, (name, volume, uncertainty) in enumerate(rows):
            cells = [name, f"{volume:.1f}", "–" if uncertainty is None else f"{uncertainty:.3f}"]
            for column, text in enumerate(cells):
                item = qt.QTableWidgetItem(text)
                item.setFlags(qt.Qt.ItemIsSelectable | qt.Qt.ItemIsEnabled)
                table.setItem(row, column, item)


#
# MultiTaskSegLogic
#
class MultiTaskSegLogic(ScriptedLoadableModuleLogic):
    """Blocking ``process`` for scripts, ``processInBackground`` for the GUI; both write the
    scene only after the prediction has finished (a cancelled run leaves it unchanged)."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._predictors: dict = {}
        self._job = None
        self._timer = None

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
        from MultiTaskSegLib.bundle import load_bundle
        from MultiTaskSegLib.errors import BundleError
        path = self.bundlePath(modelPath)
        if not modelPath and not (path / "bundle.json").is_file():
            raise BundleError(f"The default model is not installed ({path}); reinstall the extension or choose a "
                              "model folder.")
        return load_bundle(path)

    def _predictorFactory(self, bundle) -> Callable:
        from MultiTaskSegLib.predictor import Predictor

        def factory(device: str):
            key = (str(bundle.path), bundle.meta.get("files", {}).get("model.safetensors"), device)
            if key not in self._predictors:
                self._predictors.clear()  # keep one model in memory
                self._predictors[key] = Predictor(bundle, device)
            return self._predictors[key]
        return factory

    @staticmethod
    def _options(device: str, mcDropout: int, tta: bool):
        from MultiTaskSegLib.predictor import PredictOptions
        return PredictOptions(device=device, tta=bool(tta), mc_dropout=int(mcDropout))

    # --- blocking ------------------------------------------------------------------
    def process(self, inputVolume: vtkMRMLScalarVolumeNode, segmentationNode: Optional[vtkMRMLSegmentationNode] = None,
                uncertaintyNode: Optional[vtkMRMLScalarVolumeNode] = None, modelPath: Optional[str] = None,
                device: str = "auto", mcDropout: int = 0, tta: bool = False, progress: Optional[Callable] = None,
                onOOD: Optional[Callable] = None, onNotice: Optional[Callable] = None, showResults: bool = True,
                opacity: float = 0.4, scene=None):
        """Segment ``inputVolume`` and return ``(OutputNodes, Prediction)``; blocks until done.

        ``scene`` defaults to ``slicer.mrmlScene``; a CancelledError raised from ``progress`` stops the run
        before the scene is touched.
        """
        from MultiTaskSegLib import mrml_adapter
        from MultiTaskSegLib.background import predict_with_fallback
        scene = scene if scene is not None else slicer.mrmlScene
        bundle = self.loadBundle(modelPath)
        image = mrml_adapter.volume_node_to_image(inputVolume)
        prediction = predict_with_fallback(self._predictorFactory(bundle), image, self._options(device, mcDropout, tta),
                                           progress, onOOD, onNotice or logging.warning)
        outputs = mrml_adapter.write_prediction(scene, inputVolume, prediction, bundle.labels, segmentationNode,
                                                uncertaintyNode)
        if showResults:
            mrml_adapter.show_results(scene, inputVolume, outputs, opacity)
        return outputs, prediction

    # --- background ----------------------------------------------------------------
    def isRunning(self) -> bool:
        return self._job is not None

    def cancelRequested(self) -> bool:
        return self._job is not None and self._job.cancelled

    def cancel(self) -> None:
        if self._job is not None:
            self._job.cancel()

    def processInBackground(self, inputVolume, segmentationNode=None, uncertaintyNode=None, modelPath=None,
                            device: str = "auto", mcDropout: int = 0, tta: bool = False, opacity: float = 0.4,
                            onProgress: Optional[Callable] = None, onOOD: Optional[Callable] = None,
                            onNotice: Optional[Callable] = None, onFinished: Optional[Callable] = None) -> None:
        """Start a worker thread; callbacks run on the GUI thread (a timer drains the job's events).

        ``onFinished(outputs, prediction, error, cancelled)`` is called once.
        """
        from MultiTaskSegLib import mrml_adapter
        from MultiTaskSegLib.background import PredictionJob
        if self._job is not None:
            raise MultiTaskSegError("A segmentation is already running; cancel it first.")
        bundle = self.loadBundle(modelPath)
        image = mrml_adapter.volume_node_to_image(inputVolume)  # copy now: the node may change meanwhile
        self._job = PredictionJob(self._predictorFactory(bundle), image, self._options(device, mcDropout, tta)).start()
        scene = slicer.mrmlScene

        def finish(outputs=None, prediction=None, error=None, cancelled=False):
            self._timer.stop()
            self._job = None
            if onFinished:
                onFinished(outputs, prediction, error, cancelled)

        def poll():
            for event in self._job.poll():
                if event.kind == "progress" and onProgress:
                    onProgress(*event.payload)
                elif event.kind == "ood" and onOOD:
                    onOOD(event.payload, bundle.contexts)
                elif event.kind == "notice" and onNotice:
                    onNotice(event.payload)
                elif event.kind == "cancelled":
                    return finish(cancelled=True)
                elif event.kind == "error":
                    return finish(error=event.payload)
                elif event.kind == "done":
                    try:  # the scene is written here, on the GUI thread, and only now
                        outputs = mrml_adapter.write_prediction(scene, inputVolume, event.payload, bundle.labels,
                                                                segmentationNode, uncertaintyNode)
                        mrml_adapter.show_results(scene, inputVolume, outputs, opacity)
                    except Exception as exc:
                        return finish(error=exc)
                    return finish(outputs, event.payload)

        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_INTERVAL_MS)
        self._timer.connect("timeout()", poll)
        self._timer.start()

    # --- dependencies --------------------------------------------------------------
    def ensureDependencies(self, askConfirmation: bool = True) -> bool:
        """torch through the PyTorch extension, the rest via pip; asks before installing."""
        try:
            import torch  # noqa: F401
        except ImportError:
            try:
                import PyTorchUtils
            except ImportError:
                raise MultiTaskSegError("MultiTaskSeg needs the PyTorch extension: install 'PyTorch' from the "
                                        "Extensions Manager and restart Slicer.") from None
            torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=askConfirmation)
            if torch is None:
                return False  # the user declined
        packaging = getattr(slicer, "packaging", None)
        if packaging is not None and hasattr(packaging, "pip_ensure"):  # Slicer 5.12+: check, ask, install
            return packaging.pip_ensure(packaging.load_requirements(str(REQUIREMENTS)), requester="MultiTaskSeg") is not False
        missing = [line.strip() for line in REQUIREMENTS.read_text(encoding="utf-8").splitlines()
                   if line.strip() and not line.startswith("#") and not _importable(line)]
        if not missing:
            return True
        if askConfirmation and not slicer.util.confirmOkCancelDisplay(
                _("MultiTaskSeg needs these Python packages: {packages}. Install them now?").format(
                    packages=", ".join(missing))):
            return False
        slicer.util.pip_install(missing)
        return True


def chosenModelPath(parameterNode: MultiTaskSegParameterNode) -> Optional[str]:
    """The user's model folder, or None for the default model (an unset Path reads as '.')."""
    if parameterNode.useDefaultModel:
        return None
    text = str(parameterNode.modelPath or "")
    return None if text in ("", ".") else text


def _importable(requirement: str) -> bool:
    import importlib.util
    import re
    name = re.split(r"[<>=!~\[; ]", requirement.strip(), maxsplit=1)[0]
    return importlib.util.find_spec({"SimpleITK": "SimpleITK"}.get(name, name.replace("-", "_"))) is not None


#
# MultiTaskSegTest
#
class MultiTaskSegTest(ScriptedLoadableModuleTest):
    """Runs the real logic with the default model on the shipped sample CT, on CPU.

    The checks live in MultiTaskSegLib/mrml_selftest.py so that pytest runs the same body
    with slicer-core (Testing/test_slicer_selftest.py).
    """

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        self.setUp()
        self.test_MultiTaskSeg_segment_sample()

    def test_MultiTaskSeg_segment_sample(self) -> None:
        from MultiTaskSegLib.mrml_selftest import default_bundle_missing_reason, run_selftest
        reason = default_bundle_missing_reason()
        if reason:
            self.skipTest(reason)
        logic = MultiTaskSegLogic()
        self.assertTrue(logic.ensureDependencies(askConfirmation=False))
        run_selftest(slicer.mrmlScene, logic.process, DEFAULT_BUNDLE, SAMPLE_VOLUME, log=self.delayDisplay)
        self.delayDisplay(_("Test passed"))
