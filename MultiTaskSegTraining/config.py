"""Training configuration: defaults, loading from YAML/JSON, command-line overrides."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from MultiTaskSegLib.errors import MultiTaskSegError

# train+val cases per context the trust fit (OOD detector threshold, quality model) uses, each also with
# one artefact: the conformal 95 % threshold is the largest leave-one-case-out score below ~20 cases in all
DEFAULT_TRUST_FIT_CASES = 12


@dataclass
class TrainConfig:
    data: list[str] = field(default_factory=list)  # MSD dataset folders
    label_mode: str = "per_structure"  # or shared_foreground (the original method's setup)
    merge_same_names: bool = False  # structures with the same name in several datasets share an output
    init_bundle: str | None = None  # fine-tune (transfer learning) from this bundle
    finetune: str = "all"  # all | decoder (encoder frozen)
    seed: int = 0
    # keep the split of this bundle directory or split.json (its cases stay where they were; new cases are
    # assigned); None = the init bundle's split when fine-tuning, else a fresh seeded split
    split_from: str | None = None
    test_fraction: float = 0.2
    val_fraction: float = 0.1
    target_spacing: list[float] = field(default_factory=lambda: [2.0, 2.0, 2.0])
    patch_size: list[int] = field(default_factory=lambda: [64, 64, 64])
    overlap: float = 0.5
    batch_size: int = 2
    widths: list[int] = field(default_factory=lambda: [8, 16, 32, 64, 128])
    dropout: float = 0.1
    context_head: bool = True
    context_loss_weight: float = 0.2
    steps: int = 2000
    max_minutes: float | None = None  # a wall-clock budget: the schedule anneals by whichever ends first
    lr: float = 2e-3
    weight_decay: float = 1e-5
    warmup_steps: int = 50
    lr_schedule: str = "cosine"  # cosine | poly (nnU-Net's (1 - progress)^0.9)
    cpu_bf16: bool = False  # bf16 autocast for training on CPU (CUDA always uses autocast)
    channels_last: bool = False  # channels-last 3D memory format for training
    compile: bool = False  # torch.compile the network for the training steps (falls back to eager if it fails)
    sampling: str = "sqrt"  # sqrt | proportional | uniform, across datasets
    foreground_fraction: float = 0.5
    foreground_mode: str = "per_structure"  # per_structure (each structure equally often) | any
    augment: bool = True
    # also a smooth bias field, Gaussian blur and stronger noise (sampling.artefact): other scanners' artefacts
    artefact_augmentation: bool = False
    checkpoint_every: int = 100
    validate_every: int = 0  # steps between validation-Dice evaluations (0 = none); logged to validation.jsonl
    ood_layers: list[str] = field(default_factory=lambda: ["enc3", "enc4"])
    spectrum_length: int | None = None
    signature_augmentations: int = 2  # extra training signatures per case (random crop + intensity)
    signature_max_cases: int | None = None  # per context; None = every training case (cheaper runs may cap it)
    threshold_k: float = 2.5
    # the context head's window logits count by each window's share of voxels above this normalised intensity
    # (inference.WindowConfig); None = a plain mean over windows (bundles before it)
    foreground_threshold: float | None = None
    # train+val cases per context (each also with one seeded artefact) that fit the per-context OOD detector
    # and the quality model at the end of training (mtseg finalise's code); None = all, 0 = skip (plain detector)
    trust_fit_cases: int | None = DEFAULT_TRUST_FIT_CASES
    restrict_to_context: bool = True
    context_source: str = "head"  # head | signature
    threads: int | None = None
    cache_dir: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_file(cls, path: str | Path) -> "TrainConfig":
        path = Path(path)
        if not path.is_file():
            raise MultiTaskSegError(f"{path}: config file not found")
        text = path.read_text(encoding="utf-8")
        if path.suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise MultiTaskSegError(
                    f"{path}: reading a YAML config needs PyYAML, which comes with the training "
                    "extra: pip install 'multitaskseg[train]' (or give the config as JSON)"
                ) from None
            raw = yaml.safe_load(text) or {}
        else:
            raw = json.loads(text)
        return cls().updated(raw, source=str(path))

    def updated(self, values: dict, source: str = "options") -> "TrainConfig":
        known = {f.name for f in fields(self)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise MultiTaskSegError(f"{source}: unknown training option(s) {', '.join(unknown)}")
        merged = {**asdict(self), **{k: v for k, v in values.items() if v is not None}}
        return TrainConfig(**merged)
