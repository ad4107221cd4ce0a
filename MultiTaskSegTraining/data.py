"""MSD-format datasets: reading, validation, deterministic splits, the joint label space and a cache.

A dataset folder holds ``dataset.json`` (MSD keys: ``name``, ``modality``, ``labels``,
``training`` = [{"image", "label"}]) with ``imagesTr/`` and ``labelsTr/``. Everything that can
be wrong with it is checked before any training starts.
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from MultiTaskSegLib.atomic import atomic_path
from MultiTaskSegLib.errors import DatasetError, MultiTaskSegError
from MultiTaskSegLib.preprocessing import PreprocessingConfig, preprocess, resample_label_to_grid
from MultiTaskSegLib.volume_io import read_volume


@dataclass
class Case:
    case_id: str
    image: Path
    label: Path
    group: str  # cases of one patient share a group and therefore a split


@dataclass
class DatasetSpec:
    name: str
    root: Path
    modality: str  # 'CT' or 'MR'
    labels: dict[int, str]  # local value → name (background excluded)
    cases: list[Case]
    meta: dict = field(default_factory=dict)

    def content_hash(self) -> str:
        """sha256 over dataset.json and every image/label file's name and size (fast, detects changes)."""
        h = hashlib.sha256((self.root / "dataset.json").read_bytes())
        for c in self.cases:
            for p in (c.image, c.label):
                h.update(f"{p.name}:{p.stat().st_size}".encode())
        return h.hexdigest()


# Only suffixes that name a cardiac phase of one patient (ACDC ``_frame01``, ``_ED``/``_ES``). A plain
# trailing number (``amos_0001``, ``case_0001``) is a case number, not a patient: grouping by it would
# put every case of such a dataset into one patient and one split part.
_GROUP_SUFFIX = re.compile(r"(_frame\d+|_ed|_es)$", re.IGNORECASE)


def patient_group(case_id: str) -> str:
    """ACDC-style ``patient001_frame01`` / ``_frame02`` belong to one patient; other ids are their own group."""
    return _GROUP_SUFFIX.sub("", case_id)


def _modality(meta: dict) -> str:
    values = " ".join(str(v) for v in (meta.get("modality") or {}).values()).upper()
    if not values:
        raise DatasetError("dataset.json has no 'modality'")
    return "CT" if "CT" in values else "MR"


def load_dataset(root: str | Path) -> DatasetSpec:
    """Read and check an MSD-format dataset folder (files present, labels declared)."""
    root = Path(root)
    meta_path = root / "dataset.json"
    if not meta_path.is_file():
        raise DatasetError(f"{root}: not an MSD dataset (no dataset.json)")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{meta_path}: invalid JSON ({exc})") from None
    for key in ("labels", "training"):
        if key not in meta:
            raise DatasetError(f"{meta_path}: missing the '{key}' key")
    try:
        labels = {int(k): str(v) for k, v in meta["labels"].items() if int(k) != 0}
    except ValueError:
        raise DatasetError(f"{meta_path}: label keys must be integers") from None
    if not labels:
        raise DatasetError(f"{meta_path}: declares no foreground label")
    cases = []
    missing = []
    for entry in meta["training"]:
        image = (root / entry["image"]).resolve()
        label = (root / entry["label"]).resolve()
        for p in (image, label):
            if not p.is_file():
                missing.append(str(p))
        case_id = image.name.replace(".nii.gz", "").replace(".nii", "")
        cases.append(Case(case_id, image, label, patient_group(case_id)))
    if missing:
        raise DatasetError(f"{root}: {len(missing)} file(s) listed in dataset.json are missing, e.g. {missing[0]}")
    if not cases:
        raise DatasetError(f"{root}: dataset.json lists no training cases")
    name = str(meta.get("name") or root.name)
    return DatasetSpec(name, root, _modality(meta), labels, cases, meta)


def split_cases(
    spec: DatasetSpec,
    seed: int,
    test_fraction: float = 0.2,
    val_fraction: float = 0.1,
    previous: dict[str, list[str]] | None = None,
) -> dict[str, list[str]]:
    """Deterministic patient-level split: the same seed and dataset always give the same split.

    ``previous`` (an earlier split of this dataset, e.g. the one stored in the bundle a run starts
    from) is kept as it is: its cases stay in their part, so a model fine-tuned from that bundle never
    meets its own training cases in the test part. Only groups it does not know are assigned, filling
    test and validation up to their fractions of the whole dataset.
    """
    groups = sorted({c.group for c in spec.cases})
    rng = np.random.default_rng(int(hashlib.sha256(f"{seed}:{spec.name}".encode()).hexdigest()[:8], 16))
    order = [groups[i] for i in rng.permutation(len(groups))]
    n = len(order)
    n_test = max(1, int(round(test_fraction * n))) if n >= 2 else 0
    n_val = max(1, int(round(val_fraction * n))) if n - n_test >= 3 else 0
    if previous:
        known = {c.case_id: c.group for c in spec.cases}
        fixed = {
            part: {known[cid] for cid in previous.get(part, []) if cid in known} for part in ("test", "val", "train")
        }
        taken = set().union(*fixed.values())
        fresh = [g for g in order if g not in taken]
        k_test = max(0, n_test - len(fixed["test"]))
        k_val = max(0, n_val - len(fixed["val"]))
        test = fixed["test"] | set(fresh[:k_test])
        val = (fixed["val"] | set(fresh[k_test : k_test + k_val])) - test  # a test patient stays test only
        train = (fixed["train"] | set(fresh[k_test + k_val :])) - test - val
    else:
        test, val, train = set(order[:n_test]), set(order[n_test : n_test + n_val]), set(order[n_test + n_val :])
    pick = lambda gs: sorted(c.case_id for c in spec.cases if c.group in gs)  # noqa: E731
    return {"train": pick(train), "val": pick(val), "test": pick(test)}


@dataclass
class LabelSpace:
    """The joint output labels: one value per structure across datasets (or one shared foreground)."""

    names: list[str]  # index = output value - 1
    contexts: list[str]
    owner: list[int]  # output value - 1 → context index
    local_to_global: list[dict[int, int]]  # per dataset: local value → output value

    def annotated(self, context: int) -> list[int]:
        return sorted(set(self.local_to_global[context].values()))


def build_label_space(
    specs: list[DatasetSpec], mode: str = "per_structure", merge_same_names: bool = False
) -> LabelSpace:
    """``per_structure``: each structure its own output; ``shared_foreground``: the original method's one output."""
    if mode == "shared_foreground":
        return LabelSpace(["foreground"], [s.name for s in specs], [0], [{v: 1 for v in s.labels} for s in specs])
    if mode != "per_structure":
        raise MultiTaskSegError(f"unknown label mode {mode!r}: use per_structure or shared_foreground")
    names, owner, maps = [], [], []
    for ci, spec in enumerate(specs):
        mapping = {}
        for value, name in sorted(spec.labels.items()):
            if merge_same_names and name in names:
                mapping[value] = names.index(name) + 1
                continue
            names.append(name)
            owner.append(ci)
            mapping[value] = len(names)
        maps.append(mapping)
    return LabelSpace(names, [s.name for s in specs], owner, maps)


def _cache_key(case: Case, config: PreprocessingConfig) -> str:
    stat = [(p.stat().st_size, int(p.stat().st_mtime)) for p in (case.image, case.label)]
    blob = json.dumps([str(case.image), stat, config.to_dict()], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class CachedCase:
    dataset: int
    case_id: str
    image: np.ndarray  # float16 (z, y, x) canonical grid
    label: np.ndarray  # uint8 local label values
    shape_mm: tuple[float, ...]


def preprocess_case(
    case: Case, spec: DatasetSpec, config: PreprocessingConfig, cache_dir: Path, dataset_index: int
) -> CachedCase:
    """Preprocess (or load from cache) one case; checks the label against the image and dataset.json."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"{spec.name}__{case.case_id}__{_cache_key(case, config)}.npz"
    if path.exists():
        with np.load(path, allow_pickle=False) as d:
            return CachedCase(dataset_index, case.case_id, d["image"], d["label"], tuple(d["shape_mm"]))
    image = read_volume(case.image)
    label = sitk.ReadImage(str(case.label))
    if label.GetSize() != image.GetSize():
        raise DatasetError(f"{case.label}: label size {label.GetSize()} does not match image size {image.GetSize()}")
    if not np.allclose(label.GetSpacing(), image.GetSpacing(), rtol=1e-4) or not np.allclose(
        label.GetOrigin(), image.GetOrigin(), atol=1e-3
    ):
        raise DatasetError(f"{case.label}: label geometry (spacing/origin) differs from its image")
    values = set(np.unique(sitk.GetArrayViewFromImage(label)).tolist()) - {0}
    undeclared = sorted(values - set(spec.labels))
    if undeclared:
        raise DatasetError(f"{case.label}: label values {undeclared} are not declared in {spec.root}/dataset.json")
    # modality detected from intensities exactly as at inference, so training sees what users will
    pre = preprocess(image, config, None)
    if pre.modality != spec.modality:
        warnings.warn(
            f"{case.image}: intensities look like {pre.modality} but {spec.name} says {spec.modality}", stacklevel=2
        )
    lab = resample_label_to_grid(label, pre.grid)
    shape_mm = tuple(np.array(image.GetSize()) * np.array(image.GetSpacing()))
    with atomic_path(path, suffix=".npz") as tmp:  # per process: data-parallel ranks may cache a case at once
        np.savez(tmp, image=pre.array.astype(np.float16), label=lab, shape_mm=np.array(shape_mm))
    return CachedCase(dataset_index, case.case_id, pre.array.astype(np.float16), lab, shape_mm)
