"""MultiTaskSeg Slicer module: a thin shell (widgets, parameter node, the worker process, progress,
cancel) over the MRML adapter (MultiTaskSegMRML) and the core (MultiTaskSegLib); see DESIGN.md."""

from __future__ import annotations

import logging
import sys
import traceback
from pathlib import Path
from typing import Optional

import qt
import slicer
import vtk
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

# Only torch-free parts at import time: the module must load (and offer to install torch) in a
# Slicer where torch is not installed yet. The Logic and the parameters live in MultiTaskSegShell/.
from MultiTaskSegLib import DEFAULT_BUNDLE, SAMPLE_VOLUME
from MultiTaskSegLib.errors import MultiTaskSegError
from MultiTaskSegLib.ood_gauge import context_description
from MultiTaskSegMRML.adapter import quality_text
from MultiTaskSegShell.gauge_widget import OODGaugeWidget
from MultiTaskSegShell.logic import MultiTaskSegLogic, MultiTaskSegParameterNode, chosenModelPath

#: SHA-256 of Resources/SampleData/totalseg_ct01.nii.gz (SampleData checks it after copying).
SAMPLE_SHA256 = "7811475c3e61c4310c51b56998b365ef5d561919388ecb89839f3cf119389e8c"


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
            "says whether the image resembles anything the model was trained on."
        )
        self.parent.acknowledgementText = _(
            "Spectral OOD detection after the cnn_ood method; sample CT from TotalSegmentator (Apache-2.0)."
        )
        slicer.app.connect("startupCompleted()", registerSampleData)


def registerSampleData() -> None:
    """The shipped sample CT in the Sample Data module (copied from the module folder, checksum checked)."""
    import SampleData

    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category="MultiTaskSeg",
        sampleName="MultiTaskSegSampleCT",
        uris=SAMPLE_VOLUME.as_uri(),
        fileNames=SAMPLE_VOLUME.name,
        nodeNames="MultiTaskSegSampleCT",
        checksums=f"SHA256:{SAMPLE_SHA256}",
        thumbnailFileName=str(Path(__file__).resolve().parent / "Resources" / "Icons" / "MultiTaskSeg.png"),
    )


#
# OOD gauge (painting only; the geometry comes from MultiTaskSegLib.ood_gauge)
#
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
        self._lastInputID = None

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
        # the model folder is checked once typing pauses, not on every keystroke (checking hashes the weights)
        self._modelCheckTimer = qt.QTimer()
        self._modelCheckTimer.setSingleShot(True)
        self._modelCheckTimer.setInterval(500)
        self._modelCheckTimer.connect("timeout()", self.checkModelPath)

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

    def onReload(self) -> None:
        """Reload the packages below the shell too (Slicer reloads only this file)."""
        if self.logic:
            self.logic.cancel()
        for name in [
            n for n in sys.modules if n.split(".")[0] in ("MultiTaskSegLib", "MultiTaskSegMRML", "MultiTaskSegShell")
        ]:
            del sys.modules[name]
        ScriptedLoadableModuleWidget.onReload(self)

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterChanged)

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
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterChanged)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # connectGui returns no tag on Slicer 5.8.0/5.8.1; connectParametersToGui does on every version
            bound = {
                w.property("SlicerParameterName"): w
                for w in vars(self.ui).values()
                if hasattr(w, "property") and w.property("SlicerParameterName")
            }
            self._parameterNodeGuiTag = self._parameterNode.connectParametersToGui(bound)
            self._lastInputID = self._parameterNode.inputVolume.GetID() if self._parameterNode.inputVolume else None
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterChanged)
            self._checkCanApply()

    def _onParameterChanged(self, caller=None, event=None) -> None:
        p = self._parameterNode
        inputID = p.inputVolume.GetID() if p.inputVolume else None
        if inputID != self._lastInputID:  # another patient: never overwrite the previous one's outputs
            self._lastInputID = inputID
            if not self.logic.isRunning() and (p.outputSegmentation or p.outputUncertainty):
                p.outputSegmentation, p.outputUncertainty = None, None
        self.logic.setUncertaintyOpacity(p.outputUncertainty, p.uncertaintyOpacity)
        self._checkCanApply()

    def _checkCanApply(self, caller=None, event=None) -> None:
        if self.logic.isRunning():
            self.ui.applyButton.text = _("Cancel")
            self.ui.applyButton.toolTip = _("Stop the segmentation; the scene is left as it was")
            self.ui.applyButton.enabled = True
            return
        self.ui.applyButton.text = _("Apply")
        p = self._parameterNode
        self.ui.modelPathLineEdit.enabled = bool(p) and not p.useDefaultModel
        problem = None
        if not p or not p.inputVolume:
            problem = _("Select an input volume")
        elif not (p.useDefaultModel or chosenModelPath(p)):
            problem = _("Choose a model folder, or use the default model")
        elif p.outputUncertainty and p.outputUncertainty.GetID() == p.inputVolume.GetID():
            problem = _("The uncertainty output cannot be the input volume: choose another output or none")
        self.ui.applyButton.toolTip = problem or _("Segment the input volume")
        self.ui.applyButton.enabled = problem is None

    def onModelPathChanged(self, *args) -> None:
        self._modelCheckTimer.start()  # restarts while the user types

    def checkModelPath(self) -> None:
        """Report a wrong model folder before Apply (the Logic caches the check per folder state)."""
        useDefault = self.ui.useDefaultModelCheckBox.checked
        path = self.ui.modelPathLineEdit.currentPath
        message = None if (not useDefault and not path) else self.logic.bundleProblem(None if useDefault else path)
        self.ui.modelStatusLabel.text = message or ""
        self.ui.modelStatusLabel.visible = bool(message)

    def onApplyButton(self) -> None:
        if self.logic.isRunning():
            self.logic.cancel()  # kills the worker now; _onFinished reports it
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to start the segmentation."), waitCursor=True):
            if not self.logic.ensureDependencies():
                self.ui.statusLabel.text = self.logic.dependencyMessage
                return
            p = self._parameterNode
            self._resetResults()
            self.logic.processInBackground(
                p.inputVolume,
                segmentationNode=p.outputSegmentation,
                uncertaintyNode=p.outputUncertainty,
                modelPath=chosenModelPath(p),
                device=p.device,
                mcDropout=p.mcDropoutPasses,
                tta=p.testTimeAugmentation,
                opacity=p.uncertaintyOpacity,
                onProgress=self._onProgress,
                onOOD=self._onOOD,
                onNotice=self._onNotice,
                onFinished=self._onFinished,
            )
            self.ui.progressBar.visible = True
            self.ui.statusLabel.text = _("Starting…")
        self._checkCanApply()

    # --- reports from the worker (the Logic's timer calls these on the GUI thread) -------
    def _onProgress(self, stage: str, fraction: float) -> None:
        self.ui.progressBar.value = int(round(100 * fraction))
        self.ui.progressBar.format = f"{stage}: %p%"
        self.ui.statusLabel.text = _("Running: {stage}").format(stage=stage)

    def _onOOD(self, ood: dict, contexts: list) -> None:
        context = context_description(contexts, ood["nearest_context"])
        self.gauge.setResult(ood["score"], ood.get("threshold"), context)
        self.ui.oodCollapsibleButton.collapsed = False
        self.ui.oodWarningLabel.visible = bool(ood.get("is_ood"))
        if ood.get("is_ood"):
            self.ui.oodWarningLabel.text = _(
                "⚠ This image does not resemble the training data (nearest: {context}). "
                "Check the segmentation carefully; it may be unreliable."
            ).format(context=context)

    def _onNotice(self, text: str) -> None:
        self.ui.deviceNoticeLabel.text = text
        self.ui.deviceNoticeLabel.visible = True
        logging.warning(text)

    def _onFinished(self, outputs, result, error: Optional[BaseException], cancelled: bool) -> None:
        self.ui.progressBar.visible = False
        self._checkCanApply()
        if cancelled:
            self.ui.statusLabel.text = _("Cancelled; the scene was not changed.")
            self._resetResults()
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
        p = self._parameterNode or self.logic.getParameterNode()  # the user may have left the module meanwhile
        p.outputSegmentation, p.outputUncertainty = outputs.segmentation, outputs.uncertainty
        self._fillResults(result.report)
        report = result.report
        self.ui.statusLabel.text = _("Done in {seconds:.1f} s on {device}.").format(
            seconds=report.get("timings_s", {}).get("total", 0.0), device=report.get("device", "?")
        )

    def _resetResults(self) -> None:
        self.gauge.clear()
        for label in (
            self.ui.oodWarningLabel,
            self.ui.qualityLabel,
            self.ui.deviceNoticeLabel,
            self.ui.modelStatusLabel,
            self.ui.progressBar,
        ):
            label.visible = False
        self.ui.progressBar.value = 0
        self.ui.resultsTable.setRowCount(0)

    def _fillResults(self, report: dict) -> None:
        quality = quality_text(report)  # None with bundles that give no quality estimate
        self.ui.qualityLabel.text = _("Quality: {text}").format(text=quality) if quality else ""
        self.ui.qualityLabel.visible = bool(quality)
        flagged = bool((report.get("quality") or {}).get("flag"))
        self.ui.qualityLabel.styleSheet = "color: #e65100; font-weight: bold;" if flagged else ""
        volumes, uncertainties = report.get("volumes_ml", {}), report.get("mean_uncertainty_per_label", {})
        rows = [
            (name, volumes.get(name, 0.0), uncertainties.get(name))
            for _value, name in sorted((int(v), n) for v, n in report.get("labels", {}).items())
        ]
        table = self.ui.resultsTable
        table.setRowCount(len(rows))
        for row, (name, volume, uncertainty) in enumerate(rows):
            cells = [name, f"{volume:.1f}", "–" if uncertainty is None else f"{uncertainty:.3f}"]
            for column, text in enumerate(cells):
                item = qt.QTableWidgetItem(text)
                item.setFlags(qt.Qt.ItemIsSelectable | qt.Qt.ItemIsEnabled)
                table.setItem(row, column, item)


#
# MultiTaskSegTest
#
class MultiTaskSegTest(ScriptedLoadableModuleTest):
    """Runs the real logic with the default model on the shipped sample CT, on CPU.

    The checks live in MultiTaskSegMRML/selftest.py so that pytest runs the same body with
    slicer-core (Testing/test_slicer_selftest.py).
    """

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        self.setUp()
        self.test_MultiTaskSeg_segment_sample()

    def test_MultiTaskSeg_segment_sample(self) -> None:
        import importlib.util

        from MultiTaskSegMRML.selftest import default_bundle_missing_reason, run_selftest

        reason = default_bundle_missing_reason()
        if reason is None and importlib.util.find_spec("torch") is None and slicer.app.testingEnabled():
            # a build machine in testing mode: do not install gigabytes of PyTorch for a self-test
            reason = "PyTorch is not installed (testing mode installs nothing); install the PyTorch extension and torch"
        if reason:
            self.delayDisplay(_("Self-test skipped: {reason}").format(reason=reason))
            return
        logic = MultiTaskSegLogic()
        self.assertTrue(logic.ensureDependencies(askConfirmation=False), logic.dependencyMessage)
        run_selftest(slicer.mrmlScene, logic.process, DEFAULT_BUNDLE, SAMPLE_VOLUME, log=self.delayDisplay)
        self.delayDisplay(_("Test passed"))
