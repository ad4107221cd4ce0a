"""MRML adapter: Slicer scene nodes ↔ the core's SimpleITK images and Prediction.

Takes the scene as an explicit argument and uses only slicer-core classes (no
``slicer.mrmlScene`` / ``slicer.app`` / ``slicer.modules``), so it runs both inside
Slicer and under pytest with the ``slicer-core`` wheel. Only the Slicer shell and its
tests import this module; the core package never does (DESIGN.md layers).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import SimpleITK as sitk
import slicer
import vtk
from vtk.util import numpy_support

from .errors import InputVolumeError
from .ood import OODResult
from .predictor import Prediction, PredictOptions, Predictor
from .terminology import describe
from .volume_io import validate_volume

# RAS (Slicer) ↔ LPS (ITK): flip the first two axes.
_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])

ATTR_OOD_SCORE = "MultiTaskSeg.OODScore"
ATTR_OOD_THRESHOLD = "MultiTaskSeg.OODThreshold"
ATTR_IS_OOD = "MultiTaskSeg.IsOOD"
ATTR_NEAREST_CONTEXT = "MultiTaskSeg.NearestContext"
ATTR_CONTEXT = "MultiTaskSeg.Context"
ATTR_COLOR_TABLE = "MultiTaskSeg.UncertaintyColorTable"
LABEL_VALUE_TAG = "MultiTaskSeg.LabelValue"
COLOR_TABLE_NAME = "MultiTaskSeg uncertainty"
TERMINOLOGY_CONTEXT = "Segmentation category and type - DICOM master list"


# --- geometry ------------------------------------------------------------------------
def _matrix_to_numpy(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def _numpy_to_matrix(array: np.ndarray) -> vtk.vtkMatrix4x4:
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r, c]))
    return matrix


def ijk_to_ras_from_image(image: sitk.Image) -> np.ndarray:
    """4×4 IJK→RAS of an ITK image (LPS physical space)."""
    direction = np.array(image.GetDirection()).reshape(3, 3)
    m = np.eye(4)
    m[:3, :3] = _RAS_TO_LPS @ direction @ np.diag(image.GetSpacing())
    m[:3, 3] = _RAS_TO_LPS @ np.array(image.GetOrigin())
    return m


def set_image_geometry_from_ijk_to_ras(image: sitk.Image, ijk_to_ras: np.ndarray) -> None:
    """Origin, spacing and direction (LPS) of ``image`` from a 4×4 IJK→RAS (oblique allowed)."""
    lps = _RAS_TO_LPS @ ijk_to_ras[:3, :3]
    spacing = np.linalg.norm(lps, axis=0)
    if np.any(spacing <= 0):
        raise InputVolumeError("the volume's IJK-to-RAS matrix is degenerate (zero spacing)")
    image.SetSpacing([float(s) for s in spacing])
    image.SetDirection([float(v) for v in (lps / spacing).ravel()])
    image.SetOrigin([float(v) for v in _RAS_TO_LPS @ ijk_to_ras[:3, 3]])


def node_ijk_to_ras(node: slicer.vtkMRMLVolumeNode) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return _matrix_to_numpy(matrix)


# --- volume node → SimpleITK ---------------------------------------------------------
def volume_node_to_image(node: slicer.vtkMRMLScalarVolumeNode) -> sitk.Image:
    """A copy of the node's voxels as a SimpleITK image in LPS, in the node's local frame.

    Parent transforms are not applied: the outputs are placed under the same transform
    (see ``write_prediction``), so the segmentation stays aligned with its input.
    """
    name = node.GetName() if node is not None else "input"
    if node is None or not node.IsA("vtkMRMLScalarVolumeNode") or node.IsA("vtkMRMLLabelMapVolumeNode"):
        raise InputVolumeError(f"{name}: a scalar volume node is needed")
    image_data = node.GetImageData()
    if image_data is None or image_data.GetPointData() is None or image_data.GetPointData().GetScalars() is None:
        raise InputVolumeError(f"{name}: the volume has no voxels (empty node); load an image first")
    components = image_data.GetNumberOfScalarComponents()
    if components != 1 or node.IsA("vtkMRMLVectorVolumeNode"):
        raise InputVolumeError(f"{name}: image has {components} components per voxel; a single-channel (scalar) "
                               "volume is needed — extract one channel first (Vector to Scalar Volume module)")
    dims = image_data.GetDimensions()
    if 0 in dims:
        raise InputVolumeError(f"{name}: image is empty (size {dims})")
    array = numpy_support.vtk_to_numpy(image_data.GetPointData().GetScalars()).reshape(dims[::-1])
    image = sitk.GetImageFromArray(np.array(array, copy=True))
    set_image_geometry_from_ijk_to_ras(image, node_ijk_to_ras(node))
    validate_volume(image, name)
    return image


def _image_data_from_array(array: np.ndarray) -> vtk.vtkImageData:
    """vtkImageData (origin 0, spacing 1: Slicer keeps the geometry in the node) from a (z, y, x) array."""
    array = np.ascontiguousarray(array)
    image_data = vtk.vtkImageData()
    image_data.SetDimensions(array.shape[2], array.shape[1], array.shape[0])
    scalars = numpy_support.numpy_to_vtk(array.ravel(), deep=True)
    image_data.GetPointData().SetScalars(scalars)
    return image_data


def add_volume_node_from_image(scene: slicer.vtkMRMLScene, image: sitk.Image, name: str) -> slicer.vtkMRMLScalarVolumeNode:
    """Add a scalar volume node holding ``image`` (used by the self-test and the tests)."""
    if image.GetNumberOfComponentsPerPixel() != 1:
        node = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", name)
    else:
        node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    node.SetIJKToRASMatrix(_numpy_to_matrix(ijk_to_ras_from_image(image)))
    node.SetAndObserveImageData(_image_data_from_array(sitk.GetArrayFromImage(image)))
    node.CreateDefaultDisplayNodes()
    return node


# --- terminology ---------------------------------------------------------------------
def terminology_string(entry: dict | None) -> str:
    """Slicer's serialized terminology entry from a bundle label's ``terminology`` dict.

    Built with Slicer's own serializer so the format ("context~cat~type~…") is exactly
    what the Segment Editor and DICOM SEG export expect.
    """
    if not entry:
        return ""
    term = slicer.vtkSlicerTerminologyEntry()
    term.SetTerminologyContextName(TERMINOLOGY_CONTEXT)
    for obj, key in ((term.GetCategoryObject(), "category"), (term.GetTypeObject(), "type")):
        code = entry.get(key) or {}
        obj.SetCodingSchemeDesignator(str(code.get("scheme", "")))
        obj.SetCodeValue(str(code.get("code", "")))
        obj.SetCodeMeaning(str(code.get("meaning", "")))
    return slicer.vtkSlicerTerminologiesModuleLogic.SerializeTerminologyEntry(term)


def segment_specs(bundle_labels: list[dict]) -> list[dict]:
    """One spec per bundle label (value, name, colour 0..1, terminology string), in label order."""
    specs = []
    for index, label in enumerate(sorted(bundle_labels, key=lambda l: int(l["value"]))):
        fallback = describe(label["name"], index)
        rgb = label.get("color") or fallback["color"]
        specs.append({"value": int(label["value"]), "name": label["name"],
                      "color": tuple(float(c) / 255.0 for c in rgb[:3]),
                      "terminology": terminology_string(label.get("terminology") or fallback["terminology"])})
    return specs


def ood_attributes(ood: OODResult) -> dict[str, str]:
    return {ATTR_OOD_SCORE: f"{ood.score:.6g}", ATTR_OOD_THRESHOLD: f"{ood.threshold:.6g}",
            ATTR_IS_OOD: "true" if ood.is_ood else "false", ATTR_NEAREST_CONTEXT: ood.nearest_context}


# --- writing a prediction into the scene --------------------------------------------
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


def _prepare(input_node: slicer.vtkMRMLScalarVolumeNode, prediction: Prediction, bundle_labels: list[dict]) -> _Prepared:
    ijk_to_ras = vtk.vtkMatrix4x4()
    input_node.GetIJKToRASMatrix(ijk_to_ras)
    labels = sitk.GetArrayFromImage(prediction.labels).astype(np.uint8, copy=False)
    expected = input_node.GetImageData().GetDimensions()[::-1]
    if labels.shape != tuple(expected):
        raise ValueError(f"prediction grid {labels.shape} does not match the input volume {tuple(expected)}")
    labelmap = slicer.vtkOrientedImageData()
    labelmap.ShallowCopy(_image_data_from_array(labels))
    labelmap.SetImageToWorldMatrix(ijk_to_ras)
    uncertainty = _image_data_from_array(sitk.GetArrayFromImage(prediction.uncertainty).astype(np.float32, copy=False))
    attributes = {**ood_attributes(prediction.ood), ATTR_CONTEXT: prediction.context}
    return _Prepared(labelmap, uncertainty, ijk_to_ras, segment_specs(bundle_labels), attributes)


def uncertainty_color_table(scene: slicer.vtkMRMLScene) -> slicer.vtkMRMLColorTableNode:
    """The module's uncertainty colour table (transparent-dark → yellow), created once per scene."""
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLColorTableNode")):
        node = scene.GetNthNodeByClass(i, "vtkMRMLColorTableNode")
        if node.GetAttribute(ATTR_COLOR_TABLE) == "1":
            return node
    node = slicer.vtkMRMLColorTableNode()
    node.SetName(COLOR_TABLE_NAME)
    node.SetTypeToUser()
    node.SetAttribute(ATTR_COLOR_TABLE, "1")
    n = 256
    node.SetNumberOfColors(n)
    node.GetLookupTable().SetRange(0.0, 1.0)
    # inferno-like ramp; low uncertainty transparent so the anatomy shows through
    anchors = np.array([[0.0, 0.0, 0.0, 0.02], [0.25, 0.34, 0.06, 0.43], [0.5, 0.73, 0.21, 0.33],
                        [0.75, 0.98, 0.55, 0.04], [1.0, 0.99, 1.0, 0.64]])
    for i in range(n):
        t = i / (n - 1)
        rgb = [np.interp(t, anchors[:, 0], anchors[:, k]) for k in (1, 2, 3)]
        node.SetColor(i, f"{t:.3f}", rgb[0], rgb[1], rgb[2], float(min(1.0, t * 4.0)))
    node.SetHideFromEditors(False)
    scene.AddNode(node)
    return node


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


def write_prediction(scene: slicer.vtkMRMLScene, input_node: slicer.vtkMRMLScalarVolumeNode, prediction: Prediction,
                     bundle_labels: list[dict], segmentation_node: slicer.vtkMRMLSegmentationNode | None = None,
                     uncertainty_node: slicer.vtkMRMLScalarVolumeNode | None = None) -> OutputNodes:
    """Put a prediction into the scene; given output nodes are reused (replaced), others created.

    Everything is computed first; if writing fails, nodes created here are removed again.
    """
    prepared = _prepare(input_node, prediction, bundle_labels)
    base = input_node.GetName() or "volume"
    created = []
    try:
        if segmentation_node is None:
            segmentation_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{base} segmentation")
            created.append(segmentation_node)
        if uncertainty_node is None:
            uncertainty_node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", f"{base} uncertainty")
            created.append(uncertainty_node)
        _fill_segmentation(segmentation_node, input_node, prepared)
        _fill_uncertainty(scene, uncertainty_node, prepared)
        transform_id = input_node.GetTransformNodeID()
        for node in (segmentation_node, uncertainty_node):
            node.SetAndObserveTransformNodeID(transform_id)
        _place_beside(scene, input_node, created)
    except Exception:
        for node in created:
            scene.RemoveNode(node)
        raise
    return OutputNodes(segmentation_node, uncertainty_node)


def _fill_segmentation(node: slicer.vtkMRMLSegmentationNode, input_node, prepared: _Prepared) -> None:
    wasModified = node.StartModify()
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
            if spec["terminology"]:
                segment.SetTerminology(spec["terminology"])
            segmentation.SetSegmentIndex(segment_id, index)
        for segment_id in by_value.values():  # label values the bundle does not name (should not happen)
            segmentation.RemoveSegment(segment_id)
        for key, value in prepared.attributes.items():
            node.SetAttribute(key, value)
        node.CreateDefaultDisplayNodes()
    finally:
        node.EndModify(wasModified)


def _fill_uncertainty(scene: slicer.vtkMRMLScene, node: slicer.vtkMRMLScalarVolumeNode, prepared: _Prepared) -> None:
    node.SetIJKToRASMatrix(prepared.ijk_to_ras)
    node.SetAndObserveImageData(prepared.uncertainty)
    node.SetAttribute("MultiTaskSeg.Uncertainty", "normalised predictive entropy [0, 1]")
    node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    if display is not None:
        display.SetAndObserveColorNodeID(uncertainty_color_table(scene).GetID())
        display.AutoWindowLevelOff()
        display.SetWindowLevelMinMax(0.0, 1.0)


def segment_label_value(segment: slicer.vtkSegment) -> int | None:
    """The bundle label value a segment was written for (None for segments not made here)."""
    value = vtk.reference("")
    if not segment.GetTag(LABEL_VALUE_TAG, value):
        return None
    return int(str(value))


# --- the whole run -------------------------------------------------------------------
def segment_volume_node(scene: slicer.vtkMRMLScene, input_node: slicer.vtkMRMLScalarVolumeNode, predictor: Predictor,
                        options: PredictOptions | None = None, progress: Callable[[str, float], None] | None = None,
                        on_ood: Callable[[OODResult], None] | None = None,
                        segmentation_node: slicer.vtkMRMLSegmentationNode | None = None,
                        uncertainty_node: slicer.vtkMRMLScalarVolumeNode | None = None) -> tuple[OutputNodes, Prediction]:
    """Blocking: predict on the node's voxels, then write the results (scene touched last).

    A CancelledError raised from ``progress`` propagates before the scene is changed.
    """
    image = volume_node_to_image(input_node)
    prediction = predictor.predict(image, options, progress=progress, on_ood=on_ood)
    outputs = write_prediction(scene, input_node, prediction, predictor.bundle.labels, segmentation_node, uncertainty_node)
    return outputs, prediction


# --- display (optional, tolerates the absence of the application) -------------------
def show_results(scene: slicer.vtkMRMLScene, input_node, outputs: OutputNodes, opacity: float = 0.4) -> None:
    """Input as background and uncertainty as foreground of every slice view; segmentation visible.

    Works on the scene's slice composite nodes, which exist only where views exist; without
    the application (tests, batch) there are none and this does nothing harmful.
    """
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
        composite = scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode")
        composite.SetBackgroundVolumeID(input_node.GetID())
        composite.SetForegroundVolumeID(outputs.uncertainty.GetID())
        composite.SetForegroundOpacity(opacity)
    display = outputs.segmentation.GetDisplayNode()
    if display is not None:
        display.SetVisibility(True)
    app = getattr(slicer, "app", None)
    if app is not None and hasattr(slicer.util, "resetSliceViews"):
        try:
            slicer.util.resetSliceViews()
        except Exception:  # no layout manager (e.g. Slicer started without main window)
            pass
