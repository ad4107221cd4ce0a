"""Tiny training configurations on phantoms, shared by the training tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from phantoms import make_msd_dataset


def phantom_datasets(root: Path) -> list[Path]:
    """Two contexts: a CT abdomen (liver, spleen) and an MR heart (left ventricle, myocardium)."""
    ct = make_msd_dataset(root, "AbdomenPhantomCT", "CT", n_cases=5, seed=0)
    mr = make_msd_dataset(root, "HeartPhantomMR", "MR", n_cases=5, seed=100)
    return [ct, mr]


def rename_cases(root: Path, new_name: Callable[[int], str]) -> None:
    """Rename the i-th case of an MSD dataset (image and label) to ``new_name(i)``, dataset.json too."""
    meta = json.loads((root / "dataset.json").read_text(encoding="utf-8"))
    for i, entry in enumerate(meta["training"]):
        new = new_name(i)
        for key, sub in (("image", "imagesTr"), ("label", "labelsTr")):
            (root / entry[key]).rename(root / sub / new)
            entry[key] = f"./{sub}/{new}"
    (root / "dataset.json").write_text(json.dumps(meta), encoding="utf-8")


def tiny_config(path: Path, data: list[Path], **extra) -> Path:
    """A config that trains in seconds: 4 mm grid, 16³ patches, a 3-level net."""
    config = {
        "data": [str(d) for d in data],
        "target_spacing": [4.0, 4.0, 4.0],
        "patch_size": [16, 16, 16],
        "batch_size": 2,
        "widths": [4, 8, 16],
        "steps": 6,
        "checkpoint_every": 2,
        "ood_layers": ["enc2", "dec0"],
        "signature_augmentations": 1,
        "threads": 1,
        "warmup_steps": 1,
        **extra,
    }
    path.write_text(json.dumps(config), encoding="utf-8")
    return path


def train_args(config: Path, out: Path, work: Path, cache: Path) -> list[str]:
    """`mtseg train` arguments for a config, an output bundle, a work dir and a cache dir."""
    return ["train", "--config", str(config), "-o", str(out), "--work-dir", str(work), "--cache-dir", str(cache)]
