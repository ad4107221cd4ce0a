"""The MRML adapter with the real Slicer core libraries (slicer-core from PyPI): a real scene,
real volume / segmentation / storage nodes and Slicer's segmentation logic."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed (pip install slicer-core)")
vtk = pytest.importorskip("vtk")

from mrml_helpers import exported_labels, node_ids  # noqa: E402
from MultiTaskSegLib.errors import CancelledError, InputVolumeError  # noqa: E402
from MultiTaskSegLib.outputs import SegmentationResult  # noqa: E402
from MultiTaskSegLib.predictor import PredictOptions, Predictor  # noqa: E402
from MultiTaskSegMRML import adapter  # noqa: E402

CPU = PredictOptions(device="cpu")


def segment(scene, node, predictor, progress=None, **outputs):
    """adapter.segment_node with an in-process prediction (what the Logic's blocking call does)."""

    def predict(image):
        return SegmentationResult.from_prediction(predictor.predict(image, CPU, progress=progress))

    return adapter.segment_node(scene, node, predict, predictor.bundle.labels, **outputs)


def oblique_image() -> sitk.Image:
    """Small anisotropic volume with an oblique, left-handed (flipped) LPS direction and a blob."""
    z, y, x = np.mgrid[:14, :20, :18]
    blob = ((z - 7) / 5.0) ** 2 + ((y - 9) / 7.0) ** 2 + ((x - 10) / 6.0) ** 2 < 1.0
    rng = np.random.default_rng(1)
    array = (blob * 180 - 60 + rng.normal(0, 15, blob.shape)).astype(np.int16)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((2.5, 3.0, 5.0))
    image.SetOrigin((-31.0, 12.5, 47.0))
    a, b = math.radians(25), math.radians(10)
    rz = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
    image.SetDirection((rz @ rx @ np.diag([1.0, 1.0, -1.0])).ravel().tolist())
    return image


@pytest.fixture(scope="module")
def predictor(untrained_bundle):
    return Predictor(untrained_bundle, "cpu")


@pytest.fixture
def scene_and_input():
    scene = slicer.vtkMRMLScene()
    node = adapter.add_volume_node_from_image(scene, oblique_image(), "patient 1")
    return scene, node


def test_geometry_round_trip_oblique_anisotropic(scene_and_input):
    _, node = scene_and_input
    original = oblique_image()
    back = adapter.volume_node_to_image(node)
    assert np.allclose(back.GetSpacing(), original.GetSpacing())
    assert np.allclose(back.GetOrigin(), original.GetOrigin())
    assert np.allclose(back.GetDirection(), original.GetDirection())
    assert np.array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(original))
    # IJK→RAS really is non-trivial (RAS = flipped LPS)
    m = adapter.node_ijk_to_ras(node)
    assert not np.allclose(m[:3, :3], np.diag(np.diag(m[:3, :3])))


def test_segmentation_matches_mtseg_predict(tmp_path, untrained_bundle, predictor, scene_and_input):
    scene, node = scene_and_input
    # save the node with Slicer's own writer, so the CLI reads what Slicer would hand over
    path = tmp_path / "patient1.nrrd"
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(path))
    assert storage.WriteData(node)
    scene.RemoveNode(storage)
    from MultiTaskSegTraining.cli import main

    rc = main(
        [
            "predict",
            "--bundle",
            str(untrained_bundle.path),
            str(path),
            "--output-dir",
            str(tmp_path / "out"),
            "--device",
            "cpu",
            "--quiet",
        ]
    )
    assert rc == 0
    cli_labels = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / "patient1_seg.nii.gz")))
    report = json.loads((tmp_path / "out" / "patient1.json").read_text(encoding="utf-8"))

    outputs, result = segment(scene, node, predictor)
    seg_node = outputs.segmentation
    assert seg_node.GetName() == "patient 1 segmentation"
    assert np.array_equal(exported_labels(scene, seg_node, node), cli_labels)
    assert len(np.unique(cli_labels)) > 1, "test volume should give at least one structure"

    # one segment per label, with name, colour and Slicer-format terminology, in label order
    segmentation = seg_node.GetSegmentation()
    segments = [segmentation.GetNthSegment(i) for i in range(segmentation.GetNumberOfSegments())]
    assert [s.GetName() for s in segments] == [l["name"] for l in untrained_bundle.labels]
    liver = segments[0]
    assert np.allclose(liver.GetColor(), np.array(untrained_bundle.labels[0]["color"]) / 255.0)
    assert "SCT^10200004^Liver" in adapter.segment_terminology(liver)
    assert adapter.segment_terminology(liver).split("~")[1] == "SCT^123037004^Anatomical Structure"
    # reference geometry from the input
    ref = seg_node.GetSegmentation().GetConversionParameter("Reference image geometry")
    assert ref, "segmentation has no reference geometry"

    # OOD attributes agree with the CLI report
    assert float(seg_node.GetAttribute(adapter.ATTR_OOD_SCORE)) == pytest.approx(report["ood"]["score"], rel=1e-4)
    assert float(seg_node.GetAttribute(adapter.ATTR_OOD_THRESHOLD)) == pytest.approx(report["ood"]["threshold"])
    assert seg_node.GetAttribute(adapter.ATTR_IS_OOD) == ("true" if report["ood"]["is_ood"] else "false")
    assert seg_node.GetAttribute(adapter.ATTR_NEAREST_CONTEXT) == report["ood"]["nearest_context"]

    # uncertainty volume: float32 on the input's geometry, with the module's colour table
    unc = outputs.uncertainty
    assert unc.GetName() == "patient 1 uncertainty"
    assert np.allclose(adapter.node_ijk_to_ras(unc), adapter.node_ijk_to_ras(node))
    assert unc.GetImageData().GetDimensions() == node.GetImageData().GetDimensions()
    assert unc.GetImageData().GetScalarType() == vtk.VTK_FLOAT
    values = vtk.util.numpy_support.vtk_to_numpy(unc.GetImageData().GetPointData().GetScalars())
    assert values.min() >= 0.0 and values.max() <= 1.0
    cli_unc = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / "patient1_uncertainty.nii.gz")))
    # the CLI's file holds uint8 steps of 1/255 (scl_slope); Slicer keeps the float32 map
    assert np.allclose(values.reshape(cli_unc.shape), cli_unc, atol=1 / 510 + 1e-6)
    assert unc.GetDisplayNode().GetColorNode().GetAttribute(adapter.ATTR_COLOR_TABLE) == "1"

    # beside the input in the subject hierarchy
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    parent = sh.GetItemParent(sh.GetItemByDataNode(node)) if sh.GetItemByDataNode(node) else sh.GetSceneItemID()
    assert sh.GetItemParent(sh.GetItemByDataNode(seg_node)) == parent
    assert sh.GetItemParent(sh.GetItemByDataNode(unc)) == parent

    # results table data
    assert set(result.report["volumes_ml"]) == {l["name"] for l in untrained_bundle.labels}
    # today's bundle gives no quality estimate: no quality attributes
    assert seg_node.GetAttribute(adapter.ATTR_EXPECTED_DICE) is None


def test_rerun_with_chosen_outputs_does_not_duplicate(predictor, scene_and_input):
    scene, node = scene_and_input
    first, _ = segment(scene, node, predictor)
    before = node_ids(scene)
    second, _ = segment(
        scene, node, predictor, segmentation_node=first.segmentation, uncertainty_node=first.uncertainty
    )
    assert node_ids(scene) == before
    assert second.segmentation is first.segmentation and second.uncertainty is first.uncertainty
    assert first.segmentation.GetSegmentation().GetNumberOfSegments() == len(predictor.bundle.labels)
    # without chosen outputs, existing nodes are left alone and new ones are made
    third, _ = segment(scene, node, predictor)
    assert third.segmentation.GetID() != first.segmentation.GetID()
    assert scene.GetNumberOfNodesByClass("vtkMRMLColorTableNode") == 1  # shared colour table


def test_cancel_leaves_scene_unchanged(predictor, scene_and_input):
    scene, node = scene_and_input
    before = node_ids(scene)
    calls = []

    def cancel_during_inference(stage: str, fraction: float) -> None:
        calls.append(stage)
        if stage not in ("preprocess",):
            raise CancelledError()

    with pytest.raises(CancelledError):
        segment(scene, node, predictor, progress=cancel_during_inference)
    assert node_ids(scene) == before
    assert len(calls) >= 2


@pytest.mark.parametrize("reuse", [False, True])
def test_loading_in_steps_can_be_cancelled_at_every_step(predictor, scene_and_input, reuse):
    """The GUI loads outputs one step per timer tick; closing the steps (Cancel) at any point
    removes what was created and gives a reused uncertainty node its previous voxels back."""
    from vtk.util import numpy_support

    scene, node = scene_and_input
    result = SegmentationResult.from_prediction(predictor.predict(adapter.volume_node_to_image(node), CPU))
    outputs = {}
    if reuse:
        first = adapter.load_result(scene, node, result, predictor.bundle.labels)
        first.uncertainty.SetAndObserveImageData(adapter.image_data_from_array(np.zeros((3, 4, 5), np.float32)))
        old_voxels = first.uncertainty.GetImageData()
        outputs = {"segmentation_node": first.segmentation, "uncertainty_node": first.uncertainty}
    stages = ["read", "prepared", "segments built", "uncertainty loaded"]
    for cancel_after in range(1, len(stages) + 1):
        steps = adapter.load_steps(scene, node, lambda: result, predictor.bundle.labels, **outputs)
        before = node_ids(scene)
        assert [next(steps) for _ in range(cancel_after)] == stages[:cancel_after]
        steps.close()  # what Cancel does between two ticks
        assert node_ids(scene) == before, cancel_after
        if reuse:
            assert outputs["uncertainty_node"].GetImageData() is old_voxels
            shape = numpy_support.vtk_to_numpy(old_voxels.GetPointData().GetScalars()).shape
            assert shape == (60,)
    # run to the end: the same nodes as the one-call load
    steps = adapter.load_steps(scene, node, lambda: result, predictor.bundle.labels, **outputs)
    with pytest.raises(StopIteration) as done:
        while True:
            next(steps)
    loaded, _ = done.value.value
    assert loaded.segmentation.GetSegmentation().GetNumberOfSegments() == len(predictor.bundle.labels)
    assert np.array_equal(exported_labels(scene, loaded.segmentation, node), sitk.GetArrayFromImage(result.labels))


@pytest.mark.parametrize("kind", ["slice2d", "vector", "empty", "constant", "spacing_in_cm"])
def test_bad_input_gives_clear_error_and_no_nodes(predictor, kind):
    scene = slicer.vtkMRMLScene()
    if kind == "slice2d":
        node = adapter.add_volume_node_from_image(
            scene, sitk.GetImageFromArray(np.arange(1 * 8 * 9, dtype=np.int16).reshape(1, 8, 9)), "slice"
        )
        message = "single slice"
    elif kind == "vector":
        rgb = sitk.GetImageFromArray(np.arange(4 * 5 * 6 * 3, dtype=np.uint8).reshape(4, 5, 6, 3), isVector=True)
        node = adapter.add_volume_node_from_image(scene, rgb, "colour")
        assert node.IsA("vtkMRMLVectorVolumeNode")
        message = "components per voxel"
    elif kind == "empty":
        node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "nothing")
        message = "no voxels"
    elif kind == "spacing_in_cm":  # a node whose spacing says 40 mm voxels: a 256-voxel row spans 10 m
        image = sitk.GetImageFromArray(np.arange(8 * 256 * 256, dtype=np.int16).reshape(8, 256, 256))
        image.SetSpacing((40.0, 40.0, 40.0))
        node = adapter.add_volume_node_from_image(scene, image, "metres")
        message = "check the voxel spacing"
    else:
        node = adapter.add_volume_node_from_image(scene, sitk.Image(6, 6, 6, sitk.sitkInt16), "zeros")
        message = "empty"
    before = node_ids(scene)
    with pytest.raises(InputVolumeError, match=message):
        segment(scene, node, predictor)
    assert node_ids(scene) == before


def test_terminology_string_format():
    entry = {
        "category": {"scheme": "SCT", "code": "123037004", "meaning": "Anatomical Structure"},
        "type": {"scheme": "SCT", "code": "78961009", "meaning": "Spleen"},
    }
    text = adapter.terminology_string(entry)
    fields = text.split("~")
    assert fields[0] == adapter.TERMINOLOGY_CONTEXT
    assert fields[1:3] == ["SCT^123037004^Anatomical Structure", "SCT^78961009^Spleen"]
    # Slicer's own parser reads it back
    parsed = slicer.vtkSlicerTerminologyEntry()
    assert slicer.vtkSlicerTerminologiesModuleLogic.DeserializeTerminologyEntry(text, parsed)
    assert parsed.GetTypeObject().GetCodeValue() == "78961009"


def test_show_results_without_application(predictor, scene_and_input):
    scene, node = scene_and_input
    outputs, _ = segment(scene, node, predictor)
    composite = scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
    adapter.show_results(scene, node, outputs.segmentation, outputs.uncertainty, opacity=0.35)
    assert composite.GetForegroundVolumeID() == outputs.uncertainty.GetID()
    assert composite.GetBackgroundVolumeID() == node.GetID()
    assert composite.GetForegroundOpacity() == pytest.approx(0.35)
    adapter.set_uncertainty_opacity(scene, outputs.uncertainty, 0.8)  # the slider applies at once
    assert composite.GetForegroundOpacity() == pytest.approx(0.8)


def test_quality_estimate_lands_on_the_node_when_present(predictor, scene_and_input):
    """The trust branch's report gains a "quality" block; the adapter shows it, and copes without it."""
    scene, node = scene_and_input

    def with_quality(flag: bool):
        def predict(image):
            result = SegmentationResult.from_prediction(predictor.predict(image, CPU))
            result.report["quality"] = {"expected_dice": 0.6234, "per_structure": {"liver": 0.6}, "flag": flag}
            return result

        return predict

    outputs, result = adapter.segment_node(scene, node, with_quality(True), predictor.bundle.labels)
    seg = outputs.segmentation
    assert float(seg.GetAttribute(adapter.ATTR_EXPECTED_DICE)) == pytest.approx(0.6234, abs=1e-4)
    assert seg.GetAttribute(adapter.ATTR_QUALITY_FLAG) == "true"
    assert adapter.quality_text(result.report) == "expected Dice 0.62 — review before use"
    outputs, result = adapter.segment_node(scene, node, with_quality(False), predictor.bundle.labels)
    assert outputs.segmentation.GetAttribute(adapter.ATTR_QUALITY_FLAG) == "false"
    assert adapter.quality_text(result.report) == "expected Dice 0.62"
    assert adapter.quality_text({"ood": {}}) is None


def test_paired_organs_use_slicer_laterality_modifier():
    """Slicer's tables code a kidney as SCT Kidney + a Right/Left modifier (as SlicerTotalSegmentator does)."""
    specs = adapter.segment_specs(
        [
            {"value": 1, "name": "right kidney", "color": [1, 2, 3]},
            {"value": 2, "name": "left kidney", "color": [1, 2, 3]},
        ]
    )
    parsed = slicer.vtkSlicerTerminologyEntry()
    assert slicer.vtkSlicerTerminologiesModuleLogic.DeserializeTerminologyEntry(specs[0]["terminology"], parsed)
    assert parsed.GetTypeObject().GetCodeValue() == "64033007"
    assert parsed.GetTypeModifierObject().GetCodeValue() == "24028007"
    assert "SCT^7771000^Left" in specs[1]["terminology"]


def test_uncertainty_output_cannot_be_the_input(predictor, scene_and_input):
    scene, node = scene_and_input
    before = node_ids(scene)
    with pytest.raises(ValueError, match="cannot be the input"):
        segment(scene, node, predictor, uncertainty_node=node)
    assert node_ids(scene) == before
