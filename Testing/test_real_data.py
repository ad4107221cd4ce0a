"""Checks on the real development data (../shared/data) and the shipped default model.

Skipped with a reason where ../shared/data is absent (a user's clone); CI has it.
"""

from __future__ import annotations

import json

import pytest
import SimpleITK as sitk

from conftest import SHARED_DATA, requires_shared_data
from MultiTaskSegLib import DEFAULT_BUNDLE, SAMPLE_VOLUME
from MultiTaskSegLib.bundle import load_bundle
from MultiTaskSegLib.predictor import PredictOptions, Predictor
from MultiTaskSegLib.volume_io import read_volume
from MultiTaskSegTraining.data import load_dataset, split_cases

DATASETS = ["CardiacCineMR", "LeftAtriumMR", "AbdomenCT", "BrainTumorMR", "BrainStructuresMR"]
requires_default = pytest.mark.skipif(
    not (DEFAULT_BUNDLE / "bundle.json").exists(),
    reason="the default model bundle has not been trained into this checkout",
)


@pytest.fixture(scope="module")
def predictor():
    return Predictor(load_bundle(DEFAULT_BUNDLE), "cpu")


@requires_shared_data
@pytest.mark.parametrize("name", DATASETS)
def test_real_datasets_load_and_split_without_leaks(name):
    spec = load_dataset(SHARED_DATA / name)
    assert (
        len(spec.cases) == json.loads((SHARED_DATA / name / "dataset.json").read_text(encoding="utf-8"))["numTraining"]
    )
    split = split_cases(spec, seed=0)
    groups = {part: {c.group for c in spec.cases if c.case_id in ids} for part, ids in split.items()}
    assert not groups["train"] & groups["test"] and not groups["val"] & groups["test"]
    assert split["test"], "every dataset keeps at least one held-out test case"


@requires_default
def test_default_bundle_is_complete_and_small():
    bundle = load_bundle(DEFAULT_BUNDLE)  # verifies format version and every sha256
    size = sum(p.stat().st_size for p in DEFAULT_BUNDLE.iterdir())
    assert size < 25 * 2**20
    assert (DEFAULT_BUNDLE / "MODEL_CARD.md").exists()
    assert {c["name"] for c in bundle.contexts} == set(DATASETS)
    assert bundle.meta["ood"]["threshold"] > 0


@requires_default
@requires_shared_data
def test_default_bundle_was_not_trained_on_the_sample_volume():
    split = load_bundle(DEFAULT_BUNDLE).meta["training"]["split"]["AbdomenCT"]
    assert "totalseg_ct01" in split["test"]


@pytest.mark.slow
@requires_default
@requires_shared_data
def test_default_model_segments_the_liver_of_the_held_out_sample_ct(predictor):
    image = read_volume(SAMPLE_VOLUME)
    prediction = predictor.predict(image, PredictOptions(device="cpu"))
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(SHARED_DATA / "AbdomenCT" / "labelsTr" / "totalseg_ct01.nii.gz")))
    seg = sitk.GetArrayFromImage(prediction.labels)
    liver = [v for v, n in prediction.label_names.items() if n == "liver"][0]
    a, b = seg == liver, label == 1
    dice = 2 * (a & b).sum() / (a.sum() + b.sum())
    assert prediction.context == "AbdomenCT"
    # A regression guard, not a quality claim: the shipped model saw two abdominal CTs and
    # measured liver Dice 0.28 on this held-out 3 mm scan (docs/RESULTS.md); an untrained or
    # broken model (wrong orientation, wrong intensity window) scores about 0.
    assert dice > 0.2, f"liver Dice {dice:.3f} on the held-out sample"
    # Its four structures score Dice 0.16 on average (spleen and kidneys near 0): the trust blocks must say
    # so. The quality estimate flags it; the detector, calibrated on every train/val case, reports it
    # out of distribution too (its one context has 3 training cases; docs/RESULTS.md, Trust).
    assert prediction.quality is not None and prediction.quality.flag
    assert prediction.quality.expected_dice < 0.5


@requires_default
def test_default_model_flags_a_foreign_volume_as_ood(predictor):
    from phantoms import checkerboard_volume

    image = checkerboard_volume(size=(96, 96, 64), spacing=(2.0, 2.0, 2.0))
    prediction = predictor.predict(image, PredictOptions(device="cpu"))
    assert prediction.ood.is_ood and prediction.ood.score > prediction.ood.threshold
