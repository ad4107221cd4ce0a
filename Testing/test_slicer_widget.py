"""The Widget's own rules, with its widgets mocked (Qt needs the application) and real MRML nodes:
a new input clears the pinned outputs, the uncertainty output is never the input, the opacity
applies at once, the quality estimate shows when present, a cancel resets the panel."""

from __future__ import annotations

import sys
from types import SimpleNamespace
from unittest import mock

import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed (pip install slicer-core)")

from slicer_shell import import_shell  # noqa: E402


@pytest.fixture
def widget(monkeypatch, scene):
    shell = import_shell(monkeypatch, scene)
    w = shell.MultiTaskSegWidget()
    names = [
        "applyButton",
        "modelPathLineEdit",
        "statusLabel",
        "progressBar",
        "oodWarningLabel",
        "qualityLabel",
        "deviceNoticeLabel",
        "modelStatusLabel",
        "resultsTable",
        "oodCollapsibleButton",
        "useDefaultModelCheckBox",
    ]
    w.ui = SimpleNamespace(**{n: mock.MagicMock(name=n) for n in names})
    w.gauge = mock.MagicMock(name="gauge")
    w.logic = shell.MultiTaskSegLogic()
    w._parameterNode = SimpleNamespace(
        inputVolume=None,
        outputSegmentation=None,
        outputUncertainty=None,
        useDefaultModel=True,
        modelPath=None,
        uncertaintyOpacity=0.4,
    )
    return w


def test_new_input_clears_pinned_outputs_and_input_is_never_the_uncertainty(widget, scene):
    p = widget._parameterNode
    first = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "patient 1")
    second = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "patient 2")
    p.inputVolume = first
    widget._onParameterChanged()
    p.outputSegmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "patient 1 segmentation")
    p.outputUncertainty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "patient 1 uncertainty")
    widget._onParameterChanged()
    assert p.outputSegmentation is not None  # same input: the chosen outputs stay
    p.inputVolume = second
    widget._onParameterChanged()
    assert p.outputSegmentation is None and p.outputUncertainty is None
    assert widget.ui.applyButton.enabled is True
    p.outputUncertainty = second
    widget._onParameterChanged()
    assert widget.ui.applyButton.enabled is False and "cannot be the input" in widget.ui.applyButton.toolTip


def test_opacity_applies_at_once(widget, scene):
    p = widget._parameterNode
    p.inputVolume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "ct")
    p.outputUncertainty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "ct uncertainty")
    composite = scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
    composite.SetForegroundVolumeID(p.outputUncertainty.GetID())
    widget._lastInputID = p.inputVolume.GetID()
    p.uncertaintyOpacity = 0.75
    widget._onParameterChanged()
    assert composite.GetForegroundOpacity() == pytest.approx(0.75)


def test_results_show_the_quality_estimate_when_present(widget):
    report = {
        "labels": {"1": "liver"},
        "volumes_ml": {"liver": 1500.0},
        "mean_uncertainty_per_label": {"liver": 0.1},
        "quality": {"expected_dice": 0.62, "per_structure": {"liver": 0.62}, "flag": True},
    }
    widget._fillResults(report)
    assert widget.ui.qualityLabel.text == "Quality: expected Dice 0.62 — review before use"
    assert widget.ui.qualityLabel.visible is True
    del report["quality"]
    widget._fillResults(report)  # today's bundles: no estimate, no label
    assert widget.ui.qualityLabel.visible is False
    widget.ui.resultsTable.setRowCount.assert_called_with(1)


def test_ood_gauge_and_cancel(widget):
    widget._onOOD(
        {"event": "ood", "score": 0.3, "threshold": None, "is_ood": False, "nearest_context": "AbdomenCT"},
        [{"name": "AbdomenCT", "modality": "CT", "region": "abdomen"}],
    )
    widget.gauge.setResult.assert_called_with(0.3, None, "AbdomenCT (CT, abdomen)")
    widget._onFinished(None, None, None, True)
    assert "Cancelled" in widget.ui.statusLabel.text
    widget.gauge.clear.assert_called()


def test_declined_install_is_a_calm_message(monkeypatch, widget):
    """pip_ensure (Slicer 5.12+) raises when the user declines: the Logic turns it into a note, not an error."""
    import types

    from MultiTaskSegShell import dependencies

    calls = []

    def pip_ensure(requirements, constraints=None, prompt_install=True, requester=None):
        calls.append((sorted(str(r) for r in requirements), prompt_install, requester))
        raise RuntimeError("User declined package installation")

    monkeypatch.setitem(sys.modules, "slicer.packaging", types.SimpleNamespace(pip_ensure=pip_ensure))
    monkeypatch.setattr(dependencies, "_importable", lambda requirement: False)
    assert widget.logic.ensureDependencies(askConfirmation=True) is False
    assert calls == [(["safetensors>=0.4", "scipy>=1.10"], True, "MultiTaskSeg")]
    assert "declined" in widget.logic.dependencyMessage and "Apply again" in widget.logic.dependencyMessage
    assert dependencies.version_tuple("2.13.0+cpu") == (2, 13) and dependencies.version_tuple("1.13.1") < (2, 1)
