"""The prediction worker as a real child process (plain ``python`` standing in for PythonSlicer):
the JSON-lines protocol, the early OOD line, cancel, crashes, and outputs equal to `mtseg predict`."""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np
import pytest
import SimpleITK as sitk

from cli_helpers import run_mtseg_predict
from MultiTaskSegLib.predictor import PredictOptions
from MultiTaskSegLib.worker_process import WorkerError, WorkerProcess, predict_in_child

CPU = PredictOptions(device="cpu")


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(3)
    z, y, x = np.mgrid[:20, :28, :26]
    blob = ((z - 10) / 6.0) ** 2 + ((y - 14) / 9.0) ** 2 + ((x - 13) / 8.0) ** 2 < 1.0
    image = sitk.GetImageFromArray((blob * 200 - 80 + rng.normal(0, 20, blob.shape)).astype(np.int16))
    image.SetSpacing((3.0, 2.5, 4.0))
    image.SetOrigin((10.0, -5.0, 2.0))
    return image


def run_to_end(worker: WorkerProcess, timeout: float = 180) -> list[dict]:
    try:
        return worker.wait(timeout)
    except TimeoutError:
        worker.cancel()
        raise


def test_protocol_progress_then_early_ood_then_done(image, untrained_bundle):
    worker = WorkerProcess(image, untrained_bundle.path, CPU)
    try:
        events = run_to_end(worker)
        kinds = [e["event"] for e in events]
        assert kinds[-1] == "done", events[-1]
        progress = [e for e in events if e["event"] == "progress"]
        assert progress and all(isinstance(e["stage"], str) and 0.0 <= e["fraction"] <= 1.0 for e in progress)
        # the OOD line comes as soon as the signature is known: before resampling and before done
        ood_at = kinds.index("ood")
        assert "resample" in [e.get("stage") for e in events[ood_at:]]
        ood = events[ood_at]
        assert {"score", "threshold", "is_ood", "nearest_context", "detector"} <= set(ood)
        done = events[-1]
        assert set(done["outputs"]) == {"seg", "uncertainty", "report"}
        assert done["report"]["ood"]["score"] == pytest.approx(ood["score"])
        result = worker.result()
        assert result.labels.GetSize() == image.GetSize()
        assert np.allclose(result.labels.GetOrigin(), image.GetOrigin())
        assert result.report == json.loads(open(done["outputs"]["report"], encoding="utf-8").read())
    finally:
        worker.cleanup()
    assert not worker.work_dir.exists()


def test_outputs_equal_what_mtseg_predict_writes(tmp_path, image, untrained_bundle):
    """`mtseg predict` in its own process too: a fresh interpreter each, as a user runs them (an
    in-process run after other tests may differ in the last float bit, e.g. by thread settings)."""
    path = tmp_path / "case.nrrd"
    sitk.WriteImage(image, str(path))
    run_mtseg_predict(untrained_bundle.path, path, tmp_path / "cli")
    result = predict_in_child(image, untrained_bundle.path, CPU, timeout=180)
    cli_labels = sitk.ReadImage(str(tmp_path / "cli" / "case_seg.nii.gz"))
    cli_unc = sitk.ReadImage(str(tmp_path / "cli" / "case_uncertainty.nii.gz"))
    assert np.array_equal(sitk.GetArrayFromImage(result.labels), sitk.GetArrayFromImage(cli_labels))
    # the CLI file is quantised to steps of 1/255; the handover to the module keeps float32
    assert np.allclose(
        sitk.GetArrayFromImage(result.uncertainty), sitk.GetArrayFromImage(cli_unc), rtol=0, atol=0.5 / 255 + 1e-6
    )
    cli_report = json.loads((tmp_path / "cli" / "case.json").read_text(encoding="utf-8"))
    assert result.report["ood"] == cli_report["ood"] and result.report["volumes_ml"] == cli_report["volumes_ml"]


def test_cancel_kills_the_worker_within_two_seconds_and_leaves_no_files(image, untrained_bundle):
    worker = WorkerProcess(image, untrained_bundle.path, PredictOptions(device="cpu", mc_dropout=50))
    seen = []
    deadline = time.perf_counter() + 120
    while not any(e["event"] == "progress" and e["stage"] == "inference" for e in seen):  # model loaded, running
        assert time.perf_counter() < deadline and worker.final is None, seen[-3:]
        seen += worker.poll()
        time.sleep(0.02)
    start = time.perf_counter()
    worker.cancel()
    elapsed = time.perf_counter() - start
    print(f"\ncancel → worker gone and files removed: {elapsed * 1000:.0f} ms")
    assert elapsed < 2.0
    assert not worker.is_running()
    assert not worker.work_dir.exists()
    assert worker.poll() == []


def test_worker_error_line_is_surfaced(untrained_bundle):
    """Bad input: the worker's own one-line message reaches the caller (the module shows it as is)."""
    with pytest.raises(WorkerError, match="nothing to segment"):
        predict_in_child(sitk.Image(6, 6, 6, sitk.sitkInt16), untrained_bundle.path, CPU, timeout=120)


def test_a_crashing_worker_surfaces_its_last_stderr_line(image, untrained_bundle):
    worker = WorkerProcess(image, untrained_bundle.path, CPU, extra_args=["--device", "tpu"])  # argparse exits 2
    try:
        events = run_to_end(worker, 60)
    finally:
        worker.cleanup()
    assert events[-1]["event"] == "error"
    message = events[-1]["message"]
    assert "exit code 2" in message and "invalid choice: 'tpu'" in message, message


@pytest.mark.skipif(os.name == "nt", reason="SIGKILL")
def test_a_killed_worker_is_reported(image, untrained_bundle):
    import signal

    worker = WorkerProcess(image, untrained_bundle.path, CPU, python=sys.executable)
    try:
        os.kill(worker._proc.pid, signal.SIGKILL)
        events = run_to_end(worker, 30)
    finally:
        worker.cleanup()
    assert events[-1]["event"] == "error" and "exit code -9" in events[-1]["message"]


def test_a_relative_bundle_path_still_works(image, untrained_bundle, monkeypatch):
    """The worker runs in the package's folder: a path relative to the caller's folder must be made absolute."""
    monkeypatch.chdir(untrained_bundle.path.parent)
    result = predict_in_child(image, untrained_bundle.path.name, CPU, timeout=180)
    assert result.labels.GetSize() == image.GetSize()
