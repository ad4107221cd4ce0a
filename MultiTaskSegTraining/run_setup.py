"""The set-up stage of a training run: logging, data (split, preprocessing, label space), the model."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import numpy as np

from MultiTaskSegLib.atomic import write_text_atomic
from MultiTaskSegLib.bundle import load_bundle
from MultiTaskSegLib.errors import MultiTaskSegError
from MultiTaskSegLib.network import NetworkConfig, ResidualUNet3D
from MultiTaskSegLib.preprocessing import PreprocessingConfig

from .config import TrainConfig
from .data import CachedCase, DatasetSpec, LabelSpace, load_dataset, preprocess_case, split_cases

log = logging.getLogger("mtseg.train")


def setup_logging(work: Path, main: bool) -> None:
    log.setLevel(logging.INFO)
    log.handlers.clear()
    if not main:
        return
    fmt = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    fh = logging.FileHandler(work / "train.log")
    fh.setFormatter(fmt)
    sh = logging.StreamHandler(sys.stderr)
    sh.setFormatter(fmt)
    log.addHandler(fh)
    log.addHandler(sh)


def prepare_data(config: TrainConfig, work: Path, main: bool = True):
    """Load and check every dataset, write the split, preprocess (cached) all cases."""
    if not config.data:
        raise MultiTaskSegError("no dataset given: pass one or more MSD dataset folders")
    specs: list[DatasetSpec] = [load_dataset(p) for p in config.data]
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise MultiTaskSegError(f"datasets with the same name given twice: {names}")
    split_path = work / "split.json"
    previous = previous_split(config)
    splits = {
        s.name: split_cases(s, config.seed, config.test_fraction, config.val_fraction, previous.get(s.name))
        for s in specs
    }
    for name, parts in splits.items():
        empty = [part for part in ("val", "test") if not parts[part]]
        if empty and main:
            log.warning(
                "%s: the split leaves no %s case (%d cases in all): %s",
                name,
                " and no ".join(empty),
                sum(len(v) for v in parts.values()),
                "no temperature fit or validation on it" if "val" in empty else "nothing to test it on",
            )
    # only the main rank reads and writes split.json (atomically): another data-parallel rank reading it while
    # it is being written saw an empty file; every rank computes the same split from the seed anyway
    if main and split_path.exists():
        previous = json.loads(split_path.read_text(encoding="utf-8"))
        if previous != splits:
            raise MultiTaskSegError(f"{split_path} differs from the split this config gives; use a new output")
    elif main:
        write_text_atomic(split_path, json.dumps(splits, indent=2))
    pre = PreprocessingConfig(tuple(config.target_spacing))
    cache = Path(config.cache_dir or Path.home() / ".cache" / "multitaskseg" / "preprocessed")
    cases: dict[str, list[CachedCase]] = {"train": [], "val": [], "test": []}
    total = sum(len(s.cases) for s in specs)
    done = 0
    for di, spec in enumerate(specs):
        where = {cid: part for part, ids in splits[spec.name].items() for cid in ids}
        for case in spec.cases:
            part = where[case.case_id]
            if part == "test":
                done += 1
                continue  # test cases are never read by training
            cases[part].append(preprocess_case(case, spec, pre, cache, di))
            done += 1
            if main:
                log.info("preprocessed %d/%d %s/%s", done, total, spec.name, case.case_id)
    if not cases["train"]:
        raise MultiTaskSegError("the split leaves no training case")
    return specs, splits, pre, cases


def previous_split(config: TrainConfig) -> dict[str, dict[str, list[str]]]:
    """The split to keep (``split_from``, else the init bundle's): dataset name → {train, val, test}."""
    source = config.split_from or config.init_bundle
    if not source:
        return {}
    path = Path(source)
    if path.is_dir():
        bundle_json = path / "bundle.json"
        if not bundle_json.is_file():
            raise MultiTaskSegError(f"split_from {source}: no bundle.json there (give a bundle or a split.json)")
        split = json.loads(bundle_json.read_text(encoding="utf-8")).get("training", {}).get("split", {})
    elif path.is_file():
        split = json.loads(path.read_text(encoding="utf-8"))
    else:
        raise MultiTaskSegError(f"split_from {source}: no such bundle directory or split file")
    return split


def to_global_labels(cases: list[CachedCase], space: LabelSpace) -> None:
    """Each dataset's label values → the joint label space's (in place)."""
    for c in cases:
        lut = np.zeros(256, np.uint8)
        for local, glob in space.local_to_global[c.dataset].items():
            lut[local] = glob
        c.label = lut[c.label]


def build_model(config: TrainConfig, space: LabelSpace, n_contexts: int) -> ResidualUNet3D:
    net_cfg = NetworkConfig(
        1,
        len(space.names) + 1,
        tuple(config.widths),
        1,
        config.dropout,
        n_contexts if (config.context_head and n_contexts > 1) else 0,
    )
    model = ResidualUNet3D(net_cfg)
    if config.init_bundle:
        source = load_bundle(config.init_bundle)
        if tuple(source.network_config.widths) != net_cfg.widths:
            raise MultiTaskSegError(
                f"{config.init_bundle}: widths {source.network_config.widths} differ from "
                f"the config's {net_cfg.widths}; fine-tuning needs the same architecture"
            )
        state = source.load_model("cpu").state_dict()
        own = model.state_dict()
        compatible = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
        model.load_state_dict(compatible, strict=False)
        log.info(
            "fine-tuning from %s: %d/%d tensors loaded (%s)",
            config.init_bundle,
            len(compatible),
            len(own),
            config.finetune,
        )
        if config.finetune == "decoder":
            for p in model.encoders.parameters():
                p.requires_grad_(False)
        elif config.finetune != "all":
            raise MultiTaskSegError(f"finetune must be 'all' or 'decoder', not {config.finetune!r}")
    return model
