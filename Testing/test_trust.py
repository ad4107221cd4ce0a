"""Trust: the per-context OOD detector, its threshold, the quality model and where they surface.

Constructed cases with known answers first (synthetic signatures and probability maps), then
the bundle round trip and the predict report on real files.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from MultiTaskSegLib.bundle import META_FILE, load_bundle, save_bundle
from MultiTaskSegLib.errors import BundleError
from MultiTaskSegLib.postprocessing import stray_share
from MultiTaskSegLib.predictor import PredictOptions, Predictor
from MultiTaskSegLib.quality import DIRECTION, FEATURES, QualityModel, structure_evidence
from MultiTaskSegTraining.trust_fit import FIT_FEATURES, conformal_quantile, fit_detector, fit_quality, loo_scores
from MultiTaskSegTraining.trust_metrics import aurc, failure_table


@pytest.fixture(scope="module")
def tiny_image():
    rng = np.random.default_rng(0)
    image = sitk.GetImageFromArray((rng.normal(size=(12, 16, 16)) * 50).astype(np.float32))
    image.SetSpacing((4.0, 3.0, 3.0))
    return image


def _records(points: np.ndarray, context: int, prefix: str) -> list[dict]:
    return [
        {"key": f"fit/D{context}__{prefix}{i}", "context": context, "signatures": {"enc0": p.tolist()}}
        for i, p in enumerate(points)
    ]


def _two_contexts(rng: np.random.Generator, n: int = 40) -> tuple[list[dict], np.ndarray, np.ndarray]:
    """A tight context (spread 0.01) and a loose one (spread 0.2), far apart."""
    a_mean, b_mean = np.zeros(4), np.full(4, 5.0)
    recs = _records(a_mean + 0.01 * rng.normal(size=(n, 4)), 0, "a") + _records(
        b_mean + 0.2 * rng.normal(size=(n, 4)), 1, "b"
    )
    return recs, a_mean, b_mean


def test_per_context_detector_flags_exactly_the_planted_outliers():
    rng = np.random.default_rng(0)
    recs, a, b = _two_contexts(rng)
    det, _ = fit_detector(recs, ["enc0"], ["A", "B"], alpha=0.01)
    fresh = np.concatenate([a + 0.01 * rng.normal(size=(10, 4)), b + 0.2 * rng.normal(size=(10, 4))])
    # planted: 0.15 from the tight context is far for it (15 spreads) though small next to the loose one's spread
    planted = np.stack([a + 0.15, b + 3.0, np.full(4, 2.5)])
    flags = [det.score(x).is_ood for x in np.concatenate([fresh, planted])]
    assert flags == [False] * 20 + [True] * 3
    # a single global nearest-neighbour threshold (the old detector) misses the first planted point
    pooled = det.threshold * float(np.mean(det.context_scale))
    plain_d = np.sqrt(((det.signatures - planted[0]) ** 2).sum(1)).min()
    assert plain_d < pooled
    assert det.score(a + 0.005).nearest_context == "A" and det.score(b).nearest_context == "B"


def test_a_threshold_for_5_percent_false_alarms_gives_about_5_percent_on_fresh_samples():
    rng = np.random.default_rng(1)
    recs = _records(rng.normal(size=(300, 6)), 0, "c")
    det, loo = fit_detector(recs, ["enc0"], ["A"], alpha=0.05)
    assert np.mean(loo > det.threshold) <= 0.05
    fresh = rng.normal(size=(3000, 6))
    rate = np.mean([det.score(x).is_ood for x in fresh])
    assert 0.02 <= rate <= 0.09, rate


def test_leave_one_out_holds_out_the_whole_patient():
    """Two cine frames of one heart have near-identical signatures: leaving out only one frame would
    score it against its twin and set the threshold too low for new patients."""
    rng = np.random.default_rng(2)
    centres = rng.normal(size=(20, 4))
    recs = [
        {"key": f"fit/D0__patient{i:03d}_frame{f:02d}", "context": 0, "signatures": {"enc0": (c + 1e-3 * f).tolist()}}
        for i, c in enumerate(centres)
        for f in (1, 2)
    ]
    det, loo = fit_detector(recs, ["enc0"], ["A"])
    assert loo.min() > 0.01  # the twin frame was never the nearest neighbour
    assert np.allclose(loo_scores(det, recs[:2]), loo[:2])


def _with_heads(recs: list[dict], rng: np.random.Generator) -> list[dict]:
    """Records as `predict` sees them: the head recognises the record's context with confidence 0.9–0.99."""
    for r in recs:
        p = rng.uniform(0.9, 0.99)
        r["recognised"], r["context_probs"] = r["context"], [p, 1 - p] if r["context"] == 0 else [1 - p, p]
    return recs


def test_recognised_context_detector_flags_a_wrong_context_and_an_unsure_head():
    rng = np.random.default_rng(3)
    recs, a, b = _two_contexts(rng)
    det, loo = fit_detector(_with_heads(recs, rng), ["enc0"], ["A", "B"], alpha=0.05)
    assert det.conditioning == "recognised" and set(det.combination) == {"spectral", "confidence"}
    assert np.mean(loo > det.threshold) <= 0.05
    # fresh in-distribution cases, recognised right with a typical confidence: about 5 % flagged
    fresh = [(a + 0.01 * rng.normal(size=4), 0) for _ in range(100)] + [
        (b + 0.2 * rng.normal(size=4), 1) for _ in range(100)
    ]
    rate = np.mean([det.score(x, k, rng.uniform(0.9, 0.99)).is_ood for x, k in fresh])
    assert rate <= 0.1, rate
    # an image that looks like context B while the head recognised A: flagged, though near a training signature
    wrong = det.score(b, 0, 0.95)
    assert wrong.is_ood and wrong.nearest_context == "A"
    assert not det.score(b, 1, 0.95).is_ood
    # a typical signature with an unsure head: flagged by the combination; without a head the spectrum alone
    assert det.score(a, 0, 0.3).is_ood and not det.score(a, 0, 0.97).is_ood
    assert not det.score(a).is_ood
    plain, _ = fit_detector(recs, ["enc0"], ["A", "B"], conditioning="any", with_confidence=False)
    assert plain.combination is None and not plain.score(b, 0, 0.3).is_ood


def test_conformal_quantile():
    assert conformal_quantile(np.arange(1, 20), 0.05) == 19  # ⌈20·0.95⌉ = 19th smallest
    assert conformal_quantile(np.arange(1, 101), 0.1) == 91


def test_structure_evidence_of_constructed_maps():
    probs = torch.zeros(3, 4, 4, 4)
    probs[0] = 1.0
    probs[0, :2], probs[1, :2] = 0.0, 1.0  # structure 1: certain on the first half
    labels = probs.argmax(0).numpy().astype(np.uint8)
    entropy = torch.zeros(4, 4, 4)
    ev = structure_evidence(probs, labels, entropy, [1, 2], voxel_ml=0.008)
    assert ev[1] == pytest.approx({"soft_dice": 1.0, "mean_entropy": 0.0, "volume_ml": 32 * 0.008, "stray_share": 0.0})
    assert ev[2] == {"soft_dice": 0.0, "mean_entropy": 1.0, "volume_ml": 0.0, "stray_share": 1.0}  # nothing found
    probs[1, :2], probs[0, :2] = 0.6, 0.4  # barely won: soft Dice 2·0.6·32 / (0.6·32 + 32) = 0.75
    assert structure_evidence(probs, labels, entropy, [1], 0.008)[1]["soft_dice"] == pytest.approx(0.75)


def test_stray_share_counts_voxels_outside_the_largest_piece():
    labels = np.zeros((8, 8, 8), np.uint8)
    labels[:3, :3, :3] = 1  # 27 voxels
    labels[6:, 6:, 6:] = 1  # 8 voxels, not touching (not even at a corner)
    labels[5, 0, 0] = 2
    assert stray_share(labels, 1) == pytest.approx(8 / 35)
    assert stray_share(labels, 2) == 0.0  # one piece
    assert stray_share(labels, 3) == 1.0  # nothing found
    labels[3, 3, 3] = 1  # touches the first block at a corner: 26-connected, one piece with it
    labels[4:6, 4:6, 4:6] = 1  # and bridges to the second
    assert stray_share(labels, 1) == 0.0


def _quality_records(rng: np.random.Generator, n: int = 60) -> tuple[list[dict], list[float]]:
    """Dice follows soft Dice (plus noise); other evidence is noise."""
    recs, scores = [], []
    for _ in range(n):
        soft = rng.uniform(0.2, 1.0)
        recs.append(
            {
                "evidence": {
                    "1": {
                        "soft_dice": soft,
                        "mean_entropy": rng.uniform(0.2, 0.6),
                        "volume_ml": 100.0,
                        "stray_share": rng.uniform(0.0, 0.2),
                    }
                },
                "dice": {"1": float(np.clip(soft + 0.05 * rng.normal(), 0, 1))},
                "recognised": 0,
                "context_probs": [0.9, 0.1],
            }
        )
        scores.append(rng.uniform(0, 1))
    return recs, scores


def test_quality_model_learns_a_monotone_expected_dice_and_ranks_failures():
    rng = np.random.default_rng(2)
    recs, scores = _quality_records(rng)
    # every feature predict computes (the shipped fit leaves out the soft Dice, which these records make the signal)
    model = fit_quality(recs, scores, 1.0, {"liver": [4.6, 0.3]}, {1: "liver"}, [[1]], features=FEATURES)
    assert "soft_dice" not in FIT_FEATURES and set(FIT_FEATURES) < set(FEATURES)
    evidence = {"mean_entropy": 0.4, "volume_ml": 100.0, "stray_share": 0.0}
    lo = model.expected_dice([model.feature_row({**evidence, "soft_dice": 0.3}, "liver", 0.5, 0.9)])[0]
    hi = model.expected_dice([model.feature_row({**evidence, "soft_dice": 0.95}, "liver", 0.5, 0.9)])[0]
    assert 0.0 <= lo < 0.5 < hi <= 1.0
    test, _ = _quality_records(rng, 40)
    dice = np.asarray([r["dice"]["1"] for r in test])
    expected = np.asarray(
        [model.assess({1: r["evidence"]["1"]}, {1: "liver"}, 0.5, 0.9, False).expected_dice for r in test]
    )
    table = failure_table({"quality": 1 - expected, "random": rng.uniform(size=len(test))}, dice)
    assert table["signals"]["quality"]["aurc"] < table["signals"]["random"]["aurc"]
    assert aurc(1 - dice, 1 - dice) == pytest.approx(table["aurc_oracle"])


def test_quality_model_never_rates_an_image_better_for_being_more_unusual():
    # fit cases where, by chance, the more out-of-distribution ones segmented better: an unconstrained
    # fit would learn "OOD raises Dice" and extrapolate it to far-OOD images; the fit keeps that at 0
    rng = np.random.default_rng(5)
    recs, _ = _quality_records(rng)
    scores = [2.0 * r["dice"]["1"] + 0.05 * rng.normal() for r in recs]  # OOD score follows Dice
    model = fit_quality(recs, scores, 1.0, {"liver": [4.6, 0.3]}, {1: "liver"}, [[1]], features=FEATURES)
    coef = dict(zip(model.features, model.coef))
    assert coef["ood_z"] == 0.0 and coef["soft_dice"] > 0
    for f, c in coef.items():
        assert c * DIRECTION[f] >= 0.0, f
    evidence = {"soft_dice": 0.8, "mean_entropy": 0.4, "volume_ml": 100.0, "stray_share": 0.0}
    near, far = (model.expected_dice([model.feature_row(evidence, "liver", z, 0.9)])[0] for z in (0.5, 10.0))
    assert far <= near


def _quality_dict() -> dict:
    return QualityModel(
        [1.5, -0.5, -0.2, -0.3, 0.2],
        0.4,
        [0.6, 0.5, 1.0, 0.8, 0.9],
        [0.2, 0.1, 0.8, 0.5, 0.1],
        {"liver": [7.0, 0.3], "spleen": [5.0, 0.4], "left ventricle": [4.8, 0.3]},
        # the five features of bundles before stray_share: such bundles still load and assess
        features=["soft_dice", "mean_entropy", "volume_z", "ood_z", "context_confidence"],
        fitted_on="test",
    ).to_dict()


def _with_quality(bundle, path):
    meta = {**bundle.meta, "quality": _quality_dict()}
    with np.load(bundle.path / "signatures.npz", allow_pickle=False) as d:
        sig, ctx, ids = d["signatures"], d["context_index"], list(d["case_ids"])
    state = {k: v for k, v in bundle.load_model().state_dict().items()}
    return save_bundle(path, meta, state, sig, ctx, ids)


def test_quality_model_round_trips_through_the_bundle_without_pickle(untrained_bundle, tmp_path):
    b = _with_quality(untrained_bundle, tmp_path / "q")
    assert b.quality_model().to_dict() == _quality_dict()
    meta = json.loads((b.path / META_FILE).read_text())
    assert meta["quality"]["coef"] == _quality_dict()["coef"]  # plain JSON numbers
    assert load_bundle(untrained_bundle.path).quality_model() is None  # older bundles: no model
    meta["quality"]["features"] = ["something else"]
    (b.path / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="quality"):
        load_bundle(b.path).quality_model()
    meta["quality"] = _quality_dict()
    meta["ood"] |= {"conditioning": "recognised", "combination": {"spectral": [0.1, 0.5], "confidence": [-3.0, 1.0]}}
    (b.path / META_FILE).write_text(json.dumps(meta))
    det = load_bundle(b.path).detector()
    assert det.conditioning == "recognised" and det.combination["confidence"] == [-3.0, 1.0]
    meta["ood"]["combination"] = {"spectral": [0.1, -1.0], "confidence": [-3.0, 1.0]}
    (b.path / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="ood.combination"):
        load_bundle(b.path).detector()
    with open(b.path / "signatures.npz", "ab") as f:  # hashes still guard every file
        f.write(b"x")
    with pytest.raises(BundleError, match="corrupt"):
        load_bundle(b.path)


def test_predict_report_carries_quality_beside_ood(untrained_bundle, tmp_path, tiny_image):
    b = _with_quality(untrained_bundle, tmp_path / "q")
    pred = Predictor(b, "cpu").predict(tiny_image, PredictOptions())
    report = json.loads(json.dumps(pred.report()))
    q = report["quality"]
    assert set(q) == {"expected_dice", "per_structure", "flag"}
    assert 0.0 <= q["expected_dice"] <= 1.0 and isinstance(q["flag"], bool)
    ctx = next(c for c in b.contexts if c["name"] == report["context"])
    assert set(q["per_structure"]) == {b.label_names[v] for v in ctx["labels"]}
    assert "quality" in report["timings_s"]
    old = Predictor(untrained_bundle, "cpu").predict(tiny_image, PredictOptions()).report()
    assert old["quality"] is None and "ood" in old


def test_class_argmax_equals_torch_argmax_including_ties():
    from MultiTaskSegLib.uncertainty import class_argmax

    torch.manual_seed(3)
    probs = torch.softmax(torch.randn(6, 7, 8, 9), 0)
    probs[:, 0, 0, :3] = 1.0 / 6  # exact ties: the first class wins, as with argmax
    probs[2:4, 1, 1, 1] = 0.5
    probs[[0, 1, 4, 5], 1, 1, 1] = 0.0
    assert np.array_equal(class_argmax(probs), probs.argmax(0).numpy().astype(np.uint8))
    assert class_argmax(probs)[0, 0, 0] == 0 and class_argmax(probs)[1, 1, 1] == 2


def test_a_cached_record_of_an_older_format_is_made_again(tmp_path):
    from MultiTaskSegTraining.trust_records import RECORD_VERSION, cached_record

    path = tmp_path / "fit" / "case.json"
    made = []

    def make():
        made.append(1)
        return {"version": RECORD_VERSION, "dice": {"1": 0.5}}

    assert cached_record(path, make)["dice"] == {"1": 0.5} and cached_record(path, make) and len(made) == 1
    path.write_text(json.dumps({"dice": {"1": 0.9}}))  # format 1: no version, Dice without post-processing
    assert cached_record(path, make)["dice"] == {"1": 0.5} and len(made) == 2


def test_a_cached_record_made_with_other_settings_is_made_again(tmp_path):
    """A record made without a foreground threshold (absent key = None) serves only a run without one."""
    from MultiTaskSegTraining.trust_records import RECORD_VERSION, cached_record

    path = tmp_path / "fit" / "case.json"
    made = []

    def make(threshold):
        made.append(threshold)
        return {"version": RECORD_VERSION, "foreground_threshold": threshold}

    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"version": RECORD_VERSION}))  # before the setting existed
    assert "foreground_threshold" not in cached_record(path, lambda: make(None), {"foreground_threshold": None})
    assert cached_record(path, lambda: make(0.05), {"foreground_threshold": 0.05})["foreground_threshold"] == 0.05
    assert cached_record(path, lambda: make(0.05), {"foreground_threshold": 0.05}) and made == [0.05]
    assert cached_record(path, lambda: make(None), {"foreground_threshold": None})["foreground_threshold"] is None
    assert made == [0.05, None]


def _with_head(recs: list[dict], confidence: np.ndarray, n_contexts: int) -> list[dict]:
    """The records as the network saw them: recognised their own context with this confidence."""
    for r, c in zip(recs, confidence):
        probs = np.full(n_contexts, (1.0 - c) / (n_contexts - 1))
        probs[r["context"]] = c
        r["recognised"], r["context_probs"] = r["context"], probs.tolist()
    return recs


def test_a_small_less_confident_context_gets_its_own_threshold():
    """Few cases and a less sure context head make a context's in-distribution scores run high under one
    global threshold; its own leave-one-out quantile brings its false alarms back near the target."""
    rng = np.random.default_rng(3)
    big = _records(rng.normal(size=(300, 6)), 0, "a")
    small = _records(5.0 + rng.normal(size=(12, 6)), 1, "b")
    recs = _with_head(big, 1 - 0.01 * np.exp(0.3 * rng.normal(size=300)), 2)
    recs += _with_head(small, 1 - 0.05 * np.exp(0.3 * rng.normal(size=12)), 2)

    def false_alarms(det) -> float:
        fresh = 5.0 + rng.normal(size=(400, 6))
        conf = 1 - 0.05 * np.exp(0.3 * rng.normal(size=400))
        return float(np.mean([det.score(x, 1, c).is_ood for x, c in zip(fresh, conf)]))

    shared, _ = fit_detector(recs, ["enc0"], ["A", "B"], alpha=0.05, per_context=False)
    own, loo = fit_detector(recs, ["enc0"], ["A", "B"], alpha=0.05)
    assert own.context_factor is not None and own.context_factor[1] < 1.0 == own.context_factor[0]
    fa_shared, fa_own = false_alarms(shared), false_alarms(own)
    assert fa_shared > 0.3  # one threshold: most of the small context's new cases flagged
    assert fa_own < 0.15
    assert np.mean(loo[300:] > own.threshold) <= 0.1  # its own fit cases, left out one at a time
    # an outlier recognised as the small context is still caught
    assert own.score(np.full(6, 12.0), 1, 0.95).is_ood


def test_finalise_foreground_threshold_option():
    """`mtseg finalise --foreground-threshold`: a number or 'none' (every voxel); not given keeps the bundle's."""
    import argparse

    from MultiTaskSegTraining.finalise_cmd import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    base = ["--bundle", "b", "--data", "d", "-o", "o"]
    assert parser.parse_args(base).foreground_threshold is None  # keep the bundle's
    assert parser.parse_args(base + ["--foreground-threshold", "0.05"]).foreground_threshold == (0.05,)
    assert parser.parse_args(base + ["--foreground-threshold", "none"]).foreground_threshold == (None,)
    for bad in ("-1", "abc"):
        with pytest.raises(SystemExit):
            parser.parse_args(base + ["--foreground-threshold", bad])
