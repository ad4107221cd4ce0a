"""Qt-free parts of the Slicer module: OOD gauge geometry and the worker's device fallback
(the worker as a child process: test_worker_process.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from MultiTaskSegLib import worker
from MultiTaskSegLib.ood_gauge import (
    BORDERLINE,
    IN_DISTRIBUTION,
    OUT_OF_DISTRIBUTION,
    context_description,
    gauge_layout,
)
from MultiTaskSegLib.predictor import PredictOptions
from MultiTaskSegLib.worker import predict_with_fallback, resolve_device


# --- gauge ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "score,state",
    [
        (0.1, IN_DISTRIBUTION),
        (0.45, BORDERLINE),
        (0.5, BORDERLINE),
        (0.51, OUT_OF_DISTRIBUTION),
        (3.0, OUT_OF_DISTRIBUTION),
    ],
)
def test_gauge_state_and_geometry(score, state):
    g = gauge_layout(score, 0.5, "HeartMR (MR, heart)")
    assert g.state == state
    assert [b.state for b in g.bands] == [IN_DISTRIBUTION, BORDERLINE, OUT_OF_DISTRIBUTION]
    assert g.bands[0].start == 0.0 and g.bands[-1].end == 1.0
    assert all(a.end == b.start for a, b in zip(g.bands, g.bands[1:]))  # contiguous
    assert g.bands[2].start == pytest.approx(g.threshold_position)
    assert 0.0 <= g.score_position <= 1.0
    # the score marker lies in the band of its state
    band = next(b for b in g.bands if b.start <= g.score_position <= b.end and b.state == state)
    assert band
    assert g.context_text == "resembles: HeartMR (MR, heart)"
    assert "0.5" in g.score_text


@pytest.mark.parametrize("score", [0.49, 0.5, 0.5000001, 2.0])
def test_gauge_and_detector_flag_by_one_rule(score):
    """At the threshold itself both say 'not flagged' (the detector's strict rule, ood.exceeds)."""
    from MultiTaskSegLib.ood import SpectralDetector

    det = SpectralDetector(np.zeros((1, 1)), np.zeros(1, int), np.asarray(["a"]), ["A"], ["enc0"], None, 0.5)
    flagged = det.score(np.asarray([score])).is_ood
    assert flagged == (gauge_layout(score, 0.5).state == OUT_OF_DISTRIBUTION)


def test_trust_verdict_words():
    from MultiTaskSegLib.ood_gauge import trust_verdict

    assert trust_verdict(False, 0.62, True) == "expected Dice 0.62 — review before use"
    assert trust_verdict(False, 0.91, False) == "expected Dice 0.91 — no warning"
    assert trust_verdict(True, 0.3, True) == "out of distribution, expected Dice 0.30 — review before use"
    assert trust_verdict(True) == "out of distribution — review before use"  # bundle without a quality model
    assert trust_verdict(False) == "in distribution"


def test_gauge_threshold_in_the_middle_unless_score_is_far_out():
    assert gauge_layout(0.2, 0.5).threshold_position == pytest.approx(0.5)
    far = gauge_layout(5.0, 0.5)
    assert far.score_position < 1.0 and far.threshold_position < 0.5
    with pytest.raises(ValueError):
        gauge_layout(0.2, 0.0)


def test_context_description():
    contexts = [{"name": "HeartMR", "modality": "MR", "region": "heart"}]
    assert context_description(contexts, "HeartMR") == "HeartMR (MR, heart)"
    assert context_description(contexts, "Other") == "Other"


# --- device --------------------------------------------------------------------------
def test_resolve_device_falls_back_to_cpu_with_notice():
    assert resolve_device("cpu", cuda_available=True) == ("cpu", None)
    assert resolve_device("auto", cuda_available=True) == ("cuda", None)
    assert resolve_device("gpu", cuda_available=True) == ("cuda", None)
    device, notice = resolve_device("gpu", cuda_available=False)
    assert device == "cpu" and "no CUDA GPU" in notice
    device, notice = resolve_device("auto", cuda_available=False)
    assert device == "cpu" and notice


def test_cuda_out_of_memory_reruns_on_cpu(monkeypatch):
    monkeypatch.setattr(worker, "resolve_device", lambda requested: ("cuda", None))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    calls, notices = [], []

    class FakePredictor:
        def __init__(self, device):
            self.device = device

        def predict(self, image, options, progress=None, on_ood=None):
            calls.append((self.device, options.device))
            if self.device == "cuda":
                raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return "prediction"

    result = predict_with_fallback(FakePredictor, None, PredictOptions(device="auto"), notice=notices.append)
    assert result == "prediction"
    assert calls == [("cuda", "cuda"), ("cpu", "cpu")]
    assert "out of memory" in notices[0]


def test_other_errors_are_not_swallowed(monkeypatch):
    class Broken:
        def __init__(self, device):
            pass

        def predict(self, *args, **kwargs):
            raise ValueError("bug")

    with pytest.raises(ValueError):
        predict_with_fallback(Broken, None, PredictOptions(device="cpu"))


def test_gauge_without_a_threshold_shows_the_score_unflagged():
    from MultiTaskSegLib.ood_gauge import UNKNOWN, gauge_layout

    layout = gauge_layout(0.3, float("inf"), "BrainMR")
    assert layout.state == UNKNOWN and "no OOD threshold" in layout.score_text
    assert layout.context_text == "resembles: BrainMR"


def test_fallback_keeps_every_option(monkeypatch):
    """The device is replaced, nothing else is dropped (cpu_bf16 used to be lost)."""
    monkeypatch.setattr(worker, "resolve_device", lambda requested: ("cpu", None))
    seen = []

    class Recorder:
        def __init__(self, device):
            pass

        def predict(self, image, options, progress=None, on_ood=None):
            seen.append(options)
            return "prediction"

    options = PredictOptions(
        device="auto", tta=True, mc_dropout=2, modality="MR", restrict_to_context=False, cpu_bf16=True
    )
    predict_with_fallback(Recorder, None, options)
    assert seen[0] == PredictOptions("cpu", True, 2, "MR", False, cpu_bf16=True)
    assert options.device == "auto"  # the caller's options are not changed
