"""Putting a segmentation result into the scene, and ``segment_node``: node → predict → nodes.

``load_steps`` is the one path that writes a result into the scene: ``segment_node`` (the Logic's
blocking call, in process or through the worker) runs it at once, the GUI's background run one
step per timer tick. Everything is computed before the scene is touched; a failure or a cancel
leaves it as it was.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Generator

import numpy as np
import SimpleITK as sitk
import slicer
import vtk

from MultiTaskSegLib.outputs import SegmentationResult
from MultiTaskSegLib.postprocessing import bounding_box
from MultiTaskSegLib.terminology import describe, known_terminology

from .display import ATTR_COLOR_TABLE, existing_color_table, set_uncertainty_opacity, show_results, show_uncertainty  # noqa: F401 (re-exported)
from .volumes import add_volume_node_from_image, image_data_from_array, node_ijk_to_ras, volume_node_to_image  # noqa: F401 (re-exported)

ATTR_OOD_SCORE = "MultiTaskSeg.OODScore"
ATTR_OOD_THRESHOLD = "MultiTaskSeg.OODThreshold"
ATTR_IS_OOD = "MultiTaskSeg.IsOOD"
ATTR_NEAREST_CONTEXT = "MultiTaskSeg.NearestContext"
ATTR_EXPECTED_DICE = "MultiTaskSeg.ExpectedDice"
ATTR_QUALITY_FLAG = "MultiTaskSeg.QualityFlag"
ATTR_CONTEXT = "MultiTaskSeg.Context"
LABEL_VALUE_TAG = "MultiTaskSeg.LabelValue"
TERMINOLOGY_CONTEXT = "Segmentation category and type - DICOM master list"

Predict = Callable[[sitk.Image], SegmentationResult]
LOAD_STEPS = 5  # load_steps: four yields, then the end


# --- terminology ---------------------------------------------------------------------
def terminology_string(entry: dict | None) -> str:
    """Slicer's serialized terminology entry ("context~category~type~modifier~…") from a code dict.

    Built with Slicer's own serializer so the format is exactly what the Segment Editor and
    DICOM SEG export expect.
    """
    if not entry:
        return ""
    term = slicer.vtkSlicerTerminologyEntry()
    term.SetTerminologyContextName(TERMINOLOGY_CONTEXT)
    for obj, key in (
        (term.GetCategoryObject(), "category"),
        (term.GetTypeObject(), "type"),
        (term.GetTypeModifierObject(), "modifier"),
    ):
        code = entry.get(key) or {}
        obj.SetCodingSchemeDesignator(str(code.get("scheme", "")))
        obj.SetCodeValue(str(code.get("code", "")))
        obj.SetCodeMeaning(str(code.get("meaning", "")))
    return slicer.vtkSlicerTerminologiesModuleLogic.SerializeTerminologyEntry(term)


def segment_specs(bundle_labels: list[dict]) -> list[dict]:
    """One spec per bundle label (value, name, colour 0..1, terminology string), in label order.

    Structures the project knows by name take the codes checked against Slicer's tables
    (terminology.py); others keep the bundle's entry, or a generic one.
    """
    specs = []
    for index, label in enumerate(sorted(bundle_labels, key=lambda l: int(l["value"]))):
        fallback = describe(label["name"], index)
        rgb = label.get("color") or fallback["color"]
        entry = known_terminology(label["name"]) or label.get("terminology") or fallback["terminology"]
        specs.append(
            {
                "value": int(label["value"]),
                "name": label["name"],
                "color": tuple(float(c) / 255.0 for c in rgb[:3]),
                "terminology": terminology_string(entry),
            }
        )
    return specs


# --- what the report says, as node attributes and as text ----------------------------
def result_attributes(report: dict) -> dict[str, str]:
    """Node attributes (DESIGN.md) from the report: the OOD result, and the quality estimate when present."""
    ood = report["ood"]
    threshold = ood.get("threshold")
    attributes = {
        ATTR_OOD_SCORE: f"{float(ood['score']):.6g}",
        ATTR_OOD_THRESHOLD: "inf" if threshold is None else f"{float(threshold):.6g}",
        ATTR_IS_OOD: "true" if ood.get("is_ood") else "false",
        ATTR_NEAREST_CONTEXT: str(ood.get("nearest_context", "")),
        ATTR_CONTEXT: str(report.get("context", "")),
    }
    quality = report.get("quality")
    if quality and quality.get("expected_dice") is not None:
        attributes[ATTR_EXPECTED_DICE] = f"{float(quality['expected_dice']):.4g}"
        attributes[ATTR_QUALITY_FLAG] = "true" if quality.get("flag") else "false"
    return attributes


def quality_text(report: dict) -> str | None:
    """'expected Dice 0.62 — review before use' (or without the warning); None when the bundle gives no estimate."""
    quality = report.get("quality")
    if not quality or quality.get("expected_dice") is None:
        return None
    text = f"expected Dice {float(quality['expected_dice']):.2f}"
    return text + (" — review before use" if quality.get("flag") else "")


# --- writing a result into the scene -------------------------------------------------
@dataclass
class OutputNodes:
    segmentation: slicer.vtkMRMLSegmentationNode
    uncertainty: slicer.vtkMRMLScalarVolumeNode


@dataclass
class _Prepared:
    """Everything computed before the scene is touched (a failure here changes nothing)."""

    labelmap: slicer.vtkOrientedImageData
    uncertainty: vtk.vtkImageData
    ijk_to_ras: vtk.vtkMatrix4x4
    specs: list[dict]
    attributes: dict[str, str]


def _prepare(
    input_node: slicer.vtkMRMLScalarVolumeNode, result: SegmentationResult, bundle_labels: list[dict]
) -> _Prepared:
    ijk_to_ras = vtk.vtkMatrix4x4()
    input_node.GetIJKToRASMatrix(ijk_to_ras)
    labels = sitk.GetArrayFromImage(result.labels).astype(np.uint8, copy=False)
    expected = tuple(input_node.GetImageData().GetDimensions()[::-1])
    if labels.shape != expected:
        raise ValueError(f"prediction grid {labels.shape} does not match the input volume {expected}")
    labelmap = slicer.vtkOrientedImageData()
    labelmap.ShallowCopy(_foreground_crop(labels))
    labelmap.SetImageToWorldMatrix(ijk_to_ras)
    uncertainty = image_data_from_array(sitk.GetArrayFromImage(result.uncertainty).astype(np.float32, copy=False))
    return _Prepared(labelmap, uncertainty, ijk_to_ras, segment_specs(bundle_labels), result_attributes(result.report))


def _foreground_crop(labels: np.ndarray) -> vtk.vtkImageData:
    """The label map cut to its foreground's bounding box, keeping its place through the extent
    (importing into a segmentation scans every voxel: a body CT is mostly background)."""
    box = bounding_box(labels)
    if box is None:
        return image_data_from_array(labels)
    z, y, x = box
    image_data = image_data_from_array(labels[box])
    image_data.SetExtent(x.start, x.stop - 1, y.start, y.stop - 1, z.start, z.stop - 1)
    return image_data


def _place_beside(scene: slicer.vtkMRMLScene, input_node, nodes: list) -> None:
    """Put ``nodes`` under the input's parent in the subject hierarchy (a no-op without one)."""
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    if sh is None:
        return
    input_item = sh.GetItemByDataNode(input_node)
    parent = sh.GetItemParent(input_item) if input_item else sh.GetSceneItemID()
    for node in nodes:
        item = sh.GetItemByDataNode(node)
        if item:
            sh.SetItemParent(item, parent)
        else:
            sh.CreateItem(parent, node)


def load_steps(
    scene: slicer.vtkMRMLScene,
    input_node: slicer.vtkMRMLScalarVolumeNode,
    get_result: Callable[[], SegmentationResult],
    bundle_labels: list[dict],
    segmentation_node: slicer.vtkMRMLSegmentationNode | None = None,
    uncertainty_node: slicer.vtkMRMLScalarVolumeNode | None = None,
) -> Generator[str, None, tuple[OutputNodes, SegmentationResult]]:
    """Put a result into the scene in short steps; yields the name of each step done, returns the nodes.

    The GUI runs one step per timer tick so that no tick blocks Slicer for long. The first three
    steps leave the scene alone (a new segmentation is built in a scratch scene); a reused
    segmentation node is refilled only in the last step. Closing the generator (a cancel) or an
    error at any point removes the nodes it created and gives a reused uncertainty node its
    previous voxels back. Given output nodes are reused (replaced), others created.
    """
    if uncertainty_node is not None and uncertainty_node.GetID() == input_node.GetID():
        raise ValueError("the uncertainty output cannot be the input volume; choose another output or none")
    result = get_result()
    yield "read"
    prepared = _prepare(input_node, result, bundle_labels)
    yield "prepared"
    built = None
    if segmentation_node is None:
        scratch = slicer.vtkMRMLScene()  # import needs a scene (display nodes); not the user's yet
        built = scratch.AddNode(slicer.vtkMRMLSegmentationNode())
        _fill_segmentation(built, input_node, prepared)
        scratch.RemoveNode(built)  # keeps its segments
    yield "segments built"
    base = input_node.GetName() or "volume"
    created: list = []
    restore_uncertainty = None
    had_color_table = existing_color_table(scene) is not None
    try:
        if uncertainty_node is None:
            uncertainty_node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", f"{base} uncertainty")
            created.append(uncertainty_node)
        else:
            old_matrix = vtk.vtkMatrix4x4()
            uncertainty_node.GetIJKToRASMatrix(old_matrix)
            restore_uncertainty = (uncertainty_node.GetImageData(), old_matrix)
        uncertainty_node.SetIJKToRASMatrix(prepared.ijk_to_ras)
        uncertainty_node.SetAndObserveImageData(prepared.uncertainty)
        uncertainty_node.SetAttribute("MultiTaskSeg.Uncertainty", "normalised predictive entropy [0, 1]")
        show_uncertainty(uncertainty_node, scene)
        yield "uncertainty loaded"
        if built is not None:
            built.SetName(scene.GenerateUniqueName(f"{base} segmentation"))
            segmentation_node = scene.AddNode(built)
            created.append(segmentation_node)
        else:
            _fill_segmentation(segmentation_node, input_node, prepared)
        segmentation_node.CreateDefaultDisplayNodes()
        transform_id = input_node.GetTransformNodeID()
        for node in (segmentation_node, uncertainty_node):
            node.SetAndObserveTransformNodeID(transform_id)
        _place_beside(scene, input_node, created)
    except BaseException:  # GeneratorExit (a cancel) included
        for node in created:
            _remove_with_display(scene, node)
        table = existing_color_table(scene)
        if table is not None and not had_color_table:
            scene.RemoveNode(table)
        if restore_uncertainty is not None:
            uncertainty_node.SetAndObserveImageData(restore_uncertainty[0])
            uncertainty_node.SetIJKToRASMatrix(restore_uncertainty[1])
        raise
    return OutputNodes(segmentation_node, uncertainty_node), result


def _remove_with_display(scene: slicer.vtkMRMLScene, node) -> None:
    """Remove a node this load created, with the display nodes made for it."""
    displays = [node.GetNthDisplayNode(i) for i in range(node.GetNumberOfDisplayNodes())]
    scene.RemoveNode(node)
    for display in displays:
        if display is not None and display.GetScene() is not None:
            scene.RemoveNode(display)


def load_result(
    scene: slicer.vtkMRMLScene,
    input_node: slicer.vtkMRMLScalarVolumeNode,
    result: SegmentationResult,
    bundle_labels: list[dict],
    segmentation_node: slicer.vtkMRMLSegmentationNode | None = None,
    uncertainty_node: slicer.vtkMRMLScalarVolumeNode | None = None,
) -> OutputNodes:
    """Put a result into the scene at once (``load_steps`` run to the end)."""
    steps = load_steps(scene, input_node, lambda: result, bundle_labels, segmentation_node, uncertainty_node)
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value[0]


def _fill_segmentation(node: slicer.vtkMRMLSegmentationNode, input_node, prepared: _Prepared) -> None:
    """Replace the node's segments by the named, coded segments of the result (one shared labelmap)."""
    was_modified = node.StartModify()
    try:
        segmentation = node.GetSegmentation()
        segmentation.RemoveAllSegments()
        node.SetReferenceImageGeometryParameterFromVolumeNode(input_node)
        if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(prepared.labelmap, node):
            raise RuntimeError("importing the label map into the segmentation failed")
        # imported segments are named after their label value; map them back to the bundle's labels
        by_value = {}
        for segment_id in list(segmentation.GetSegmentIDs()):
            by_value[segmentation.GetSegment(segment_id).GetLabelValue()] = segment_id
        for index, spec in enumerate(prepared.specs):
            segment_id = by_value.pop(spec["value"], None)
            if segment_id is None:  # structure not found in this image: keep an empty segment
                segment_id = segmentation.AddEmptySegment("", spec["name"], spec["color"])
            segment = segmentation.GetSegment(segment_id)
            segment.SetName(spec["name"])
            segment.SetColor(*spec["color"])
            segment.SetTag(LABEL_VALUE_TAG, str(spec["value"]))
            if spec["terminology"]:  # the tag, not SetTerminology (Slicer 5.10+ only)
                segment.SetTag(segment.GetTerminologyEntryTagName(), spec["terminology"])
            segmentation.SetSegmentIndex(segment_id, index)
        for segment_id in by_value.values():  # label values the bundle does not name (should not happen)
            segmentation.RemoveSegment(segment_id)
        for key in list(node.GetAttributeNames() or []):  # e.g. no quality estimate this time
            if key.startswith("MultiTaskSeg.") and key not in prepared.attributes:
                node.RemoveAttribute(key)
        for key, value in prepared.attributes.items():
            node.SetAttribute(key, value)
    finally:
        node.EndModify(was_modified)


def segment_label_value(segment: slicer.vtkSegment) -> int | None:
    """The bundle label value a segment was written for (None for segments not made here)."""
    value = vtk.reference("")
    if not segment.GetTag(LABEL_VALUE_TAG, value):
        return None
    return int(str(value))


def segment_terminology(segment: slicer.vtkSegment) -> str:
    """The segment's serialized terminology entry ('' if none), read the way every Slicer from 5.4 can."""
    value = vtk.reference("")
    return str(value) if segment.GetTag(segment.GetTerminologyEntryTagName(), value) else ""


# --- the whole run -------------------------------------------------------------------
def segment_node(
    scene: slicer.vtkMRMLScene,
    input_node: slicer.vtkMRMLScalarVolumeNode,
    predict: Predict,
    bundle_labels: list[dict],
    segmentation_node: slicer.vtkMRMLSegmentationNode | None = None,
    uncertainty_node: slicer.vtkMRMLScalarVolumeNode | None = None,
) -> tuple[OutputNodes, SegmentationResult]:
    """Node → predict → nodes, blocking. ``predict`` maps the node's voxels to a SegmentationResult
    (in this process, or through the worker); the scene is touched only after it returned, so a
    CancelledError raised inside ``predict`` leaves the scene as it was. (The GUI's background run
    starts the worker itself and loads its outputs with ``load_steps``, one step per timer tick.)
    """
    result = predict(volume_node_to_image(input_node))
    outputs = load_result(scene, input_node, result, bundle_labels, segmentation_node, uncertainty_node)
    return outputs, result
