"""mtseg train on phantoms: bundle, resume, split, partial-label loss, bad datasets."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import SimpleITK as sitk
import torch

from MultiTaskSegLib.bundle import load_bundle
from MultiTaskSegTraining.cli import main
from MultiTaskSegTraining.data import load_dataset, split_cases
from MultiTaskSegTraining.losses import partial_label_loss
from phantoms import make_msd_dataset
from train_helpers import phantom_datasets, rename_cases, tiny_config, train_args


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    return phantom_datasets(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, datasets):
    root = tmp_path_factory.mktemp("run")
    config = tiny_config(root / "config.json", datasets)
    out = root / "bundle"
    assert main(["train", "--config", str(config), "-o", str(out), "--cache-dir", str(root / "cache")]) == 0
    return out


def test_joint_training_writes_a_bundle_that_predict_uses(trained, datasets, tmp_path):
    bundle = load_bundle(trained)
    meta = bundle.meta
    assert [c["name"] for c in meta["contexts"]] == ["AbdomenPhantomCT", "HeartPhantomMR"]
    assert [l["name"] for l in meta["labels"]] == ["liver", "spleen", "left ventricle", "myocardium"]
    assert meta["contexts"][0]["labels"] == [1, 2] and meta["contexts"][1]["labels"] == [3, 4]
    assert meta["training"]["steps"] == 6
    assert meta["calibration"]["temperature"] > 0
    det = bundle.detector()
    # the end of training runs mtseg finalise's fit: per-context detector on up to 4 train+val cases per context,
    # each as it is and reframed (another field of view) among the references
    fit = sum(min(4, len(v["train"]) + len(v["val"])) for v in meta["training"]["split"].values())
    assert det.signatures.shape[0] == 2 * fit
    assert len(set(det.case_ids)) == fit  # a reframed copy counts as its case (left out with it)
    assert meta["ood"]["detector"] == "spectral-ctx-recognised+confidence" and meta["ood"]["threshold"] > 0
    assert meta["quality"]["fitted_on"].startswith(f"{fit} train/val cases")
    image = sorted((datasets[0] / "imagesTr").iterdir())[0]
    out = tmp_path / "pred"
    assert main(["predict", "--bundle", str(trained), str(image), "-o", str(out), "-q"]) == 0
    case = image.name[:-7]
    seg = sitk.ReadImage(str(out / f"{case}_seg.nii.gz"))
    assert seg.GetSize() == sitk.ReadImage(str(image)).GetSize()
    report = json.loads((out / f"{case}.json").read_text(encoding="utf-8"))
    assert set(report["labels"].values()) == {"liver", "spleen", "left ventricle", "myocardium"}
    assert report["ood"]["detector"] == "spectral-ctx-recognised+confidence:enc2+dec0"
    assert 0.0 <= report["quality"]["expected_dice"] <= 1.0
    assert set(report["quality"]["per_structure"]) <= {"liver", "spleen", "left ventricle", "myocardium"}


def test_split_is_deterministic_patient_level_and_test_cases_are_never_read(trained, datasets, monkeypatch, tmp_path):
    spec = load_dataset(datasets[0])
    a, b = split_cases(spec, seed=0), split_cases(spec, seed=0)
    assert a == b
    parts = [set(a[k]) for k in ("train", "val", "test")]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    assert set().union(*parts) == {c.case_id for c in spec.cases}
    assert split_cases(spec, seed=1) != a or len(spec.cases) < 3
    # the bundle records the split, and training never preprocessed a test case
    split = load_bundle(trained).meta["training"]["split"]
    cached = {p.name.split("__")[1] for p in (trained.parent / "cache").iterdir()}
    tests = {c for s in split.values() for c in s["test"]}
    assert tests and not (tests & cached)


def test_acdc_frames_of_one_patient_share_a_split(tmp_path):
    root = make_msd_dataset(tmp_path, "Frames", "MR", n_cases=8)
    rename_cases(root, lambda i: f"patient{i // 2:03d}_frame{i % 2 + 1:02d}.nii.gz")  # patientNNN_frame0K pairs
    split = split_cases(load_dataset(root), seed=3)
    for part in split.values():
        patients = {c.split("_frame")[0] for c in part}
        for other in split.values():
            if other is not part:
                assert not patients & {c.split("_frame")[0] for c in other}


def test_resume_continues_from_the_checkpoint(datasets, tmp_path):
    config = tiny_config(tmp_path / "c.json", datasets, steps=4, checkpoint_every=2, signature_augmentations=0)
    out, work = tmp_path / "b", tmp_path / "w"
    common = train_args(config, out, work, tmp_path / "cache")
    assert main(common) == 0
    first = torch.load(work / "checkpoint.pt", weights_only=True)
    assert first["step"] == 4
    # a longer run resumed from step 4 must start there, not from scratch
    shutil.rmtree(out)
    assert main(common + ["--steps", "8", "--resume"]) == 0
    log = (work / "train.log").read_text(encoding="utf-8")
    assert "resumed from step 4" in log
    assert torch.load(work / "checkpoint.pt", weights_only=True)["step"] == 8
    # without --resume an existing checkpoint is refused rather than silently overwritten
    shutil.rmtree(out)
    assert main(common) == 1


def test_partial_label_loss_does_not_push_unannotated_structures_to_background():
    torch.manual_seed(0)
    k = 4  # background, liver (annotated), left ventricle and myocardium (not annotated here)
    logits = torch.randn(1, k, 3, 3, 3, requires_grad=True)
    target = torch.zeros(1, 3, 3, 3, dtype=torch.long)
    target[0, 1, 1, 1] = 1
    loss = partial_label_loss(logits, target, [[1]])
    loss.backward()
    g = logits.grad[0]
    p = torch.softmax(logits.detach()[0], 0)
    # The loss sees background and the unannotated classes only through p0 + p2 + p3, so its
    # gradient with respect to each of their logits is proportional to its probability: moving
    # mass from an unannotated structure to background changes nothing (zero directional gradient).
    bg = target[0] == 0
    ratio0 = g[0][bg] / p[0][bg]
    for c in (2, 3):
        assert torch.allclose(g[c][bg] / p[c][bg], ratio0, atol=1e-6)
    # ...whereas a fully supervised loss (every class annotated) does push them to background
    logits.grad = None
    partial_label_loss(logits, target, [[1, 2, 3]]).backward()
    g_full = logits.grad[0]
    assert not torch.allclose(g_full[2][bg] / p[2][bg], g_full[0][bg] / p[0][bg], atol=1e-3)


def _marginal_loss_by_definition(logits, target, annotated):
    """The marginal loss written out: merged softmax, NLL, soft Dice on a one-hot map (what the loss computes)."""
    out = []
    for b in range(logits.shape[0]):
        ann = sorted(annotated[b])
        p = torch.softmax(logits[b].double(), 0)
        merged = torch.stack([p[[c for c in range(p.shape[0]) if c not in ann]].sum(0)] + [p[c] for c in ann])
        t = torch.zeros_like(target[b])
        for i, v in enumerate(ann):
            t[target[b] == v] = i + 1
        ce = torch.nn.functional.nll_loss(merged.log()[None], t[None])
        onehot = torch.nn.functional.one_hot(t, len(ann) + 1).movedim(-1, 0)[1:].double()
        inter, denom = (merged[1:] * onehot).flatten(1).sum(1), (merged[1:] + onehot).flatten(1).sum(1)
        out.append(ce + 1 - ((2 * inter + 1e-5) / (denom + 1e-5)).mean())
    return torch.stack(out).mean()


def test_partial_label_loss_equals_its_definition():
    torch.manual_seed(1)
    logits = (torch.randn(3, 6, 5, 6, 7) * 3).requires_grad_(True)
    annotated = [[1, 2], [4], [1, 2, 3, 4, 5]]  # partial, one structure, everything annotated
    # a dataset's labels hold background and its own structures only
    target = torch.stack([torch.tensor([0, *a])[torch.randint(0, len(a) + 1, (5, 6, 7))] for a in annotated])
    loss = partial_label_loss(logits, target, annotated)
    (grad,) = torch.autograd.grad(loss, logits)
    ref = _marginal_loss_by_definition(logits, target, annotated)
    (ref_grad,) = torch.autograd.grad(ref, logits)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-7)


def _break(root, how):
    meta = json.loads((root / "dataset.json").read_text(encoding="utf-8"))
    first = root / meta["training"][0]["label"]
    if how == "missing":
        first.unlink()
    elif how == "size":
        img = sitk.ReadImage(str(first))
        sitk.WriteImage(sitk.Image([s + 3 for s in img.GetSize()], sitk.sitkUInt8), str(first))
    elif how == "undeclared":
        img = sitk.ReadImage(str(first))
        arr = sitk.GetArrayFromImage(img)
        arr[0, 0, 0] = 9
        out = sitk.GetImageFromArray(arr)
        out.CopyInformation(img)
        sitk.WriteImage(out, str(first))
    elif how == "empty":
        meta["training"] = []
        (root / "dataset.json").write_text(json.dumps(meta), encoding="utf-8")
    elif how == "no-json":
        (root / "dataset.json").unlink()


@pytest.mark.parametrize(
    "how,message",
    [
        ("missing", "missing"),
        ("size", "does not match image size"),
        ("undeclared", "not declared"),
        ("empty", "no training cases"),
        ("no-json", "no dataset.json"),
    ],
)
def test_bad_datasets_fail_clearly_before_training(tmp_path, capsys, how, message):
    root = make_msd_dataset(tmp_path, "Broken", "CT", n_cases=3)
    _break(root, how)
    config = tiny_config(tmp_path / "c.json", [root])
    code = main(["train", "--config", str(config), "-o", str(tmp_path / "b"), "--cache-dir", str(tmp_path / "cache")])
    err = capsys.readouterr().err
    assert code == 1
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "b_work" / "checkpoint.pt").exists()


def test_shared_foreground_mode_reproduces_the_original_setup(datasets, tmp_path):
    config = tiny_config(
        tmp_path / "c.json", datasets, steps=2, label_mode="shared_foreground", signature_augmentations=0
    )
    out = tmp_path / "b"
    assert main(["train", "--config", str(config), "-o", str(out), "--cache-dir", str(tmp_path / "cache")]) == 0
    meta = load_bundle(out).meta
    assert [l["name"] for l in meta["labels"]] == ["foreground"]
    assert meta["inference"]["restrict_to_context"] is False


def test_fine_tune_from_a_bundle_with_frozen_encoder(trained, datasets, tmp_path):
    config = tiny_config(tmp_path / "c.json", datasets[1:], steps=2, signature_augmentations=0)
    out = tmp_path / "ft"
    assert (
        main(
            [
                "train",
                "--config",
                str(config),
                "-o",
                str(out),
                "--mode",
                "finetune",
                "--init-bundle",
                str(trained),
                "--finetune",
                "decoder",
                "--cache-dir",
                str(tmp_path / "cache"),
            ]
        )
        == 0
    )
    source = load_bundle(trained).load_model()
    tuned = load_bundle(out).load_model()
    # frozen encoder: identical weights; decoder: trained further
    for (name, a), (_, b) in zip(source.encoders.state_dict().items(), tuned.encoders.state_dict().items()):
        assert torch.equal(a, b), name
    assert not all(torch.equal(a, b) for a, b in zip(source.decoders.parameters(), tuned.decoders.parameters()))


def test_compiled_training_writes_the_same_kind_of_bundle(datasets, tmp_path):
    """``compile: true`` trains through torch.compile; checkpoints and bundle hold the eager module's names."""
    config = tiny_config(
        tmp_path / "c.json", datasets, steps=3, checkpoint_every=3, compile=True, channels_last=True, trust_fit_cases=0
    )
    out, work = tmp_path / "b", tmp_path / "w"
    args = train_args(config, out, work, tmp_path / "c")
    # a process of its own, as `mtseg train` runs: libraries imported by other tests (VTK) may have set the
    # C locale in this one, and the compiler stack then fails on non-ASCII files (training falls back to
    # eager); UTF-8 mode as a user with an ASCII locale is told to use
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root / "MultiTaskSeg"), str(root)]), "PYTHONUTF8": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "MultiTaskSegTraining.cli", *args], capture_output=True, encoding="utf-8", env=env
    )
    assert run.returncode == 0, run.stderr[-2000:]
    log = (work / "train.log").read_text(encoding="utf-8")
    assert "torch.compile failed" not in log  # a C++ compiler is there in CI: the compiled path really ran
    state = torch.load(work / "checkpoint.pt", weights_only=True)
    assert state["step"] == 3 and not any(k.startswith("_orig_mod") for k in state["model"])
    steps = {int(v["step"]) for v in state["optimizer"]["state"].values()}
    assert steps == {3}  # the optimiser stepped the shared parameters every step
    model = load_bundle(out).load_model()
    assert all(torch.isfinite(p).all() for p in model.parameters())
