"""The files a prediction leaves behind, written by `mtseg predict` and the worker alike, and read back.

``OUT/<case>_seg.nii.gz`` (uint8 labels), ``OUT/<case>_uncertainty.nii.gz`` (uint8 with scl_slope
1/255: readers get floats in [0, 1] in steps of 1/255), both on the input grid, and ``OUT/<case>.json`` (the report, DESIGN.md). One writer, so what the
Slicer module loads is exactly what the command line writes.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import SimpleITK as sitk

from .atomic import write_text_atomic
from .volume_io import write_fraction_map, write_volume

if TYPE_CHECKING:  # torch stays unloaded for readers of results (the Slicer module imports this without torch)
    from .predictor import Prediction


def output_paths(out: Path, case: str, volume_suffix: str = ".nii.gz") -> dict[str, Path]:
    return {
        "seg": out / f"{case}_seg{volume_suffix}",
        "uncertainty": out / f"{case}_uncertainty{volume_suffix}",
        "report": out / f"{case}.json",
    }


def save_prediction(
    prediction: "Prediction", paths: dict[str, Path], extra: dict | None = None, raw: bool = False
) -> dict:
    """Write labels, uncertainty and the JSON report (each atomically); returns the report.

    ``raw``: uncompressed, written in place, for a private folder whose reader waits for the
    worker's done line (the Slicer module reads them on its GUI thread, where decompressing a
    large CT would freeze Slicer for seconds). The voxels are the same either way.
    """
    with ThreadPoolExecutor(1) as pool:  # the two files at once: ITK's and zlib's writers release the GIL
        if raw:  # float32 uncertainty as computed: the module keeps full precision in the scene
            seg = pool.submit(sitk.WriteImage, prediction.labels, str(paths["seg"]), False)
            sitk.WriteImage(prediction.uncertainty, str(paths["uncertainty"]), useCompression=False)
        else:
            seg = pool.submit(write_volume, prediction.labels, paths["seg"])
            write_fraction_map(prediction.uncertainty, paths["uncertainty"])  # quantised, quickly compressed
        seg.result()
    report = {**prediction.report(), **(extra or {})}
    write_text_atomic(paths["report"], json.dumps(report, indent=2))
    return report


@dataclass
class SegmentationResult:
    """What the scene needs from a prediction, wherever it ran: two images on the input grid + the report."""

    labels: sitk.Image  # uint8
    uncertainty: sitk.Image  # float32 in [0, 1]
    report: dict  # the JSON report: ood, quality (when the bundle estimates it), context, volumes_ml, …

    @classmethod
    def from_prediction(cls, prediction: "Prediction") -> "SegmentationResult":
        return cls(prediction.labels, prediction.uncertainty, prediction.report())

    @classmethod
    def read(cls, paths: dict[str, str | Path], report: dict | None = None) -> "SegmentationResult":
        """Read the files ``save_prediction`` wrote (the report from its file unless given)."""
        if report is None:
            report = json.loads(Path(paths["report"]).read_text(encoding="utf-8"))
        return cls(sitk.ReadImage(str(paths["seg"])), sitk.ReadImage(str(paths["uncertainty"])), report)
