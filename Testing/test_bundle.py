"""The model bundle: round trip, and refusal of anything corrupt, unknown or missing."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from MultiTaskSegLib import DEFAULT_BUNDLE
from MultiTaskSegLib.bundle import FORMAT_VERSION, load_bundle, save_bundle, sha256_file
from MultiTaskSegLib.bundle_schema import BundleMeta
from MultiTaskSegLib.errors import BundleError


@pytest.fixture
def bundle_copy(untrained_bundle, tmp_path):
    return shutil.copytree(untrained_bundle.path, tmp_path / "bundle")


def _flip_byte(path, offset_fraction=0.5):
    data = bytearray(path.read_bytes())
    i = int(len(data) * offset_fraction)
    data[i] ^= 0x01
    path.write_bytes(bytes(data))


def test_round_trip(untrained_bundle, tmp_path):
    b = load_bundle(untrained_bundle.path)
    assert b.meta["format_version"] == FORMAT_VERSION
    for name, digest in b.meta["files"].items():
        assert sha256_file(b.path / name) == digest
    model = b.load_model("cpu")
    assert not model.training
    det = b.detector()
    assert det.signatures.shape == (4, 20) and det.case_ids.dtype.kind == "U"
    assert b.label_names == {1: "liver", 2: "spleen", 3: "left ventricle"}
    assert b.context_names == ["AbdomenPhantomCT", "HeartPhantomMR"]
    assert b.window.patch_size == (32, 32, 32) and b.preprocessing.target_spacing == (4.0, 4.0, 4.0)
    # saving what was loaded gives identical weights and signatures
    again = save_bundle(
        tmp_path / "again",
        {k: v for k, v in b.meta.items() if k not in ("files",)},
        model.state_dict(),
        det.signatures,
        det.context_index,
        list(det.case_ids),
    )
    m2 = again.load_model("cpu")
    for (k, v), (k2, v2) in zip(model.state_dict().items(), m2.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    np.testing.assert_array_equal(again.detector().signatures, det.signatures)


def test_no_pickle_in_a_bundle(untrained_bundle):
    with np.load(untrained_bundle.path / "signatures.npz", allow_pickle=False) as data:
        assert all(data[k].dtype != object for k in data.files)
    assert json.loads((untrained_bundle.path / "bundle.json").read_text())


@pytest.mark.parametrize("name", ["model.safetensors", "signatures.npz"])
def test_one_flipped_byte_is_refused(bundle_copy, name):
    _flip_byte(bundle_copy / name)
    with pytest.raises(BundleError) as info:
        load_bundle(bundle_copy)
    message = str(info.value)
    assert name in message and "corrupt" in message and "sha256" in message and "\n" not in message


@pytest.mark.parametrize("version", [2, 0, "1", None])
def test_unknown_format_version_is_refused(bundle_copy, version):
    meta = json.loads((bundle_copy / "bundle.json").read_text())
    if version is None:
        del meta["format_version"]
    else:
        meta["format_version"] = version
    (bundle_copy / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="format_version"):
        load_bundle(bundle_copy)


def test_missing_bundle_and_missing_parts(bundle_copy, tmp_path):
    with pytest.raises(BundleError, match="not found"):
        load_bundle(tmp_path / "no-such-bundle")
    (bundle_copy / "signatures.npz").unlink()
    with pytest.raises(BundleError, match="signatures.npz is missing"):
        load_bundle(bundle_copy)
    (bundle_copy / "bundle.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(bundle_copy)
    (bundle_copy / "bundle.json").unlink()
    with pytest.raises(BundleError, match="bundle.json is missing"):
        load_bundle(bundle_copy)


def test_missing_hash_or_section_is_refused(bundle_copy):
    meta = json.loads((bundle_copy / "bundle.json").read_text())
    broken = dict(meta, files={"model.safetensors": meta["files"]["model.safetensors"]})
    (bundle_copy / "bundle.json").write_text(json.dumps(broken))
    with pytest.raises(BundleError, match="no sha256 for signatures.npz"):
        load_bundle(bundle_copy)
    broken = {k: v for k, v in meta.items() if k != "ood"}
    (bundle_copy / "bundle.json").write_text(json.dumps(broken))
    with pytest.raises(BundleError, match="'ood'"):
        load_bundle(bundle_copy)


def test_weights_of_the_wrong_architecture_are_refused_clearly(bundle_copy):
    from safetensors.torch import save_file

    save_file({"bogus": torch.zeros(3)}, str(bundle_copy / "model.safetensors"))
    meta = json.loads((bundle_copy / "bundle.json").read_text())
    meta["files"]["model.safetensors"] = sha256_file(bundle_copy / "model.safetensors")
    (bundle_copy / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="cannot load model.safetensors"):
        load_bundle(bundle_copy).load_model("cpu")


def test_schema_reads_and_rewrites_the_shipped_bundle_unchanged():
    """bundle.json through the dataclasses and back: same keys, same order, same values, same bytes."""
    raw = (DEFAULT_BUNDLE / "bundle.json").read_text(encoding="utf-8")
    meta = json.loads(raw)
    again = BundleMeta.from_dict(meta).to_dict()
    assert again == meta and list(again) == list(meta)
    assert json.dumps(again, indent=2) == json.dumps(meta, indent=2)
    bundle = load_bundle(DEFAULT_BUNDLE)  # hashes of the shipped files still match
    assert bundle.schema.ood.context_scale == meta["ood"]["context_scale"]
    assert bundle.window.patch_size == tuple(meta["preprocessing"]["patch_size"])


def test_foreground_threshold_travels_from_bundle_json_to_the_window_predict_uses(untrained_bundle):
    """Absent (bundles before it): None, and not written back; set: read, written and passed to every pass."""
    from MultiTaskSegLib.predictor import PredictOptions, Predictor
    from MultiTaskSegTraining.trust_finalise import default_records_dir

    meta = json.loads((untrained_bundle.path / "bundle.json").read_text())
    assert "foreground_threshold" not in meta["preprocessing"]
    schema = BundleMeta.from_dict(meta)
    assert schema.preprocessing.window.foreground_threshold is None
    assert "foreground_threshold" not in schema.to_dict()["preprocessing"]
    plain_records = default_records_dir(untrained_bundle.path, schema)
    schema.preprocessing.window.foreground_threshold = 0.05
    written = schema.to_dict()
    assert written["preprocessing"]["foreground_threshold"] == 0.05
    assert BundleMeta.from_dict(written).preprocessing.window.foreground_threshold == 0.05
    assert default_records_dir(untrained_bundle.path, schema) != plain_records  # its own record cache
    bundle = load_bundle(untrained_bundle.path)
    bundle.schema = BundleMeta.from_dict(written)
    for options in (PredictOptions(), PredictOptions(tta=True, cpu_bf16=True)):
        assert Predictor(bundle, "cpu").window_config(options).foreground_threshold == 0.05


def test_schema_keeps_unknown_keys_and_refuses_a_malformed_block(bundle_copy):
    meta = json.loads((bundle_copy / "bundle.json").read_text())
    meta["ood"]["future_field"] = [1, 2]
    meta["something_new"] = {"a": 1}
    (bundle_copy / "bundle.json").write_text(json.dumps(meta))
    b = load_bundle(bundle_copy)
    assert b.schema.to_dict()["ood"]["future_field"] == [1, 2] and b.schema.to_dict()["something_new"] == {"a": 1}
    meta["architecture"]["widths"] = 7  # not a list
    (bundle_copy / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="malformed"):
        load_bundle(bundle_copy)


def test_atomic_write_replaces_on_success_and_leaves_the_old_file_on_failure(tmp_path):
    from MultiTaskSegLib.atomic import atomic_path, write_text_atomic

    target = tmp_path / "out.json"
    write_text_atomic(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "old"
    write_text_atomic(target, "new")
    assert target.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"], "a temporary file was left behind"
