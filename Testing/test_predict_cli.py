"""`mtseg predict`, in-process (``cli.main``) and as a real subprocess: outputs, geometry, errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import phantoms
from MultiTaskSegLib.bundle import Bundle
from MultiTaskSegTraining.cli import main

OBLIQUE = phantoms.oblique_lps_direction()
SMALL = ((24, 24, 12), (4.0, 4.0, 4.0))
REPORT_KEYS = {"ood", "labels", "volumes_ml", "mean_uncertainty", "device", "timings_s"}
OOD_KEYS = {"score", "threshold", "is_ood", "nearest_context", "detector"}


def predict(capsys, bundle, *inputs, out, extra=()):
    rc = main(
        [
            "predict",
            "--bundle",
            str(bundle),
            *map(str, inputs),
            "--output-dir",
            str(out),
            "--device",
            "cpu",
            "-q",
            *extra,
        ]
    )
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and "Traceback" not in captured.out
    return rc, captured.err


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


def assert_same_grid(image: sitk.Image, reference: sitk.Image) -> None:
    assert image.GetSize() == reference.GetSize()
    np.testing.assert_allclose(image.GetSpacing(), reference.GetSpacing(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(image.GetOrigin(), reference.GetOrigin(), rtol=0, atol=1e-4)
    np.testing.assert_allclose(image.GetDirection(), reference.GetDirection(), rtol=0, atol=1e-6)


def check_outputs(out: Path, case: str, reference: sitk.Image, bundle: Bundle) -> dict:
    seg_path, unc_path, rep_path = out / f"{case}_seg.nii.gz", out / f"{case}_uncertainty.nii.gz", out / f"{case}.json"
    for p in (seg_path, unc_path, rep_path):
        assert p.is_file(), p
    seg, unc = sitk.ReadImage(str(seg_path)), sitk.ReadImage(str(unc_path))
    assert seg.GetPixelID() == sitk.sitkUInt8
    assert unc.GetPixelID() == sitk.sitkFloat32
    assert_same_grid(seg, reference)
    assert_same_grid(unc, reference)
    s, u = sitk.GetArrayFromImage(seg), sitk.GetArrayFromImage(unc)
    assert set(np.unique(s).tolist()) <= {0, *bundle.label_names}
    assert np.isfinite(u).all() and u.min() >= 0.0 and u.max() <= 1.0
    report = json.loads(rep_path.read_text(encoding="utf-8"))
    assert REPORT_KEYS <= set(report), REPORT_KEYS - set(report)
    assert OOD_KEYS <= set(report["ood"]), OOD_KEYS - set(report["ood"])
    assert isinstance(report["ood"]["is_ood"], bool)
    assert report["ood"]["is_ood"] == (report["ood"]["score"] > report["ood"]["threshold"])
    assert report["ood"]["nearest_context"] in bundle.context_names
    assert report["labels"] == {str(k): v for k, v in bundle.label_names.items()}
    voxel_ml = np.prod(reference.GetSpacing()) / 1000.0
    expected = {name: float((s == v).sum() * voxel_ml) for v, name in bundle.label_names.items()}
    assert report["volumes_ml"] == pytest.approx(expected)
    assert report["mean_uncertainty"] == pytest.approx(float(u.mean()), abs=1 / 510)  # the file: 1/255 steps
    assert report["device"] == "cpu"
    assert {"preprocess", "inference", "total"} <= set(report["timings_s"])
    return report


@pytest.fixture(scope="module")
def ct_file(tmp_path_factory):
    image, _ = phantoms.ct_phantom(*SMALL, seed=20, direction=OBLIQUE)
    return phantoms.write(image, tmp_path_factory.mktemp("in") / "ct_case.nii.gz"), image


def test_predict_one_file_writes_every_output_on_the_input_grid(capsys, untrained_bundle, ct_file, tmp_path):
    path, image = ct_file
    rc, err = predict(capsys, untrained_bundle.path, path, out=tmp_path)
    assert rc == 0, err
    report = check_outputs(tmp_path, "ct_case", image, untrained_bundle)
    assert report["modality"] == "CT"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ct_case.json",
        "ct_case_seg.nii.gz",
        "ct_case_uncertainty.nii.gz",
    ]


class _ThresholdModel(torch.nn.Module):
    """The real (untrained) net for the OOD features, but logits that say 'label 1 where the input is bright'."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.config = inner.config

    def forward(self, x, taps=()):
        _, feats = self.inner(x, taps)
        fg = 40.0 * (x - 0.5)
        rest = torch.full_like(fg, -40.0)
        return torch.cat([torch.zeros_like(fg), fg] + [rest] * (self.config.out_channels - 2), dim=1), feats


@pytest.mark.parametrize(
    "direction",
    [OBLIQUE, phantoms.rotation((5, 30, -40)) @ np.diag([1.0, -1.0, -1.0])],
    ids=["oblique-LPS", "oblique-flipped"],
)
def test_a_structure_comes_back_at_the_same_physical_place(capsys, monkeypatch, untrained_bundle, tmp_path, direction):
    """Through the whole pipeline (canonical grid, 4 mm, windows, back to an anisotropic oblique grid)."""
    original = Bundle.load_model
    monkeypatch.setattr(Bundle, "load_model", lambda self, device="cpu": _ThresholdModel(original(self, device)))
    size, spacing, origin = (36, 32, 12), (2.5, 3.0, 7.0), np.array([30.0, -52.0, 118.0])
    middle = origin + direction @ ((np.array(size) - 1) / 2 * np.array(spacing))
    image, label = phantoms.sphere_phantom(
        size,
        spacing,
        centre_mm=middle + (14.0, -10.0, 9.0),
        radius_mm=22.0,
        direction=direction,
        origin=origin,
        noise=20.0,
    )
    assert sitk.GetArrayFromImage(label).sum() > 500
    path = phantoms.write(image, tmp_path / "in" / "sphere.nrrd")
    rc, err = predict(capsys, untrained_bundle.path, path, out=tmp_path / "out")
    assert rc == 0, err
    check_outputs(tmp_path / "out", "sphere", image, untrained_bundle)
    seg = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / "sphere_seg.nii.gz")))
    truth = sitk.GetArrayFromImage(label).astype(bool)
    pred = seg == 1
    dice = 2 * (pred & truth).sum() / (pred.sum() + truth.sum())
    assert dice >= 0.9, dice
    mirrored = 2 * (pred & truth[:, :, ::-1]).sum() / (pred.sum() + truth.sum())
    assert mirrored < 0.5  # the test can tell a mirrored result from a right one
    assert set(np.unique(seg).tolist()) == {0, 1}


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
def test_nrrd_and_mha_inputs(capsys, untrained_bundle, tmp_path, suffix):
    image, _ = phantoms.mr_phantom(*SMALL, seed=21, scale=1500.0, direction=OBLIQUE)
    path = phantoms.write(image, tmp_path / "in" / f"mr_case{suffix}")
    rc, err = predict(capsys, untrained_bundle.path, path, out=tmp_path / "out")
    assert rc == 0, err
    assert check_outputs(tmp_path / "out", "mr_case", image, untrained_bundle)["modality"] == "MR"


def test_dicom_series_folder(capsys, untrained_bundle, tmp_path):
    image, _ = phantoms.ct_phantom((20, 20, 8), (3.0, 3.0, 5.0), seed=22, direction=OBLIQUE)
    folder = phantoms.write_dicom_series(image, tmp_path / "series1")
    if not sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)):
        pytest.skip("SimpleITK could not write a DICOM series that GDCM reads back")
    rc, err = predict(capsys, untrained_bundle.path, folder, out=tmp_path / "out")
    assert rc == 0, err
    check_outputs(tmp_path / "out", "series1", image, untrained_bundle)


def test_input_smaller_than_the_patch(capsys, untrained_bundle, tmp_path):
    image, _ = phantoms.ct_phantom((9, 7, 4), (2.0, 2.0, 3.0), seed=23, direction=OBLIQUE)
    path = phantoms.write(image, tmp_path / "tiny.nii.gz")
    rc, err = predict(capsys, untrained_bundle.path, path, out=tmp_path / "out")
    assert rc == 0, err
    check_outputs(tmp_path / "out", "tiny", image, untrained_bundle)


def test_strongly_anisotropic_input(capsys, untrained_bundle, tmp_path):
    image, _ = phantoms.ct_phantom((60, 56, 4), (0.7, 0.7, 12.0), seed=24)
    path = phantoms.write(image, tmp_path / "thick.nii.gz")
    rc, err = predict(capsys, untrained_bundle.path, path, out=tmp_path / "out")
    assert rc == 0, err
    check_outputs(tmp_path / "out", "thick", image, untrained_bundle)


@pytest.mark.parametrize("kind", phantoms.BAD_INPUTS)
def test_bad_input_gives_one_line_error_and_nonzero_exit(capsys, untrained_bundle, tmp_path, kind):
    path = phantoms.write_bad_input(kind, tmp_path / "in")
    rc, err = predict(capsys, untrained_bundle.path, path, out=tmp_path / "out")
    assert rc != 0
    errors = error_lines(err)
    assert len(errors) == 1, err
    assert errors[0].startswith(f"error: {path}: "), errors[0]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_missing_input_file(capsys, untrained_bundle, tmp_path):
    rc, err = predict(capsys, untrained_bundle.path, tmp_path / "absent.nii.gz", out=tmp_path / "out")
    assert rc != 0 and error_lines(err) == [f"error: {tmp_path / 'absent.nii.gz'}: file not found"]


def _broken_bundle(untrained_bundle, tmp_path, how):
    if how == "missing":
        return tmp_path / "no-bundle-here"
    b = shutil.copytree(untrained_bundle.path, tmp_path / "bundle")
    if how == "wrong-hash":
        data = bytearray((b / "model.safetensors").read_bytes())
        data[len(data) // 2] ^= 0x10
        (b / "model.safetensors").write_bytes(bytes(data))
    else:
        meta = json.loads((b / "bundle.json").read_text(encoding="utf-8"))
        meta["format_version"] = 99
        (b / "bundle.json").write_text(json.dumps(meta), encoding="utf-8")
    return b


@pytest.mark.parametrize(
    "how,expected", [("missing", "not found"), ("wrong-hash", "corrupt"), ("unknown-version", "format_version")]
)
def test_bad_bundle_gives_one_line_error(capsys, untrained_bundle, ct_file, tmp_path, how, expected):
    bundle = _broken_bundle(untrained_bundle, tmp_path, how)
    rc, err = predict(capsys, bundle, ct_file[0], out=tmp_path / "out")
    assert rc != 0
    errors = error_lines(err)
    assert len(errors) == 1 and errors[0].startswith(f"error: {bundle}: ") and expected in errors[0], err
    assert not (tmp_path / "out").exists()


def test_folder_with_one_bad_case_processes_the_others(capsys, untrained_bundle, tmp_path):
    folder = tmp_path / "cases"
    good = {"a_ct": phantoms.ct_phantom(*SMALL, seed=25)[0], "b_mr": phantoms.mr_phantom(*SMALL, seed=26)[0]}
    phantoms.write(good["a_ct"], folder / "a_ct.nii.gz")
    phantoms.write(good["b_mr"], folder / "b_mr.mha")
    bad = phantoms.write_bad_input("truncated", folder)
    (folder / "notes.txt").write_text("not a volume, ignored", encoding="utf-8")
    rc, err = predict(capsys, untrained_bundle.path, folder, out=tmp_path / "out")
    assert rc != 0
    assert error_lines(err) == [line for line in err.splitlines() if line.startswith(f"error: {bad}: ")]
    assert len(error_lines(err)) == 1 and "1 of 3 case(s) failed" in err
    for case, image in good.items():
        check_outputs(tmp_path / "out", case, image, untrained_bundle)
    assert not list((tmp_path / "out").glob("bad_truncated*"))


def test_nothing_is_overwritten_without_overwrite(capsys, untrained_bundle, ct_file, tmp_path):
    out = tmp_path / "out"
    rc, err = predict(capsys, untrained_bundle.path, ct_file[0], out=out)
    assert rc == 0, err
    files = sorted(out.iterdir())
    assert len(files) == 3
    past = 1_000_000_000  # 2001: any rewrite would move the mtime
    for f in files:
        os.utime(f, ns=(past * 10**9, past * 10**9))
    before = {f: (f.read_bytes(), f.stat().st_mtime_ns) for f in files}
    rc, err = predict(capsys, untrained_bundle.path, ct_file[0], out=out)
    assert rc != 0
    assert len(error_lines(err)) == 1 and "already exists" in err and "--overwrite" in err
    assert {f: (f.read_bytes(), f.stat().st_mtime_ns) for f in sorted(out.iterdir())} == before
    # an unrelated file in the output folder is never touched either
    (out / "keep.txt").write_text("mine", encoding="utf-8")
    rc, err = predict(capsys, untrained_bundle.path, ct_file[0], out=out, extra=["--overwrite"])
    assert rc == 0, err
    assert all(f.stat().st_mtime_ns != before[f][1] for f in files)
    assert (out / "keep.txt").read_text(encoding="utf-8") == "mine"
    check_outputs(out, "ct_case", ct_file[1], untrained_bundle)


def test_a_folder_predicted_into_is_not_segmented_twice(capsys, untrained_bundle, tmp_path):
    folder = tmp_path / "cases"
    image, _ = phantoms.ct_phantom(*SMALL, seed=28)
    phantoms.write(image, folder / "case.nii.gz")
    rc, err = predict(capsys, untrained_bundle.path, folder, out=folder)  # outputs land beside the input
    assert rc == 0, err
    rc, err = predict(capsys, untrained_bundle.path, folder, out=tmp_path / "again")
    assert rc == 0, err
    assert "skipping 2 file(s) written by an earlier `mtseg predict`" in err
    assert sorted(f.name for f in (tmp_path / "again").iterdir()) == [
        "case.json",
        "case_seg.nii.gz",
        "case_uncertainty.nii.gz",
    ]
    # given by its path, an output is an input like any other (the user asked for it)
    rc, err = predict(capsys, untrained_bundle.path, folder / "case_seg.nii.gz", out=tmp_path / "seg")
    assert rc == 0, err
    assert (tmp_path / "seg" / "case_seg.json").is_file()
    # a folder of nothing but earlier outputs says so
    (folder / "case.nii.gz").unlink()
    rc, err = predict(capsys, untrained_bundle.path, folder, out=tmp_path / "none")
    assert rc != 0 and len(error_lines(err)) == 1 and "only outputs of an earlier" in err


def test_duplicate_case_names_are_refused(capsys, untrained_bundle, tmp_path):
    image, _ = phantoms.ct_phantom(*SMALL, seed=27)
    a = phantoms.write(image, tmp_path / "x" / "case.nii.gz")
    b = phantoms.write(image, tmp_path / "y" / "case.nrrd")
    rc, err = predict(capsys, untrained_bundle.path, a, b, out=tmp_path / "out")
    assert rc != 0 and len(error_lines(err)) == 1 and "case" in err


def test_real_subprocess_run(untrained_bundle, ct_file, tmp_path):
    """The installed console script (or ``python -m``), one good and one bad case: no traceback."""
    exe = Path(sys.executable).with_name("mtseg")
    command = [str(exe)] if exe.is_file() else [sys.executable, "-m", "MultiTaskSegTraining.cli"]
    bad = phantoms.write_bad_input("2d", tmp_path / "in")
    proc = subprocess.run(
        [
            *command,
            "predict",
            "--bundle",
            str(untrained_bundle.path),
            str(ct_file[0]),
            str(bad),
            "--output-dir",
            str(tmp_path / "out"),
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert [line for line in proc.stderr.splitlines() if line.startswith("error:")] == [
        f"error: {bad}: image is 2D (size (16, 16)); a 3D volume is needed"
    ]
    check_outputs(tmp_path / "out", "ct_case", ct_file[1], untrained_bundle)


@pytest.mark.parametrize("threads", [1, 2])
def test_label_sums_equal_bincount_and_masked_means_across_chunks(threads):
    """The report's volumes and per-label mean uncertainty come from chunked bincounts of the labelled voxels
    (1 M voxels a chunk, the chunks split among torch's threads): the same counts as np.bincount, the same
    means as the masked float means, across chunk and thread edges."""
    import torch

    from MultiTaskSegLib.predictor import label_sums

    rng = np.random.default_rng(4)
    labels = rng.integers(0, 5, (3, 1000, 800), dtype=np.uint8)  # 2.4 M voxels: three chunks
    labels[:, :100] = 0
    values = rng.random(labels.shape, dtype=np.float32)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        counts, sums = label_sums(labels, values, 7)
    finally:
        torch.set_num_threads(before)
    np.testing.assert_array_equal(counts, np.bincount(labels.ravel(), minlength=7))
    for v in range(5):
        assert sums[v] / counts[v] == pytest.approx(float(values[labels == v].astype(np.float64).mean()), rel=1e-9)
    assert counts[5] == counts[6] == 0 and sums[5] == sums[6] == 0.0
