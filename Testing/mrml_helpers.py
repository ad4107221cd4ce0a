"""Reading MRML results back for comparisons (slicer-core's real classes)."""

from __future__ import annotations

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from MultiTaskSegMRML import adapter


def node_ids(scene) -> list[str]:
    return sorted(scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes()))


def exported_labels(scene, segmentation_node, reference_node) -> np.ndarray:
    """Segments exported by Slicer's logic onto the reference grid, mapped back to bundle label values."""
    segmentation = segmentation_node.GetSegmentation()
    ids = list(segmentation.GetSegmentIDs())
    id_array = vtk.vtkStringArray()
    for segment_id in ids:
        id_array.InsertNextValue(segment_id)
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "export")
    ok = slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
        segmentation_node, id_array, labelmap, reference_node
    )
    assert ok
    assert np.allclose(adapter.node_ijk_to_ras(labelmap), adapter.node_ijk_to_ras(reference_node))
    image_data = labelmap.GetImageData()
    exported = numpy_support.vtk_to_numpy(image_data.GetPointData().GetScalars())
    exported = exported.reshape(image_data.GetDimensions()[::-1])
    values = [adapter.segment_label_value(segmentation.GetSegment(i)) for i in ids]
    lut = np.zeros(len(ids) + 1, np.uint8)
    lut[1:] = values  # exported value k+1 ↔ k-th segment id
    scene.RemoveNode(labelmap)
    return lut[exported]
