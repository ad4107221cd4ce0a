"""The body of the module's self-test, free of Qt so that it runs both in Slicer
(``MultiTaskSegTest``) and under pytest with slicer-core (Testing/test_slicer_selftest.py).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable

import numpy as np

from MultiTaskSegLib import DEFAULT_BUNDLE, SAMPLE_VOLUME
from MultiTaskSegLib.errors import CancelledError
from MultiTaskSegLib.volume_io import read_volume

from . import adapter

#: The issue asks for the self-test to finish within a minute on CPU.
TIME_LIMIT_S = 60.0


def default_bundle_missing_reason(bundle_path: Path = DEFAULT_BUNDLE) -> str | None:
    """Why the self-test cannot run yet (the default model is trained separately), or None."""
    if not (Path(bundle_path) / "bundle.json").is_file():
        return f"the default model bundle {bundle_path} does not exist yet (it is trained separately)"
    return None


def _node_ids(scene) -> list[str]:
    return sorted(scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes()))


def _check(condition: bool, message: str) -> None:
    # plain exceptions, not assert: the body must also check under python -O
    if not condition:
        raise AssertionError(message)


def run_selftest(
    scene,
    process: Callable,
    bundle_path: Path = DEFAULT_BUNDLE,
    sample_path: Path = SAMPLE_VOLUME,
    log: Callable[[str], None] = print,
    time_limit_s: float | None = TIME_LIMIT_S,
) -> dict:
    """Segment the sample volume with ``process`` (the module logic's blocking call) and check the scene.

    ``process(inputVolume, modelPath=…, device=…, scene=…, segmentationNode=…, uncertaintyNode=…,
    progress=…, showResults=False)`` must return ``(OutputNodes, SegmentationResult)``.
    """
    log("Loading the sample volume")
    image = read_volume(sample_path)
    input_node = adapter.add_volume_node_from_image(scene, image, "MultiTaskSegSample")

    log("Segmenting on CPU")
    stages = []
    start = time.perf_counter()
    outputs, result = process(
        input_node,
        modelPath=str(bundle_path),
        device="cpu",
        scene=scene,
        progress=lambda stage, fraction: stages.append(stage),
        showResults=False,
    )
    elapsed = time.perf_counter() - start
    log(f"Segmented in {elapsed:.1f} s")
    if time_limit_s is not None:
        _check(elapsed < time_limit_s, f"segmentation took {elapsed:.0f} s (limit {time_limit_s:.0f} s)")
    _check(stages and stages[-1] == "done", f"progress did not reach 'done' (stages: {stages[-3:]})")

    seg_node, unc_node = outputs.segmentation, outputs.uncertainty
    _check(seg_node.GetName() == "MultiTaskSegSample segmentation", f"unexpected name {seg_node.GetName()!r}")
    segmentation = seg_node.GetSegmentation()
    names = [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]
    label_names = {int(v): name for v, name in result.report["labels"].items()}
    _check(names == [label_names[v] for v in sorted(label_names)], f"segments {names} do not match the model's labels")
    for i in range(segmentation.GetNumberOfSegments()):
        _check(
            bool(adapter.segment_terminology(segmentation.GetNthSegment(i))), f"segment {names[i]} has no terminology"
        )
    _check(sum(result.report["volumes_ml"].values()) > 0, "nothing was segmented in the sample volume")

    _check(
        np.allclose(adapter.node_ijk_to_ras(unc_node), adapter.node_ijk_to_ras(input_node)),
        "the uncertainty volume is not on the input grid",
    )
    _check(
        unc_node.GetImageData().GetDimensions() == input_node.GetImageData().GetDimensions(),
        "the uncertainty volume has another size than the input",
    )
    score = float(seg_node.GetAttribute(adapter.ATTR_OOD_SCORE))
    _check(math.isfinite(score) and score >= 0, f"OOD score {score} is not a finite distance")
    for key in (adapter.ATTR_OOD_THRESHOLD, adapter.ATTR_IS_OOD, adapter.ATTR_NEAREST_CONTEXT):
        _check(bool(seg_node.GetAttribute(key)), f"attribute {key} is missing")

    log("Running again into the same outputs")
    before = _node_ids(scene)
    process(
        input_node,
        modelPath=str(bundle_path),
        device="cpu",
        scene=scene,
        segmentationNode=seg_node,
        uncertaintyNode=unc_node,
        showResults=False,
    )
    _check(_node_ids(scene) == before, "running again with the same outputs added nodes")

    log("Cancelling a run")

    def cancel(stage: str, fraction: float) -> None:
        if stage != "preprocess":
            raise CancelledError()

    try:
        process(input_node, modelPath=str(bundle_path), device="cpu", scene=scene, progress=cancel, showResults=False)
        raise AssertionError("a cancelled run returned normally")
    except CancelledError:
        pass
    _check(_node_ids(scene) == before, "a cancelled run changed the scene")
    log("Self-test passed")
    return {"elapsed_s": elapsed, "ood": result.report["ood"], "volumes_ml": result.report["volumes_ml"]}
