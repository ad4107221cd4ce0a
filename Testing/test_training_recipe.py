"""Issue 11's training pieces: patient grouping, split extension, per-structure sampling, post-processing,
learning-rate schedules, bf16/channels-last training, and the missing-extra message."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from MultiTaskSegLib.bundle import load_bundle
from MultiTaskSegLib.errors import MultiTaskSegError
from MultiTaskSegLib.postprocessing import choose_largest_component, keep_largest_component
from MultiTaskSegTraining.cli import main
from MultiTaskSegTraining.config import TrainConfig
from MultiTaskSegTraining.data import CachedCase, load_dataset, patient_group, split_cases
from MultiTaskSegTraining.sampling import PatchSampler, artefact, augment
from MultiTaskSegTraining.train import lr_at
from phantoms import make_msd_dataset
from train_helpers import phantom_datasets, rename_cases, tiny_config


def test_four_digit_case_numbers_are_cases_not_one_patient():
    assert patient_group("amos_0001") == "amos_0001" != patient_group("amos_0002")
    assert patient_group("acdc_patient007_frame02") == patient_group("acdc_patient007_frame01") == "acdc_patient007"
    assert patient_group("mnm_A1B2_ED") == patient_group("mnm_A1B2_ES")


def test_a_numbered_dataset_gets_validation_and_test_cases(tmp_path):
    root = make_msd_dataset(tmp_path, "Toy", "MR", n_cases=12)
    rename_cases(root, lambda i: f"toy_{i:04d}.nii.gz")
    split = split_cases(load_dataset(root), seed=0)
    assert len(split["test"]) == 2 and len(split["val"]) == 1 and len(split["train"]) == 9


def test_a_kept_split_stays_and_new_cases_fill_the_parts(tmp_path):
    spec = load_dataset(make_msd_dataset(tmp_path, "Grow", "MR", n_cases=20))
    ids = [c.case_id for c in spec.cases]
    old = {"train": ids[:5], "val": ids[5:6], "test": ids[6:8]}  # an earlier, smaller split
    new = split_cases(spec, seed=0, previous=old)
    for part, cases in old.items():
        assert set(cases) <= set(new[part])  # nothing moves
    assert len(new["test"]) == 4 and len(new["val"]) == 2 and len(new["train"]) == 14
    assert sorted(sum(new.values(), [])) == sorted(ids)
    assert split_cases(spec, seed=0, previous=old) == new  # deterministic


def _case(label: np.ndarray) -> CachedCase:
    return CachedCase(0, "c", np.zeros(label.shape, np.float16), label, (1.0, 1.0, 1.0))


def test_per_structure_sampling_sees_a_small_structure_as_often_as_a_large_one():
    label = np.zeros((40, 40, 40), np.uint8)
    label[5:35, 5:35, 5:20] = 1  # large
    label[30:33, 30:33, 30:33] = 2  # 27 voxels
    hits = {}
    for mode in ("any", "per_structure"):
        sampler = PatchSampler([_case(label)], 1, (8, 8, 8), foreground_fraction=1.0, seed=1, foreground_mode=mode)
        hits[mode] = np.mean([(sampler.sample()[1] == 2).any() for _ in range(400)])
    assert hits["any"] < 0.05
    assert 0.4 < hits["per_structure"] < 0.6


def test_largest_component_removes_stray_blobs_and_is_chosen_only_where_it_helps():
    ref = np.zeros((30, 30, 30), np.uint8)
    ref[5:15, 5:15, 5:15] = 1
    ref[20:25, 20:25, 20:25] = 2  # structure 2 really has two pieces
    ref[2:4, 20:25, 20:25] = 2
    pred = ref.copy()
    pred[25:28, 2:5, 2:5] = 1  # a stray blob of structure 1
    out = keep_largest_component(pred.copy(), [1, 2])
    assert (out == 1).sum() == 1000 and (out[25:28, 2:5, 2:5] == 0).all()
    chosen, record = choose_largest_component([(pred, ref)], [1, 2])
    assert chosen == [1]
    assert record[1]["dice_after"] == 1.0 > record[1]["dice_before"]
    assert record[2]["dice_after"] < record[2]["dice_before"]


def test_largest_component_is_kept_wherever_it_lies_and_other_labels_stay():
    """The largest piece comes second in scan order here (component 2, not 1); the first of equal largest
    pieces wins; pieces of other labels and diagonal (26-connected) contact are respected."""
    labels = np.zeros((12, 12, 12), np.uint8)
    labels[0, 0, 0:2] = 3  # small piece, first in scan order
    labels[5:8, 5:8, 5:8] = 3  # the largest piece
    labels[8, 8, 8] = 3  # touches the largest only at a corner: the same piece
    labels[11, 0:4, 0] = 4  # another label, in pieces, not filtered
    labels[11, 6, 0] = 4
    out = keep_largest_component(labels.copy(), [3])
    assert (out == 3).sum() == 28 and out[0, 0, 0] == 0 and out[8, 8, 8] == 3
    assert ((out == 4) == (labels == 4)).all()
    tie = np.zeros((4, 4, 9), np.uint8)
    tie[1, 1, 0:3] = tie[1, 1, 5:8] = 1
    out = keep_largest_component(tie.copy(), [1])
    assert (out[1, 1, 0:3] == 1).all() and (out[1, 1, 5:8] == 0).all()


def test_largest_component_gives_the_same_labels_with_cc3d_and_with_scipys_fallback(monkeypatch):
    """cc3d labels the components where it is installed, ndimage.label where not (Slicer's Python):
    the same pieces in the same order, so the same output, ties included, on blobby random labels."""
    from scipy import ndimage

    import MultiTaskSegLib.postprocessing as post

    assert post.cc3d is not None  # installed with the package: the fast path is the one tested first
    rng = np.random.default_rng(3)
    noise = ndimage.gaussian_filter(rng.random((40, 50, 60)), 1.5)
    labels = np.digitize(noise, np.quantile(noise, [0.6, 0.8, 0.95])).astype(np.uint8)  # 0 … 3 in many pieces
    labels[:3] = 0  # a background margin: the search box is smaller than the array
    fast = keep_largest_component(labels.copy(), [1, 2, 3])
    monkeypatch.setattr(post, "cc3d", None)
    slow = keep_largest_component(labels.copy(), [1, 2, 3])
    assert (fast != labels).any()  # pieces were removed
    np.testing.assert_array_equal(fast, slow)


def test_artefact_augmentation_draws_a_smooth_bias_field_and_a_mass_preserving_blur():
    import torch

    flat = torch.full((1, 1, 24, 24, 24), 0.5)
    biased = artefact(flat, np.random.default_rng(0), p_bias=1.0, p_blur=0.0)
    ratio = (biased / flat)[0, 0]
    assert 0.6 < float(ratio.min()) < float(ratio.max()) < 1.66  # a field, not a constant, within ×exp(±0.5)
    assert float(ratio.diff(dim=0).abs().max()) < 0.1  # smooth: neighbours differ by little
    delta = torch.zeros((1, 1, 25, 25, 25))
    delta[0, 0, 12, 12, 12] = 1.0
    blurred = artefact(delta, np.random.default_rng(1), p_bias=0.0, p_blur=1.0)
    assert blurred.shape == delta.shape
    assert float(blurred.sum()) == pytest.approx(1.0, abs=1e-5)  # intensity is spread, not lost
    assert float(blurred.max()) < 0.5 and float(blurred[0, 0, 12, 12, 11]) > 0
    assert torch.equal(artefact(flat, np.random.default_rng(2), p_bias=0.0, p_blur=0.0), flat)


def test_artefact_augmentation_changes_images_and_never_labels():
    import torch

    rng = np.random.default_rng(3)
    x = torch.from_numpy(rng.uniform(0, 1, (2, 1, 20, 20, 20)).astype(np.float32))
    y = torch.from_numpy(rng.integers(0, 3, (2, 20, 20, 20)))
    # p=0: no geometric transform, so the labels must come back exactly as given
    (xa, ya), (xb, yb) = (augment(x, y, np.random.default_rng(4), p=0.0, artefacts=a) for a in (False, True))
    assert torch.equal(ya, y) and torch.equal(yb, y)
    assert xa.shape == xb.shape == x.shape and not torch.equal(xa, xb)


def test_poly_and_cosine_schedules_end_at_zero_and_unknown_is_refused():
    for schedule in ("cosine", "poly"):
        config = TrainConfig(lr=1e-2, steps=100, warmup_steps=10, lr_schedule=schedule)
        assert lr_at(config, 0.1) == pytest.approx(1e-2)
        assert lr_at(config, 1.0) == pytest.approx(0.0, abs=1e-12)
    assert lr_at(TrainConfig(steps=100, warmup_steps=10, lr_schedule="poly"), 0.55) > lr_at(
        TrainConfig(steps=100, warmup_steps=10, lr_schedule="cosine"), 0.55
    )
    with pytest.raises(MultiTaskSegError, match="lr_schedule"):
        lr_at(TrainConfig(lr_schedule="step"), 0.5)


def test_command_line_lr_and_steps_override_the_config_file(tmp_path):
    import argparse

    from MultiTaskSegTraining.train_cmd import add_arguments, config_from_args

    path = tmp_path / "x.json"
    path.write_text(json.dumps({"lr": 2e-3, "steps": 100}), encoding="utf-8")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    config = config_from_args(parser.parse_args(["--config", str(path), "-o", "out", "--lr", "5e-4"]))
    assert (config.lr, config.steps) == (5e-4, 100)
    config = config_from_args(parser.parse_args(["--config", str(path), "-o", "out", "--steps", "7"]))
    assert (config.lr, config.steps) == (2e-3, 7)


def test_yaml_config_without_the_training_extra_names_the_extra(tmp_path, monkeypatch):
    path = tmp_path / "x.yaml"
    path.write_text("steps: 3\n", encoding="utf-8")
    monkeypatch.setitem(sys.modules, "yaml", None)  # as if PyYAML were not installed
    with pytest.raises(MultiTaskSegError, match=r"multitaskseg\[train\]"):
        TrainConfig.from_file(path)


def test_bf16_channels_last_training_with_poly_schedule_writes_a_bundle_with_postprocessing(tmp_path):
    data = phantom_datasets(tmp_path / "data")
    config = tiny_config(
        tmp_path / "c.json",
        data,
        cpu_bf16=True,
        channels_last=True,
        lr_schedule="poly",
        signature_augmentations=0,
        validate_every=3,
    )
    out = tmp_path / "b"
    assert main(["train", "--config", str(config), "-o", str(out), "--cache-dir", str(tmp_path / "cache")]) == 0
    meta = load_bundle(out).meta
    assert meta["training"]["config"]["cpu_bf16"] is True
    post = meta["postprocessing"]
    assert set(post["largest_component"]) <= {1, 2, 3, 4}
    assert "validation" in post["chosen_on"]
    curve = [json.loads(line) for line in (tmp_path / "b_work" / "validation.jsonl").read_text().splitlines()]
    assert [r["step"] for r in curve] == [3, 6]
    assert set(curve[0]["dice"]) == {"liver", "spleen", "left ventricle", "myocardium", "mean"}
    assert all(0.0 <= v <= 1.0 for r in curve for v in r["dice"].values())


def test_a_finetune_keeps_the_init_bundles_split(tmp_path):
    data = phantom_datasets(tmp_path / "data")
    first = tmp_path / "first"
    assert (
        main(
            [
                "train",
                "--config",
                str(tiny_config(tmp_path / "a.json", data, steps=2, signature_augmentations=0)),
                "-o",
                str(first),
                "--cache-dir",
                str(tmp_path / "cache"),
            ]
        )
        == 0
    )
    split = load_bundle(first).meta["training"]["split"]
    # change the seed: a fresh split would differ, the kept one must not
    config = tiny_config(tmp_path / "b.json", data, steps=2, seed=5, signature_augmentations=0)
    second = tmp_path / "second"
    assert (
        main(
            [
                "train",
                "--config",
                str(config),
                "-o",
                str(second),
                "--init-bundle",
                str(first),
                "--cache-dir",
                str(tmp_path / "cache"),
            ]
        )
        == 0
    )
    assert load_bundle(second).meta["training"]["split"] == split
