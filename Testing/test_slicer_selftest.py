"""The module's self-test body (MultiTaskSegTest) and its Logic, run through slicer-core.

See slicer_shell.py: only the Qt GUI / application shell is mocked.
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed (pip install slicer-core)")

from MultiTaskSegLib import DEFAULT_BUNDLE, SAMPLE_VOLUME  # noqa: E402
from MultiTaskSegLib.errors import BundleError  # noqa: E402
from MultiTaskSegMRML.selftest import default_bundle_missing_reason, run_selftest  # noqa: E402


@pytest.fixture(scope="module")
def small_sample(tmp_path_factory):
    """A crop of the shipped sample CT, so the plumbing test stays fast on a busy CPU."""
    image = sitk.ReadImage(str(SAMPLE_VOLUME))
    path = tmp_path_factory.mktemp("sample") / "ct_crop.nrrd"
    sitk.WriteImage(image[20:70, 20:70, 30:70], str(path))
    return path


@pytest.mark.slow
def test_module_selftest_with_default_bundle(shell, scene, monkeypatch, capsys):
    """What MultiTaskSegTest.runTest does in Slicer: the default model on the sample CT, CPU.

    Except its one-minute limit: here the time is printed, not asserted (a unit test on a shared CI
    machine is no speed measurement; the self-test in Slicer keeps the limit)."""
    reason = default_bundle_missing_reason()
    if reason:
        pytest.skip(reason)
    import MultiTaskSegMRML.selftest as selftest

    logged: list[str] = []

    def without_limit(*args, **kwargs):
        kwargs["log"] = logged.append
        return run_selftest(*args, **{**kwargs, "time_limit_s": None})

    monkeypatch.setattr(selftest, "run_selftest", without_limit)  # runTest imports it when it runs
    test = shell.MultiTaskSegTest()
    test.runTest()
    with capsys.disabled():
        print(f"\nSlicer self-test: {next(line for line in logged if line.startswith('Segmented in'))}")
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") >= 1


def test_selftest_body_with_untrained_bundle(shell, scene, untrained_bundle, small_sample):
    """The same body and the real Logic.process, with a test bundle (runs before the default model exists)."""
    logic = shell.MultiTaskSegLogic()
    assert logic.ensureDependencies(askConfirmation=False)
    result = run_selftest(
        scene, logic.process, untrained_bundle.path, small_sample, log=lambda text: None, time_limit_s=None
    )
    assert set(result["volumes_ml"]) == {l["name"] for l in untrained_bundle.labels}


def test_logic_reports_invalid_model_folder_clearly(shell, tmp_path):
    logic = shell.MultiTaskSegLogic()
    assert "not a model bundle" in logic.bundleProblem(str(tmp_path))
    assert "not found" in logic.bundleProblem(str(tmp_path / "missing"))
    if not (DEFAULT_BUNDLE / "bundle.json").is_file():
        with pytest.raises(BundleError, match="default model is not installed"):
            logic.loadBundle(None)


def test_logic_blocking_call_through_the_worker(shell, scene, untrained_bundle, small_sample):
    """Logic.process(childProcess=True): the script path through the same worker as the GUI."""
    from MultiTaskSegMRML import adapter

    node = adapter.add_volume_node_from_image(scene, sitk.ReadImage(str(small_sample)), "crop")
    logic = shell.MultiTaskSegLogic()
    outputs, result = logic.process(node, modelPath=str(untrained_bundle.path), device="cpu", childProcess=True)
    seen = []
    here, _ = logic.process(
        node,
        modelPath=str(untrained_bundle.path),
        device="cpu",
        onOOD=lambda ood, contexts: seen.append((ood["score"], len(contexts))),
    )
    assert seen and seen[0][1] == len(untrained_bundle.contexts)
    from mrml_helpers import exported_labels

    assert np.array_equal(
        exported_labels(scene, outputs.segmentation, node), exported_labels(scene, here.segmentation, node)
    )
