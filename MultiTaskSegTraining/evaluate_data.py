"""What `mtseg evaluate` runs on: the bundle's datasets with their split and label mapping, and OOD volumes."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk

from MultiTaskSegLib.bundle import Bundle
from MultiTaskSegLib.errors import MultiTaskSegError
from MultiTaskSegLib.volume_io import case_name, is_volume_file

from .data import Case, DatasetSpec, load_dataset


@dataclass
class EvalDataset:
    spec: DatasetSpec
    context: int  # index into the bundle's contexts
    split: dict[str, list[str]]
    lut: np.ndarray  # local label value → bundle output value
    structures: dict[int, str]  # bundle output value → name, for the structures this dataset annotates

    def cases(self, part: str) -> list[Case]:
        wanted = set(self.split.get(part, []))
        return [c for c in self.spec.cases if c.case_id in wanted]


def match_datasets(bundle: Bundle, data_dirs: Sequence[str | os.PathLike]) -> list[EvalDataset]:
    """Pair each --data folder with the bundle's context and split; refuse anything that does not match."""
    training = bundle.schema.training
    split = training.split
    if not isinstance(split, dict) or not split:
        raise MultiTaskSegError(
            f"{bundle.path}: bundle.json has no training.split; evaluation needs the bundle's "
            "own train/val/test split (bundles from `mtseg train` have it)"
        )
    names = bundle.context_names
    out = []
    for d in data_dirs:
        spec = load_dataset(d)
        if spec.name not in split or spec.name not in names:
            raise MultiTaskSegError(
                f"{spec.root}: dataset '{spec.name}' is not one this bundle was trained on "
                f"(its datasets: {', '.join(sorted(split))}); a bundle can only be evaluated "
                "on the test split of its own datasets"
            )
        if any(e.spec.name == spec.name for e in out):
            raise MultiTaskSegError(f"dataset '{spec.name}' given twice")
        have = {c.case_id for c in spec.cases}
        listed = [cid for part in split[spec.name].values() for cid in part]
        missing = sorted(set(listed) - have)
        if missing:
            raise MultiTaskSegError(
                f"{spec.root}: {len(missing)} case id(s) of the bundle's split for '{spec.name}' "
                f"are not in this dataset (e.g. {missing[0]}); is it the same dataset version "
                "the bundle was trained on?"
            )
        recorded = {r.get("name"): r.get("sha256") for r in training.datasets or [] if isinstance(r, dict)}
        if recorded.get(spec.name) and recorded[spec.name] != spec.content_hash():
            warnings.warn(
                f"{spec.root}: content hash differs from the one recorded at training time "
                "(files changed since); evaluating anyway",
                stacklevel=2,
            )
        ci = names.index(spec.name)
        allowed = [int(v) for v in bundle.contexts[ci]["labels"]]
        label_names = bundle.label_names
        lut = np.zeros(max(max(spec.labels), 255) + 1, np.uint8)
        structures = {}
        for local, name in sorted(spec.labels.items()):
            if bundle.schema.label_mode == "shared_foreground" and len(allowed) == 1:
                glob = allowed[0]
            else:
                hits = [v for v in allowed if label_names.get(v) == name]
                if not hits:
                    raise MultiTaskSegError(
                        f"{spec.root}: label {local} '{name}' has no output in the bundle's "
                        f"context '{spec.name}' (its structures: "
                        f"{', '.join(label_names[v] for v in allowed)})"
                    )
                glob = hits[0]
            lut[local] = glob
            structures[glob] = label_names[glob]
        out.append(EvalDataset(spec, ci, split[spec.name], lut, structures))
    if not out:
        raise MultiTaskSegError("no dataset given: pass the bundle's MSD dataset folders with --data")
    return out


def ood_volumes(folders: Sequence[str | os.PathLike]) -> list[tuple[str, Path]]:
    """(name, path) of every OOD volume: ``*_image.*`` where a folder pairs images with labels
    (ood-dev layout), ``imagesTr/`` of an MSD folder, otherwise every volume file."""
    out = []
    for folder in folders:
        folder = Path(folder)
        if folder.is_file() and is_volume_file(folder):
            out.append((case_name(folder), folder))
            continue
        if not folder.is_dir():
            raise MultiTaskSegError(f"{folder}: OOD folder not found")
        if (folder / "imagesTr").is_dir():
            folder = folder / "imagesTr"
        files = sorted(f for f in folder.iterdir() if is_volume_file(f))
        images = [f for f in files if case_name(f).endswith("_image")]
        if images:
            files = images
        else:
            files = [f for f in files if not case_name(f).endswith(("_label", "_seg"))]
        if not files:
            raise MultiTaskSegError(f"{folder}: no volume files (NIfTI, NRRD, MHA) found for --ood")
        out += [(case_name(f).removesuffix("_image"), f) for f in files]
    names = [n for n, _ in out]
    if len(set(names)) != len(names):  # same file name in two folders: qualify with the folder
        out = [(f"{p.parent.name}/{n}", p) for n, p in out]
    return out


def pick_even(items: list, n: int | None) -> list:
    """n items spread evenly over the (sorted) list; all when n is None or ≥ len."""
    if n is None or n >= len(items):
        return list(items)
    if n <= 0:
        return []
    idx = np.unique(np.round(np.linspace(0, len(items) - 1, n)).astype(int))
    return [items[i] for i in idx]


def header_voxels(path: Path) -> int:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return int(np.prod(reader.GetSize()))
