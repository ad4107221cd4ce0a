"""The training engine: joint / dedicated / fine-tune, resumable, data-parallel under torchrun.

After the last step it fits the temperature on the validation cases, computes the training
signatures and the OOD threshold, and writes the complete bundle.
"""
from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from MultiTaskSegLib.bundle import load_bundle, save_bundle
from MultiTaskSegLib.errors import MultiTaskSegError
from MultiTaskSegLib.inference import WindowConfig, select_device, sliding_window
from MultiTaskSegLib.network import NetworkConfig, ResidualUNet3D
from MultiTaskSegLib.ood import case_groups, loo_threshold
from MultiTaskSegLib.preprocessing import PreprocessingConfig
from MultiTaskSegLib.terminology import describe

from .config import TrainConfig
from .data import CachedCase, DatasetSpec, LabelSpace, build_label_space, load_dataset, preprocess_case, split_cases
from .losses import partial_label_loss
from .postprocess_fit import fit_postprocessing, validation_dice
from .sampling import PatchSampler, augment
from .signatures import case_signatures
from .temperature import fit_temperature

log = logging.getLogger("mtseg.train")
CHECKPOINT = "checkpoint.pt"


@dataclass
class Distributed:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed() -> Distributed:
    """torchrun sets WORLD_SIZE/RANK; gloo on CPU, NCCL on GPUs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return Distributed(dist.get_rank(), dist.get_world_size())


def code_revision() -> str:
    try:
        root = Path(__file__).resolve().parents[1]
        return subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


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
    splits = {s.name: split_cases(s, config.seed, config.test_fraction, config.val_fraction, previous.get(s.name))
              for s in specs}
    for name, parts in splits.items():
        empty = [part for part in ("val", "test") if not parts[part]]
        if empty and main:
            log.warning("%s: the split leaves no %s case (%d cases in all): %s", name, " and no ".join(empty),
                        sum(len(v) for v in parts.values()),
                        "no temperature fit or validation on it" if "val" in empty else "nothing to test it on")
    if split_path.exists():
        previous = json.loads(split_path.read_text(encoding="utf-8"))
        if previous != splits:
            raise MultiTaskSegError(f"{split_path} differs from the split this config gives; use a new output")
    elif main:
        split_path.write_text(json.dumps(splits, indent=2), encoding="utf-8")
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


def _global_labels(cases: list[CachedCase], space: LabelSpace) -> None:
    for c in cases:
        lut = np.zeros(256, np.uint8)
        for local, glob in space.local_to_global[c.dataset].items():
            lut[local] = glob
        c.label = lut[c.label]


def build_model(config: TrainConfig, space: LabelSpace, n_contexts: int) -> ResidualUNet3D:
    net_cfg = NetworkConfig(1, len(space.names) + 1, tuple(config.widths), 1, config.dropout,
                            n_contexts if (config.context_head and n_contexts > 1) else 0)
    model = ResidualUNet3D(net_cfg)
    if config.init_bundle:
        source = load_bundle(config.init_bundle)
        if tuple(source.network_config.widths) != net_cfg.widths:
            raise MultiTaskSegError(f"{config.init_bundle}: widths {source.network_config.widths} differ from "
                                    f"the config's {net_cfg.widths}; fine-tuning needs the same architecture")
        state = source.load_model("cpu").state_dict()
        own = model.state_dict()
        compatible = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
        model.load_state_dict(compatible, strict=False)
        log.info("fine-tuning from %s: %d/%d tensors loaded (%s)", config.init_bundle, len(compatible), len(own),
                 config.finetune)
        if config.finetune == "decoder":
            for p in model.encoders.parameters():
                p.requires_grad_(False)
        elif config.finetune != "all":
            raise MultiTaskSegError(f"finetune must be 'all' or 'decoder', not {config.finetune!r}")
    return model


def lr_at(config: TrainConfig, progress: float) -> float:
    """Linear warm-up, then cosine or poly decay over the run's progress in [0, 1]."""
    warm = config.warmup_steps / max(config.steps, 1)
    if progress < warm:
        return config.lr * max(progress / warm, 0.05)
    rest = min(1.0, (progress - warm) / max(1e-9, 1 - warm))
    if config.lr_schedule == "poly":
        return config.lr * (1 - rest) ** 0.9
    if config.lr_schedule != "cosine":
        raise MultiTaskSegError(f"lr_schedule must be 'cosine' or 'poly', not {config.lr_schedule!r}")
    return config.lr * 0.5 * (1 + math.cos(math.pi * rest))


def _save_checkpoint(path: Path, state: dict) -> None:
    tmp = path.with_name(path.name + ".partial")
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: a kill leaves the previous checkpoint intact


def train(config: TrainConfig, output: Path, work: Path | None = None, resume: bool = False,
          overwrite: bool = False, device: str = "auto", save_replicas: bool = False) -> Path:
    """Run training and write a bundle to ``output``; returns its path."""
    output = Path(output)
    work = Path(work) if work else output.with_name(output.name + "_work")
    ddp = init_distributed()
    if ddp.main:
        if output.exists() and any(output.iterdir()) and not overwrite:
            raise MultiTaskSegError(f"{output} already exists; choose a new --output or pass --overwrite")
        if (work / CHECKPOINT).exists() and not resume:
            raise MultiTaskSegError(f"{work} holds a checkpoint of an earlier run: pass --resume to continue it, "
                                    "or choose another --output / --work-dir")
        work.mkdir(parents=True, exist_ok=True)
    if ddp.world > 1:
        dist.barrier()
    setup_logging(work, ddp.main)
    if config.threads:
        torch.set_num_threads(config.threads)
    dev = select_device(device) if ddp.world == 1 or not torch.cuda.is_available() else \
        torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    specs, splits, pre, cases = prepare_data(config, work, ddp.main)
    space = build_label_space(specs, config.label_mode, config.merge_same_names)
    for part in cases.values():
        _global_labels(part, space)
    if ddp.main:
        (work / "config.json").write_text(json.dumps(config.to_dict(), indent=2), encoding="utf-8")

    torch.manual_seed(config.seed)
    model = build_model(config, space, len(specs)).to(dev)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    step, elapsed = 0, 0.0
    sampler = PatchSampler(cases["train"], len(specs), tuple(config.patch_size), config.sampling,
                           config.foreground_fraction, seed=config.seed * 1000 + ddp.rank,
                           foreground_mode=config.foreground_mode)
    aug_rng = np.random.default_rng(config.seed * 7919 + ddp.rank)
    ckpt_path = work / CHECKPOINT
    if resume and ckpt_path.exists():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step, elapsed = int(state["step"]), float(state["elapsed"])
        sampler.rng.bit_generator.state = json.loads(state["sampler_rng"])
        aug_rng.bit_generator.state = json.loads(state["aug_rng"])
        torch.set_rng_state(state["torch_rng"])
        log.info("resumed from step %d (%.1f min trained)", step, elapsed / 60)
    net = model
    if ddp.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    annotated = [space.annotated(d) for d in range(len(specs))]
    use_amp = dev.type == "cuda" or (dev.type == "cpu" and config.cpu_bf16)
    amp_dtype = torch.bfloat16 if dev.type == "cpu" or torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    memory_format = torch.channels_last_3d if config.channels_last else torch.contiguous_format
    if config.channels_last:
        model.to(memory_format=memory_format)
    budget_s = config.max_minutes * 60 if config.max_minutes else None
    model.train()
    t_last, data_time, losses = time.perf_counter(), 0.0, []
    bar = None
    if ddp.main and sys.stderr.isatty():
        try:
            from tqdm import tqdm
            bar = tqdm(total=config.steps, initial=step, desc="train", file=sys.stderr)
        except ImportError:  # the log lines still report progress
            log.info("tqdm is not installed (pip install 'multitaskseg[train]'): no progress bar")
    log.info("training %s on %s: %d train / %d val cases, %d outputs, %d steps, batch %d×%d, device %s",
             "+".join(s.name for s in specs), dev, len(cases["train"]), len(cases["val"]), len(space.names),
             config.steps, config.batch_size, ddp.world, dev)
    def state_dict() -> dict:  # everything --resume needs to continue the same run
        return {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step, "elapsed": elapsed,
                "sampler_rng": json.dumps(sampler.rng.bit_generator.state),
                "aug_rng": json.dumps(aug_rng.bit_generator.state), "torch_rng": torch.get_rng_state()}

    while True:
        progress = step / config.steps
        if budget_s:
            progress = max(progress, elapsed / budget_s)
        if progress >= 1.0:
            break
        t0 = time.perf_counter()
        x, y, ds = sampler.batch(config.batch_size)
        if config.augment:
            x, y = augment(x, y, aug_rng)
        x, y = x.to(dev, non_blocking=True, memory_format=memory_format), y.to(dev, non_blocking=True)
        t1 = time.perf_counter()
        data_time += t1 - t0
        for g in opt.param_groups:
            g["lr"] = lr_at(config, progress)
        with torch.autocast(dev.type, dtype=amp_dtype, enabled=use_amp):
            logits, feats = net(x)
        loss = partial_label_loss(logits.float(), y, [annotated[d] for d in ds])
        if "context" in feats:
            target = torch.tensor(ds, device=dev)
            loss = loss + config.context_loss_weight * torch.nn.functional.cross_entropy(feats["context"].float(), target)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, 12.0)
        scaler.step(opt)
        scaler.update()
        step += 1
        now = time.perf_counter()
        elapsed += now - t0
        losses.append(float(loss.detach()))
        if budget_s and ddp.world > 1:  # every replica must stop at the same step
            e = torch.tensor([elapsed], device=dev)
            dist.all_reduce(e, op=dist.ReduceOp.MAX)
            elapsed = float(e)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}", lr=f"{lr_at(config, progress):.1e}")
        if ddp.main and step % 25 == 0:
            rate = 25 * config.batch_size * ddp.world / (now - t_last)
            log.info("step %d/%d loss %.4f lr %.2e %.2f patches/s data %.0f%% of step time", step, config.steps,
                     np.mean(losses[-25:]), lr_at(config, progress), rate, 100 * data_time / (now - t_last))
            t_last, data_time = now, 0.0
        if ddp.main and step % config.checkpoint_every == 0:
            _save_checkpoint(ckpt_path, state_dict())
        if ddp.main and config.validate_every and step % config.validate_every == 0 and cases["val"]:
            _log_validation(model, cases["val"], config, annotated, space.names, dev, work, step, elapsed)
            t_last = time.perf_counter()  # the patches/s report counts training only
    if bar is not None:
        bar.close()
    if save_replicas:
        from safetensors.torch import save_file
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
                  str(work / f"replica_{ddp.rank}.safetensors"))
    if ddp.world > 1:
        dist.barrier()
    if ddp.main:
        _save_checkpoint(ckpt_path, state_dict())
        log.info("training done: %d steps in %.1f min; finalising the bundle", step, elapsed / 60)
        finalise(config, model.eval(), specs, splits, pre, space, cases, output, dev, step, elapsed)
    if ddp.world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return output


def _log_validation(model: ResidualUNet3D, val: list[CachedCase], config: TrainConfig, annotated: list[list[int]],
                    names: list[str], dev: torch.device, work: Path, step: int, elapsed: float) -> None:
    """Validation Dice per structure, to see whether a run still improves (validation.jsonl)."""
    t0 = time.perf_counter()
    window = WindowConfig(tuple(config.patch_size), config.overlap, config.batch_size)
    scores = validation_dice(model, val, window, dev, annotated, names)
    record = {"step": step, "minutes": round(elapsed / 60, 1), "dice": scores}
    with open(work / "validation.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
    log.info("validation at step %d: mean Dice %.3f (%s) in %.0f s", step, scores.get("mean", float("nan")),
             ", ".join(f"{k} {v:.2f}" for k, v in scores.items() if k != "mean"), time.perf_counter() - t0)


def finalise(config: TrainConfig, model: ResidualUNet3D, specs: list[DatasetSpec], splits: dict, pre: PreprocessingConfig,
             space: LabelSpace, cases: dict[str, list[CachedCase]], output: Path, dev: torch.device,
             step: int, elapsed: float) -> Path:
    """Temperature on validation cases, training signatures + threshold, then the bundle."""
    window = WindowConfig(tuple(config.patch_size), config.overlap, config.batch_size)
    annotated = [space.annotated(d) for d in range(len(specs))]
    t0 = time.perf_counter()
    temperature, val_nll = fit_temperature(model, cases["val"], window, dev, annotated)
    log.info("temperature %.3f fitted on %d validation cases (NLL %s) in %.0f s", temperature, len(cases["val"]),
             val_nll, time.perf_counter() - t0)
    t0 = time.perf_counter()
    postprocessing = fit_postprocessing(model, cases["val"], window, dev, annotated, len(space.names))
    log.info("largest-component post-processing for labels %s (validation Dice %s) in %.0f s",
             postprocessing["largest_component"], postprocessing["validation_dice"], time.perf_counter() - t0)
    t0 = time.perf_counter()
    signature_cases = cases["train"]
    if config.signature_max_cases:
        signature_cases = [c for d in range(len(specs))
                           for c in [c for c in cases["train"] if c.dataset == d][:config.signature_max_cases]]
    signatures, context_index, case_ids = case_signatures(model, signature_cases, window, dev, config.ood_layers,
                                                          config.spectrum_length, config.signature_augmentations,
                                                          seed=config.seed)
    try:
        threshold = loo_threshold(signatures, config.threshold_k, case_groups(case_ids))
    except ValueError:  # one training case: no leave-one-out distance exists
        threshold = None
        log.warning("only one training case: the OOD threshold cannot be set; scores are reported unflagged")
    log.info("%d training signatures (%d dims) in %.0f s; OOD threshold %s", len(signatures), signatures.shape[1],
             time.perf_counter() - t0, threshold)
    n_train = {s.name: len(splits[s.name]["train"]) for s in specs}
    labels = []
    for i, name in enumerate(space.names):
        owner = specs[space.owner[i]]
        labels.append({"value": i + 1, "name": name, "context": owner.name, **describe(name, i)})
    contexts = [{"name": s.name, "modality": s.modality, "region": s.meta.get("region", _region(s)),
                 "description": s.meta.get("description", "")[:300], "labels": annotated[d],
                 "n_training_cases": n_train[s.name], "licence": s.meta.get("licence", "")}
                for d, s in enumerate(specs)]
    meta = {
        "architecture": model.config.to_dict(),
        "preprocessing": {**pre.to_dict(), "patch_size": list(config.patch_size), "overlap": config.overlap,
                          "batch_size": config.batch_size},
        "labels": labels,
        "contexts": contexts,
        "label_mode": config.label_mode,
        "postprocessing": postprocessing,
        "calibration": {"temperature": temperature, "fitted_on": "validation split", "val_nll": val_nll},
        "ood": {"detector": "spectral", "layers": list(config.ood_layers), "spectrum_length": config.spectrum_length,
                "threshold": threshold, "threshold_rule": f"mean + {config.threshold_k}·std of leave-one-case-out "
                "nearest-neighbour distances among training signatures",
                "signature": "log singular values of the (voxels × channels) feature matrix / sqrt(voxels), L2-normalised",
                "signature_augmentations": config.signature_augmentations},
        "inference": {"restrict_to_context": bool(config.restrict_to_context and len(specs) > 1
                                                  and config.label_mode == "per_structure"),
                      "context_source": config.context_source if model.context_head is not None else "signature"},
        "training": {"datasets": [{"name": s.name, "path": str(s.root), "sha256": s.content_hash(),
                                   "n_cases": len(s.cases)} for s in specs],
                     "split": splits, "seed": config.seed, "steps": step, "minutes": round(elapsed / 60, 1),
                     "code_revision": code_revision(), "config": config.to_dict(),
                     "torch": torch.__version__},
        "metrics": {},
    }
    save_bundle(output, meta, model.state_dict(), signatures, context_index, case_ids)
    log.info("bundle written to %s", output)
    return output


def _region(spec: DatasetSpec) -> str:
    text = (spec.name + " " + spec.meta.get("description", "")).lower()
    for key, region in (("brain", "brain"), ("cardiac", "heart"), ("atri", "heart"), ("heart", "heart"),
                        ("abdom", "abdomen"), ("liver", "abdomen"), ("prostate", "pelvis")):
        if key in text:
            return region
    return "unspecified"
