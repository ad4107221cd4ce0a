"""mtseg evaluate: hand-computed metrics on constructed cases, and an end-to-end run on phantoms."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import SimpleITK as sitk

from MultiTaskSegLib.calibration import reliability
from MultiTaskSegTraining.cli import main
from MultiTaskSegTraining.evaluate import PooledReliability, dice, hd95, json_clean, summarise
from MultiTaskSegTraining.ood_baselines import (
    MahalanobisDetector,
    SizeControlDetector,
    central_crop,
    detection_metrics,
    geometry_features,
    pad_to_factor,
)
from phantoms import make_msd_dataset, noise_volume, write
from train_helpers import phantom_datasets, tiny_config

# --- constructed cases -------------------------------------------------------------------------


def test_dice_hand_computed():
    gt = np.zeros((10, 10, 10), bool)
    gt[2:6, 2:6, 2:6] = True  # 64 voxels
    pred = np.zeros_like(gt)
    pred[2:6, 2:6, 3:7] = True  # shifted by one voxel in x: overlap 4·4·3 = 48
    assert dice(pred, gt) == pytest.approx(2 * 48 / 128)  # 0.75
    assert dice(gt, gt) == 1.0
    assert dice(np.zeros_like(gt), gt) == 0.0
    assert dice(np.zeros_like(gt), np.zeros_like(gt)) is None  # both empty: undefined


def test_hd95_two_slabs_offset_by_a_known_distance():
    # two parallel one-voxel-thick slabs of the same extent, 3 voxels apart along z, z spacing 2.5 mm:
    # every surface voxel of either is exactly 7.5 mm from the other
    gt = np.zeros((12, 8, 8), bool)
    pred = np.zeros_like(gt)
    gt[3] = True
    pred[6] = True
    assert hd95(pred, gt, (2.5, 1.0, 0.7)) == pytest.approx(7.5)
    # the same along x with x spacing 0.7 mm: 4 voxels → 2.8 mm
    gt2 = np.zeros((8, 8, 12), bool)
    pred2 = np.zeros_like(gt2)
    gt2[..., 2] = True
    pred2[..., 6] = True
    assert hd95(pred2, gt2, (2.5, 1.0, 0.7)) == pytest.approx(2.8)
    cube = np.zeros((20, 20, 20), bool)
    cube[5:15, 5:15, 5:15] = True
    assert hd95(cube, cube, (1, 1, 1)) == 0.0
    assert hd95(np.zeros_like(cube), cube, (1, 1, 1)) is None  # empty mask: undefined


def test_hd95_cube_inside_larger_cube():
    # concentric cubes 2 voxels apart on every face (1 mm voxels): face distances are 2, edges and
    # corners sqrt(8) / sqrt(12); the 95th percentile lies between 2 and sqrt(12)
    small = np.zeros((30, 30, 30), bool)
    small[10:20, 10:20, 10:20] = True
    big = np.zeros_like(small)
    big[8:22, 8:22, 8:22] = True
    value = hd95(big, small, (1, 1, 1))
    assert 2.0 <= value <= math.sqrt(12) + 1e-9


def test_ece_hand_computed_and_pooled_over_cases():
    # 4 voxels at p = 0.25 with 1 positive (gap 0), 4 at p = 0.75 with 2 positives (gap 0.25)
    prob = np.array([0.25] * 4 + [0.75] * 4)
    target = np.array([1, 0, 0, 0, 1, 1, 0, 0])
    rel = reliability(prob, target, n_bins=10)
    assert rel.ece == pytest.approx(0.5 * 0 + 0.5 * 0.25)
    assert rel.mce == pytest.approx(0.25)
    pooled = PooledReliability(10)
    pooled.add(reliability(prob[:4], target[:4]))  # split over two "cases"
    pooled.add(reliability(prob[4:], target[4:]))
    pooled.add(None)  # a case with no boundary band
    result = pooled.result()
    assert result.ece == pytest.approx(0.125)
    assert result.mce == pytest.approx(0.25)
    assert result.counts.sum() == 8


def test_auroc_and_fpr_at_95_tpr_known_answer():
    ind = [0.1, 0.2, 0.3, 0.4]
    ood = [0.35, 0.5, 0.6, 0.7]
    m = detection_metrics(ind, ood)
    # 15 of the 16 (ID, OOD) pairs are ordered correctly
    assert m["auroc"] == pytest.approx(15 / 16)
    # flagging all 4 OOD cases (TPR ≥ 0.95) needs threshold ≤ 0.35, which also flags 0.4: FPR = 1/4
    assert m["fpr_at_95_tpr"] == pytest.approx(0.25)
    perfect = detection_metrics([0, 1], [2, 3])
    assert perfect["auroc"] == 1.0 and perfect["fpr_at_95_tpr"] == 0.0
    assert detection_metrics([0.1], [])["auroc"] is None
    assert detection_metrics([0.1, None, float("nan")], [0.5])["n_in_distribution"] == 1


def test_baseline_detectors_and_size_variants():
    rng = np.random.default_rng(0)
    feats = np.concatenate([rng.normal(0, 1, (20, 4)), rng.normal(5, 1, (20, 4))])
    maha = MahalanobisDetector.fit(feats, [0] * 20 + [1] * 20)
    assert maha.score(np.zeros(4)) < maha.score(np.full(4, 20.0))
    train = np.stack([geometry_features((100, 100, 50), (1, 1, 2)), geometry_features((120, 110, 60), (1, 1, 2))])
    control = SizeControlDetector.fit(train)
    assert control.score(train[0]) == pytest.approx(0.0)
    assert control.score(geometry_features((30, 30, 10), (4, 4, 8))) > 1.0
    image = sitk.GetImageFromArray(rng.normal(size=(10, 12, 16)).astype(np.float32))
    image.SetSpacing((1.0, 2.0, 3.0))
    crop = central_crop(image)
    assert crop.GetSize() == (8, 6, 5)
    np.testing.assert_allclose(crop.GetOrigin(), image.TransformIndexToPhysicalPoint((4, 3, 2)))
    pad = pad_to_factor(image)
    assert pad.GetSize() == (32, 24, 20)
    assert sitk.GetArrayViewFromImage(pad).min() == sitk.GetArrayViewFromImage(image).min()


def test_field_of_view_variant_reframes_the_same_voxels_reproducibly():
    """Per-axis crops and pads keep every kept voxel where it was; the variant is seeded; factors lie in the
    range; a stack of few slices (cine) keeps its slices."""
    from MultiTaskSegTraining.ood_baselines import FIELD_OF_VIEW_RANGE, field_of_view_variant

    rng = np.random.default_rng(3)
    image = sitk.GetImageFromArray(rng.normal(size=(40, 30, 50)).astype(np.float32))  # x 50, y 30, z 40
    image.SetSpacing((0.8, 0.8, 2.0))
    image.SetOrigin((10.0, -5.0, 3.0))
    crop = central_crop(image, (0.5, 1.0, 0.75))
    assert crop.GetSize() == (25, 30, 30)
    pad = pad_to_factor(image, (1.0, 1.2, 1.0))
    assert pad.GetSize() == (50, 36, 40)
    sizes = set()
    for seed in range(8):
        v = field_of_view_variant(image, seed)
        again = field_of_view_variant(image, seed)
        assert v.GetSize() == again.GetSize() and v.GetOrigin() == again.GetOrigin()
        ratio = np.asarray(v.GetSize()) / np.asarray(image.GetSize())
        lo, hi = FIELD_OF_VIEW_RANGE
        assert ratio[0] == pytest.approx(ratio[1], abs=0.05) and all(lo - 0.05 <= r <= hi + 0.05 for r in ratio)
        # a voxel of the original keeps its value at its physical point
        centre = [s // 2 for s in image.GetSize()]
        point = image.TransformIndexToPhysicalPoint(centre)
        index = v.TransformPhysicalPointToIndex(point)
        assert v[index] == image[centre]
        sizes.add(v.GetSize())
    assert len(sizes) > 4  # seeds give different framings
    cine = image[:, :, :8]  # 8 slices
    assert all(field_of_view_variant(cine, seed).GetSize()[2] == 8 for seed in range(4))


def test_summaries_are_json_clean():
    s = summarise({"a": 0.5, "b": None, "c": 1.0})
    assert s["mean"] == pytest.approx(0.75) and s["n"] == 2 and s["n_undefined"] == 1
    text = json.dumps(json_clean({"x": float("nan"), "y": np.float32(1.5), "z": (np.int64(2),)}), allow_nan=False)
    assert json.loads(text) == {"x": None, "y": 1.5, "z": [2]}


# --- end to end on phantoms ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    data = phantom_datasets(root / "data")
    config = tiny_config(root / "config.json", data)
    bundle = root / "bundle"
    assert main(["train", "--config", str(config), "-o", str(bundle), "--cache-dir", str(root / "cache")]) == 0
    ood = root / "ood"
    # ood-dev layout: images with labels beside them (labels must be ignored) ...
    write(noise_volume(seed=3), ood / "noise_image.nii.gz")
    write(sitk.Cast(noise_volume(seed=3) > 0, sitk.sitkUInt8), ood / "noise_label.nii.gz")
    write(noise_volume(size=(20, 24, 16), spacing=(2.0, 2.0, 3.0), seed=4), ood / "small_image.nii.gz")
    # ... and a generic folder: every volume counts
    plain = root / "ood_plain"
    write(noise_volume(seed=5), plain / "other.nii.gz")
    return root, data, bundle, [ood, plain]


@pytest.mark.slow
def test_evaluate_end_to_end(trained):
    root, data, bundle, ood = trained
    out = root / "evaluation"
    argv = [
        "evaluate",
        "--bundle",
        str(bundle),
        "--data",
        *map(str, data),
        "--ood",
        *map(str, ood),
        "--output-dir",
        str(out),
        "--mc-dropout",
        "1",
        "--mc-dropout-cases",
        "1",
        "--max-train-cases",
        "2",
        "--cache-dir",
        str(root / "cache"),
        "-q",
    ]
    assert main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert "NaN" not in (out / "metrics.json").read_text(encoding="utf-8")
    assert metrics["split"] == "test"
    meta = json.loads((bundle / "bundle.json").read_text(encoding="utf-8"))
    assert set(metrics["contexts"]) == {"AbdomenPhantomCT", "HeartPhantomMR"}
    for name, ctx in metrics["contexts"].items():
        test_ids = meta["training"]["split"][name]["test"]
        assert ctx["n_cases"] == len(test_ids) and ctx["case_ids"] == test_ids
        assert (
            set(ctx["structures"])
            == {"AbdomenPhantomCT": {"liver", "spleen"}, "HeartPhantomMR": {"left ventricle", "myocardium"}}[name]
        )
        for s in ctx["structures"].values():
            assert set(s["dice"]) >= {"mean", "std", "median", "cases"}
            assert set(s["dice"]["cases"]) == set(test_ids)
            assert s["dice"]["mean"] is None or 0.0 <= s["dice"]["mean"] <= 1.0
            assert set(s["hd95_mm"]) >= {"mean", "std", "median", "cases"}
        assert set(ctx["dice_restricted"]) == set(ctx["structures"])
        assert "pooled" in ctx["confusion_rate"]
        keys = list(ctx["calibration"])
        assert keys[0] == "T=1" and len(keys) in (1, 2)
        for per_structure in ctx["calibration"].values():
            for c in per_structure.values():
                assert set(c) >= {"ece", "mce", "ece_boundary", "mce_boundary"}
                assert c["ece"] is not None and 0.0 <= c["ece"] <= 1.0
        assert 0.0 <= ctx["false_alarm_rate"] <= 1.0
        assert set(ctx["context_recognition"]) >= {"head", "signature"}
    detectors = metrics["ood"]["detectors"]
    layers = meta["ood"]["layers"]
    kind = meta["ood"]["detector"]  # training ends with the trust fit
    expected = {
        f"{kind}:{'+'.join(layers)}",
        *(f"spectral:{l}" for l in layers),
        "entropy_whole",
        "entropy_foreground",
        "max_softmax",
        "mc_dropout_entropy",
        "mahalanobis",
        "size_control",
    }
    assert set(detectors) == expected
    for d in detectors.values():
        assert d["auroc"] is None or 0.0 <= d["auroc"] <= 1.0
        assert set(d) >= {"auroc", "fpr_at_95_tpr"}
    cases = metrics["ood"]["cases"]
    ood_names = sorted(c["case"] for c in cases if c["ood"])
    assert ood_names == ["noise", "other", "small"]  # labels in the ood-dev folder are not cases
    n_test = sum(len(v["test"]) for v in meta["training"]["split"].values())
    assert sum(not c["ood"] for c in cases) == n_test
    assert detectors["mc_dropout_entropy"]["n_in_distribution"] == 2  # one per context
    variants = {(r["context"], r["variant"]) for r in metrics["size_control"]}
    assert {v for _, v in variants} == {"original", "crop_central_50pct", "pad_2x_min"}
    assert all(set(r) >= {"score", "is_ood", "size"} for r in metrics["size_control"])
    assert metrics["plots"]
    for name in metrics["plots"]:
        assert (out / name).stat().st_size > 1000
    assert {
        "signatures_pca.png",
        "ood_roc.png",
        "reliability_AbdomenPhantomCT.png",
        "reliability_HeartPhantomMR.png",
    } <= set(metrics["plots"])
    # the single-layer training signatures are the slices of the concatenated ones
    from MultiTaskSegLib.bundle import load_bundle
    from MultiTaskSegLib.ood import signature_from_grams

    grams = {"enc2": np.eye(16), "dec0": np.diag(np.arange(1.0, 5.0))}
    both = signature_from_grams(grams, layers)
    np.testing.assert_allclose(both[:16], signature_from_grams(grams, ["enc2"]))
    assert load_bundle(bundle).detector().signatures.shape[1] == 16 + 4
    # an existing metrics.json is not overwritten silently
    assert main(argv) == 1


def test_evaluate_refuses_a_dataset_the_bundle_does_not_know(trained, tmp_path, capsys):
    root, data, bundle, _ = trained
    other = make_msd_dataset(tmp_path, "ProstatePhantomMR", "MR", n_cases=2, labels=("prostate",))
    code = main(
        [
            "evaluate",
            "--bundle",
            str(bundle),
            "--data",
            str(data[0]),
            str(other),
            "--output-dir",
            str(tmp_path / "out"),
            "-q",
        ]
    )
    assert code != 0
    err = capsys.readouterr().err
    assert "ProstatePhantomMR" in err and "not one this bundle was trained on" in err
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_evaluate_refuses_mismatched_case_ids(trained, tmp_path, capsys):
    root, data, bundle, _ = trained
    # same dataset name, other cases: the bundle's split cannot be found in it
    fake = make_msd_dataset(tmp_path / "x", "AbdomenPhantomCT", "CT", n_cases=2)
    meta = json.loads((fake / "dataset.json").read_text(encoding="utf-8"))
    for e in meta["training"]:
        for k in ("image", "label"):
            src = fake / e[k]
            dst = src.with_name("renamed_" + src.name)
            src.rename(dst)
            e[k] = "./" + str(dst.relative_to(fake))
    (fake / "dataset.json").write_text(json.dumps(meta), encoding="utf-8")
    code = main(["evaluate", "--bundle", str(bundle), "--data", str(fake), "--output-dir", str(tmp_path / "o"), "-q"])
    assert code != 0
    assert "case id(s) of the bundle's split" in capsys.readouterr().err
