"""The training engine: joint / dedicated / fine-tune, resumable, data-parallel under torchrun.

A run goes through named stages: set-up (``TrainingRun.set_up``: data, split, model, optimiser,
resume), steps (``training_step``, shared with the benchmark), checkpoints and validation while it
runs, and ``finalise`` (temperature, post-processing, signatures, threshold, the bundle).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import numpy as np
import torch
import torch.distributed as dist

from MultiTaskSegLib.atomic import atomic_path
from MultiTaskSegLib.errors import MultiTaskSegError
from MultiTaskSegLib.inference import WindowConfig, select_device
from MultiTaskSegLib.network import ResidualUNet3D
from MultiTaskSegLib.preprocessing import PreprocessingConfig

from .config import TrainConfig
from .data import CachedCase, DatasetSpec, LabelSpace, build_label_space
from .distributed import Distributed, init_distributed
from .finalise import finalise
from .losses import partial_label_loss
from .postprocess_fit import validation_dice
from .run_setup import build_model, log, prepare_data, setup_logging, to_global_labels
from .sampling import PatchSampler, augment

CHECKPOINT = "checkpoint.pt"


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


def training_step(
    net: torch.nn.Module,
    opt: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    x: torch.Tensor,
    y: torch.Tensor,
    datasets: list[int],
    annotated: list[list[int]],
    context_loss_weight: float,
    autocast: tuple[str, torch.dtype, bool],
) -> torch.Tensor:
    """One optimiser step on a batch: forward (under autocast when enabled), partial-label loss plus the
    context head's cross-entropy, backward, gradient clipping; returns the loss."""
    device_type, dtype, enabled = autocast
    with torch.autocast(device_type, dtype=dtype, enabled=enabled):
        logits, feats = net(x)
    loss = partial_label_loss(logits.float(), y, [annotated[d] for d in datasets])
    if "context" in feats:
        target = torch.tensor(datasets, device=logits.device)
        loss = loss + context_loss_weight * torch.nn.functional.cross_entropy(feats["context"].float(), target)
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 12.0)
    scaler.step(opt)
    scaler.update()
    return loss.detach()


def save_checkpoint(path: Path, state: dict) -> None:
    with atomic_path(path) as tmp:  # a kill leaves the previous checkpoint intact
        torch.save(state, tmp)


@dataclass
class TrainingRun:
    """Everything a run holds between its stages."""

    config: TrainConfig
    work: Path
    ddp: Distributed
    device: torch.device
    specs: list[DatasetSpec]
    splits: dict
    preprocessing: PreprocessingConfig
    space: LabelSpace
    cases: dict[str, list[CachedCase]]
    model: ResidualUNet3D
    opt: torch.optim.Optimizer
    sampler: PatchSampler
    aug_rng: np.random.Generator
    step: int = 0
    elapsed: float = 0.0  # seconds spent in training steps (the wall-clock budget counts these)
    losses: list[float] = field(default_factory=list)

    @classmethod
    def set_up(cls, config: TrainConfig, work: Path, ddp: Distributed, device: torch.device) -> "TrainingRun":
        """Data (split, preprocessing, joint label space), model (fresh or from the init bundle), optimiser."""
        specs, splits, pre, cases = prepare_data(config, work, ddp.main)
        space = build_label_space(specs, config.label_mode, config.merge_same_names)
        for part in cases.values():
            to_global_labels(part, space)
        if ddp.main:
            (work / "config.json").write_text(json.dumps(config.to_dict(), indent=2), encoding="utf-8")
        torch.manual_seed(config.seed)
        model = build_model(config, space, len(specs)).to(device)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        sampler = PatchSampler(
            cases["train"],
            len(specs),
            tuple(config.patch_size),
            config.sampling,
            config.foreground_fraction,
            seed=config.seed * 1000 + ddp.rank,
            foreground_mode=config.foreground_mode,
        )
        aug_rng = np.random.default_rng(config.seed * 7919 + ddp.rank)
        return cls(config, work, ddp, device, specs, splits, pre, space, cases, model, opt, sampler, aug_rng)

    @property
    def annotated(self) -> list[list[int]]:
        return [self.space.annotated(d) for d in range(len(self.specs))]

    @property
    def progress(self) -> float:
        """Fraction of the run done: by steps, or by the wall-clock budget when that ends first."""
        done = self.step / self.config.steps
        if self.config.max_minutes:
            done = max(done, self.elapsed / (self.config.max_minutes * 60))
        return done

    def state_dict(self) -> dict:
        """Everything --resume needs to continue the same run."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "step": self.step,
            "elapsed": self.elapsed,
            "sampler_rng": json.dumps(self.sampler.rng.bit_generator.state),
            "aug_rng": json.dumps(self.aug_rng.bit_generator.state),
            "torch_rng": torch.get_rng_state(),
        }

    def restore(self, path: Path) -> None:
        state = torch.load(path, map_location="cpu", weights_only=True)
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.step, self.elapsed = int(state["step"]), float(state["elapsed"])
        self.sampler.rng.bit_generator.state = json.loads(state["sampler_rng"])
        self.aug_rng.bit_generator.state = json.loads(state["aug_rng"])
        torch.set_rng_state(state["torch_rng"])
        log.info("resumed from step %d (%.1f min trained)", self.step, self.elapsed / 60)

    def checkpoint(self) -> None:
        save_checkpoint(self.work / CHECKPOINT, self.state_dict())

    def validate(self) -> None:
        """Validation Dice per structure, to see whether the run still improves (validation.jsonl)."""
        t0 = time.perf_counter()
        c = self.config
        window = WindowConfig(tuple(c.patch_size), c.overlap, c.batch_size)
        scores = validation_dice(self.model, self.cases["val"], window, self.device, self.annotated, self.space.names)
        record = {"step": self.step, "minutes": round(self.elapsed / 60, 1), "dice": scores}
        with open(self.work / "validation.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        log.info(
            "validation at step %d: mean Dice %.3f (%s) in %.0f s",
            self.step,
            scores.get("mean", float("nan")),
            ", ".join(f"{k} {v:.2f}" for k, v in scores.items() if k != "mean"),
            time.perf_counter() - t0,
        )

    def run_steps(self) -> None:
        """Train until the step count or the wall-clock budget is spent, with checkpoints and validation."""
        c, ddp, dev = self.config, self.ddp, self.device
        memory_format = torch.channels_last_3d if c.channels_last else torch.contiguous_format
        set_memory_format(self.model, memory_format)  # before DDP: its gradient buckets take the params' layout
        net: torch.nn.Module = self.model
        if ddp.world > 1:
            net = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[dev.index] if dev.type == "cuda" else None
            )
        use_amp = dev.type == "cuda" or (dev.type == "cpu" and c.cpu_bf16)
        amp_dtype = torch.bfloat16 if dev.type == "cpu" or torch.cuda.is_bf16_supported() else torch.float16
        scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
        self.model.train()
        annotated = self.annotated
        bar = _progress_bar(c.steps, self.step) if ddp.main else None
        log.info(
            "training %s on %s: %d train / %d val cases, %d outputs, %d steps, batch %d×%d, device %s",
            "+".join(s.name for s in self.specs),
            dev,
            len(self.cases["train"]),
            len(self.cases["val"]),
            len(self.space.names),
            c.steps,
            c.batch_size,
            ddp.world,
            dev,
        )
        net = compiled(net) if c.compile else net
        t_last, data_time = time.perf_counter(), 0.0
        while self.progress < 1.0:
            progress = self.progress
            t0 = time.perf_counter()
            x, y, ds = self.sampler.batch(c.batch_size)
            if c.augment:
                x, y = augment(x, y, self.aug_rng, artefacts=c.artefact_augmentation)
            x, y = x.to(dev, non_blocking=True, memory_format=memory_format), y.to(dev, non_blocking=True)
            data_time += time.perf_counter() - t0
            for g in self.opt.param_groups:
                g["lr"] = lr_at(c, progress)
            step_args = (self.opt, scaler, x, y, ds, annotated, c.context_loss_weight, (dev.type, amp_dtype, use_amp))
            try:
                loss = training_step(net, *step_args)
            except Exception as exc:  # noqa: BLE001  compilation happens on the first call; it may fail
                # for reasons of the compiler stack, not of training (no C++ compiler, an ASCII locale that
                # a library set in this process): retry eager, which raises again if training itself failed
                if net is self.model:
                    raise
                log.warning(
                    "torch.compile failed (%s: %s); training without it%s",
                    type(exc).__name__,
                    (str(exc).splitlines() or [""])[0][:200],
                    " (an ASCII locale: run with PYTHONUTF8=1 to compile)" if isinstance(exc, UnicodeError) else "",
                )
                net = self.model
                self.opt.zero_grad(set_to_none=True)
                loss = training_step(net, *step_args)
            self.step += 1
            now = time.perf_counter()
            self.elapsed += now - t0
            self.losses.append(float(loss))
            if c.max_minutes and ddp.world > 1:  # every replica must stop at the same step
                e = torch.tensor([self.elapsed], device=dev)
                dist.all_reduce(e, op=dist.ReduceOp.MAX)
                self.elapsed = float(e)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{np.mean(self.losses[-20:]):.3f}", lr=f"{lr_at(c, progress):.1e}")
            if ddp.main and self.step % 25 == 0:
                rate = 25 * c.batch_size * ddp.world / (now - t_last)
                log.info(
                    "step %d/%d loss %.4f lr %.2e %.2f patches/s data %.0f%% of step time",
                    self.step,
                    c.steps,
                    np.mean(self.losses[-25:]),
                    lr_at(c, progress),
                    rate,
                    100 * data_time / (now - t_last),
                )
                t_last, data_time = now, 0.0
            if ddp.main and self.step % c.checkpoint_every == 0:
                self.checkpoint()
            if ddp.main and c.validate_every and self.step % c.validate_every == 0 and self.cases["val"]:
                self.validate()
                t_last = time.perf_counter()  # the patches/s report counts training only
        if bar is not None:
            bar.close()


def set_memory_format(model: torch.nn.Module, memory_format: torch.memory_format) -> None:
    """``model.to(memory_format=…)``, but 1×1×1 kernels keep plain strides (the same memory either way):
    their gradients come out with plain strides, and DDP warns and copies every step when a gradient's
    strides differ from its bucket's (the parameter's). (The input convolution's weight, one input
    channel, is ambiguous too; its gradient follows the kernel aten picks, channels-last with oneDNN at
    batch ≥ 2 as the recipe trains, so it keeps the channels-last strides.)"""
    model.to(memory_format=memory_format)  # type: ignore[call-overload]  # torch's stubs omit memory_format
    for m in model.modules():
        if isinstance(m, torch.nn.Conv3d) and m.kernel_size == (1, 1, 1):
            m.weight.data = m.weight.data.clone(memory_format=torch.contiguous_format)


def compiled(net: torch.nn.Module) -> torch.nn.Module:
    """The network under torch.compile (fixed patch and batch shapes: one graph). On this 2-core CPU
    (benchmarks/train_step_ab.py) it takes ~1.2× less CPU per step in channels-last fp32, after about a
    minute of compilation on the first step. Parameters stay shared with the eager module, so validation,
    checkpoints and the bundle use the eager one."""
    return cast(torch.nn.Module, torch.compile(net, dynamic=False))


def _progress_bar(total: int, initial: int):
    if not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # the log lines still report progress
        log.info("tqdm is not installed (pip install 'multitaskseg[train]'): no progress bar")
        return None
    return tqdm(total=total, initial=initial, desc="train", file=sys.stderr)


def train(
    config: TrainConfig,
    output: Path,
    work: Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    device: str = "auto",
    save_replicas: bool = False,
) -> Path:
    """Run training and write a bundle to ``output``; returns its path."""
    output = Path(output)
    work = Path(work) if work else output.with_name(output.name + "_work")
    ddp = init_distributed()
    if ddp.main:
        if output.exists() and any(output.iterdir()) and not overwrite:
            raise MultiTaskSegError(f"{output} already exists; choose a new --output or pass --overwrite")
        if (work / CHECKPOINT).exists() and not resume:
            raise MultiTaskSegError(
                f"{work} holds a checkpoint of an earlier run: pass --resume to continue it, "
                "or choose another --output / --work-dir"
            )
        work.mkdir(parents=True, exist_ok=True)
    if ddp.world > 1:
        dist.barrier()
    setup_logging(work, ddp.main)
    if config.threads:
        torch.set_num_threads(config.threads)
    dev = (
        select_device(device)
        if ddp.world == 1 or not torch.cuda.is_available()
        else torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    )
    run = TrainingRun.set_up(config, work, ddp, dev)
    if resume and (work / CHECKPOINT).exists():
        run.restore(work / CHECKPOINT)
    run.run_steps()
    if save_replicas:
        from safetensors.torch import save_file

        save_file(
            {k: v.detach().cpu().contiguous() for k, v in run.model.state_dict().items()},
            str(work / f"replica_{ddp.rank}.safetensors"),
        )
    if ddp.world > 1:
        dist.barrier()
    if ddp.main:
        run.checkpoint()
        log.info("training done: %d steps in %.1f min; finalising the bundle", run.step, run.elapsed / 60)
        finalise(
            config,
            run.model.eval(),
            run.specs,
            run.splits,
            run.preprocessing,
            run.space,
            run.cases,
            output,
            dev,
            run.step,
            run.elapsed,
        )
        if config.trust_fit_cases != 0:
            from .trust_finalise import refit_trust  # the same code as `mtseg finalise`

            refit_trust(
                output,
                config.data,
                output,
                fit_cases=config.trust_fit_cases,
                device=str(dev),
                overwrite=True,
                log=log.info,
            )
    if ddp.world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return output
