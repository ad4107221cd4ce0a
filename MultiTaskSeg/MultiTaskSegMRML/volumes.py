"""Volume nodes ↔ SimpleITK images, with the geometry (IJK→RAS ↔ LPS origin/spacing/direction) exact."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import slicer
import vtk
from vtk.util import numpy_support

from MultiTaskSegLib.errors import InputVolumeError
from MultiTaskSegLib.volume_io import validate_volume

# RAS (Slicer) ↔ LPS (ITK): flip the first two axes.
_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


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
        raise InputVolumeError(
            f"{name}: image has {components} components per voxel; a single-channel (scalar) "
            "volume is needed — extract one channel first (Vector to Scalar Volume module)"
        )
    dims = image_data.GetDimensions()
    if 0 in dims:
        raise InputVolumeError(f"{name}: image is empty (size {dims})")
    array = numpy_support.vtk_to_numpy(image_data.GetPointData().GetScalars()).reshape(dims[::-1])
    image = sitk.GetImageFromArray(np.array(array, copy=True))
    set_image_geometry_from_ijk_to_ras(image, node_ijk_to_ras(node))
    validate_volume(image, name)
    return image


def image_data_from_array(array: np.ndarray) -> vtk.vtkImageData:
    """vtkImageData (origin 0, spacing 1: Slicer keeps the geometry in the node) from a (z, y, x) array."""
    array = np.ascontiguousarray(array)
    image_data = vtk.vtkImageData()
    image_data.SetDimensions(array.shape[2], array.shape[1], array.shape[0])
    scalars = numpy_support.numpy_to_vtk(array.ravel(), deep=True)
    image_data.GetPointData().SetScalars(scalars)
    return image_data


def add_volume_node_from_image(
    scene: slicer.vtkMRMLScene, image: sitk.Image, name: str
) -> slicer.vtkMRMLScalarVolumeNode:
    """Add a scalar volume node holding ``image`` (used by the self-test and the tests)."""
    if image.GetNumberOfComponentsPerPixel() != 1:
        node = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", name)
    else:
        node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    node.SetIJKToRASMatrix(_numpy_to_matrix(ijk_to_ras_from_image(image)))
    node.SetAndObserveImageData(image_data_from_array(sitk.GetArrayFromImage(image)))
    node.CreateDefaultDisplayNodes()
    return node
