"""Data-parallel training under torchrun (2 processes, gloo on CPU) keeps replicas identical."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from train_helpers import phantom_datasets, tiny_config


@pytest.mark.skipif(
    shutil.which("torchrun") is None and not os.path.exists(os.path.join(os.path.dirname(sys.executable), "torchrun")),
    reason="torchrun is not installed",
)
@pytest.mark.slow
def test_two_process_gloo_training_keeps_replicas_identical(tmp_path):
    data = phantom_datasets(tmp_path / "data")
    # channels-last, as the shipped recipe trains: DDP must be built after the layout change
    config = tiny_config(tmp_path / "c.json", data, steps=3, signature_augmentations=0, channels_last=True)
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [
        torchrun,
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "MultiTaskSegTraining.cli",
        "train",
        "--config",
        str(config),
        "-o",
        str(tmp_path / "b"),
        "--work-dir",
        str(tmp_path / "w"),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--device",
        "cpu",
        "--save-replicas",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Grad strides do not match" not in result.stderr  # no per-step gradient copies
    a = load_file(str(tmp_path / "w" / "replica_0.safetensors"))
    b = load_file(str(tmp_path / "w" / "replica_1.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] == b[k]).all(), k
    # and they actually trained: differ from the seed-initialised weights of a fresh model
    from MultiTaskSegLib.bundle import load_bundle

    assert (tmp_path / "b" / "bundle.json").exists()
    assert load_bundle(tmp_path / "b").meta["training"]["steps"] == 3
