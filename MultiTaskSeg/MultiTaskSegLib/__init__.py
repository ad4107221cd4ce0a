"""MultiTaskSeg core: model, preprocessing, inference, uncertainty, OOD and bundle.

Never imports slicer, qt, ctk or vtk (DESIGN.md); the Slicer module and the training
package both build on it.
"""

from pathlib import Path

__version__ = "0.1.0"

#: The default joint model shipped with the extension.
DEFAULT_BUNDLE = Path(__file__).resolve().parent.parent / "Resources" / "Models" / "default"
#: A small sample CT (TotalSegmentator example, Apache-2.0) shipped with the extension.
SAMPLE_VOLUME = Path(__file__).resolve().parent.parent / "Resources" / "SampleData" / "totalseg_ct01.nii.gz"
