"""How the results look in the views: the uncertainty colour table and the slice-view layers.

Works on the scene's slice composite nodes, which exist only where views exist; without the
application (tests, batch) there are none and these functions do nothing harmful.
"""

from __future__ import annotations

import numpy as np
import slicer

ATTR_COLOR_TABLE = "MultiTaskSeg.UncertaintyColorTable"
COLOR_TABLE_NAME = "MultiTaskSeg uncertainty"


def existing_color_table(scene: slicer.vtkMRMLScene) -> slicer.vtkMRMLColorTableNode | None:
    """The module's uncertainty colour table if the scene has it already."""
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLColorTableNode")):
        node = scene.GetNthNodeByClass(i, "vtkMRMLColorTableNode")
        if node.GetAttribute(ATTR_COLOR_TABLE) == "1":
            return node
    return None


def uncertainty_color_table(scene: slicer.vtkMRMLScene) -> slicer.vtkMRMLColorTableNode:
    """The module's uncertainty colour table (transparent-dark → yellow), created once per scene."""
    existing = existing_color_table(scene)
    if existing is not None:
        return existing
    node = slicer.vtkMRMLColorTableNode()
    node.SetName(COLOR_TABLE_NAME)
    node.SetTypeToUser()
    node.SetAttribute(ATTR_COLOR_TABLE, "1")
    n = 256
    node.SetNumberOfColors(n)
    node.GetLookupTable().SetRange(0.0, 1.0)
    # inferno-like ramp; low uncertainty transparent so the anatomy shows through
    anchors = np.array(
        [
            [0.0, 0.0, 0.0, 0.02],
            [0.25, 0.34, 0.06, 0.43],
            [0.5, 0.73, 0.21, 0.33],
            [0.75, 0.98, 0.55, 0.04],
            [1.0, 0.99, 1.0, 0.64],
        ]
    )
    for i in range(n):
        t = i / (n - 1)
        rgb = [np.interp(t, anchors[:, 0], anchors[:, k]) for k in (1, 2, 3)]
        node.SetColor(i, f"{t:.3f}", rgb[0], rgb[1], rgb[2], float(min(1.0, t * 4.0)))
    node.SetHideFromEditors(False)
    scene.AddNode(node)
    return node


def show_uncertainty(uncertainty_node: slicer.vtkMRMLScalarVolumeNode, scene: slicer.vtkMRMLScene) -> None:
    """The uncertainty volume's display: the module's colour table on a fixed [0, 1] window."""
    uncertainty_node.CreateDefaultDisplayNodes()
    display = uncertainty_node.GetDisplayNode()
    if display is not None:
        display.SetAndObserveColorNodeID(uncertainty_color_table(scene).GetID())
        display.AutoWindowLevelOff()
        display.SetWindowLevelMinMax(0.0, 1.0)


def show_results(
    scene: slicer.vtkMRMLScene, input_node, segmentation_node, uncertainty_node, opacity: float = 0.4
) -> None:
    """Input as background and uncertainty as foreground of every slice view; segmentation visible."""
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
        composite = scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode")
        composite.SetBackgroundVolumeID(input_node.GetID())
        composite.SetForegroundVolumeID(uncertainty_node.GetID())
        composite.SetForegroundOpacity(opacity)
    display = segmentation_node.GetDisplayNode()
    if display is not None:
        display.SetVisibility(True)


def set_uncertainty_opacity(scene: slicer.vtkMRMLScene, uncertainty_node, opacity: float) -> None:
    """Change the overlay's opacity in the views that show ``uncertainty_node`` (the slider applies at once)."""
    if uncertainty_node is None:
        return
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
        composite = scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode")
        if composite.GetForegroundVolumeID() == uncertainty_node.GetID():
            composite.SetForegroundOpacity(opacity)
