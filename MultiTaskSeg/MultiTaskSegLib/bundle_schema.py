"""bundle.json as dataclasses: the one description of a bundle's metadata.

Training's finalise, ``mtseg finalise`` and the test factory build a :class:`BundleMeta` and
``save_bundle`` writes ``to_dict()``; ``Bundle`` reads its blocks through ``Bundle.schema``.
Every block keeps keys it does not know in ``extra`` and writes them back, and optional
fields left at ``None`` are not written, so an older bundle.json reads and re-writes unchanged
(``BundleMeta.from_dict(meta).to_dict() == meta`` for the shipped bundle).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional, TypeVar

from .inference import WindowConfig
from .network import NetworkConfig
from .preprocessing import PreprocessingConfig

B = TypeVar("B", bound="Block")


@dataclass
class Block:
    """A JSON object with known fields (in writing order) and any unknown ones kept in ``extra``
    (each subclass declares ``extra`` last: Python 3.9 dataclasses have no keyword-only fields)."""

    ALWAYS: ClassVar[tuple[str, ...]] = ()  # written even when None (JSON null)

    @classmethod
    def from_dict(cls: type[B], d: dict) -> B:
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs: dict[str, Any] = {k: v for k, v in d.items() if k in names}
        kwargs["extra"] = {k: v for k, v in d.items() if k not in names}
        return cls(**kwargs)

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        out = {k: v for k, v in out.items() if v is not None or k in self.ALWAYS}
        return {**out, **getattr(self, "extra")}  # noqa: B009 (each subclass declares it, see above)


@dataclass
class LabelEntry(Block):
    value: int
    name: str
    context: Optional[str] = None  # the context whose annotations define it
    color: Optional[list] = None
    terminology: Optional[dict] = None
    extra: dict = field(default_factory=dict)


@dataclass
class ContextEntry(Block):
    name: str
    modality: str
    region: str = "unspecified"
    description: Optional[str] = None
    labels: list = field(default_factory=list)  # label values annotated in this context
    n_training_cases: Optional[int] = None
    licence: Optional[str] = None
    extra: dict = field(default_factory=dict)


@dataclass
class Calibration(Block):
    temperature: float = 1.0
    fitted_on: Optional[str] = None
    val_nll: Optional[float] = None
    extra: dict = field(default_factory=dict)


@dataclass
class OodBlock(Block):
    detector: str = "spectral"
    layers: list = field(default_factory=list)
    spectrum_length: Optional[int] = None
    threshold: Optional[float] = None  # None: one training case, scores are reported unflagged
    context_scale: Optional[list] = None  # per-context kNN scales (absent: plain nearest neighbour)
    conditioning: Optional[str] = None  # "recognised": scored against the recognised context only (absent: any)
    combination: Optional[dict] = None  # {"spectral": [log median, spread], "confidence": [...]} (ood.py)
    context_factor: Optional[list] = None  # per-context score factor ≤ 1: a context's own threshold (ood.py)
    threshold_rule: Optional[str] = None
    signature: Optional[str] = None
    scoring: Optional[str] = None
    signature_augmentations: Optional[int] = None
    fitted_on: Optional[str] = None
    extra: dict = field(default_factory=dict)
    ALWAYS: ClassVar[tuple[str, ...]] = ("spectrum_length", "threshold")


@dataclass
class InferenceBlock(Block):
    restrict_to_context: bool = False
    context_source: str = "head"  # "head" (the network's context head) or "signature"
    extra: dict = field(default_factory=dict)


@dataclass
class Postprocessing(Block):
    largest_component: list = field(default_factory=list)
    chosen_on: Optional[str] = None
    validation_dice: Optional[dict] = None
    extra: dict = field(default_factory=dict)


@dataclass
class TrainingBlock(Block):
    datasets: Optional[list] = None
    split: Optional[dict] = None  # dataset → {"train": [...], "val": [...], "test": [...]}
    seed: Optional[int] = None
    steps: Optional[int] = None
    minutes: Optional[float] = None
    code_revision: Optional[str] = None
    config: Optional[dict] = None
    torch: Optional[str] = None
    extra: dict = field(default_factory=dict)


@dataclass
class PreprocessingBlock:
    """Resampling/intensity settings plus the sliding window (stored together since format 1)."""

    config: PreprocessingConfig
    window: WindowConfig

    @classmethod
    def from_dict(cls, d: dict) -> PreprocessingBlock:
        window = WindowConfig(
            tuple(d["patch_size"]),
            float(d["overlap"]),
            int(d.get("batch_size", 2)),
            foreground_threshold=d.get("foreground_threshold"),  # absent before it existed: a plain mean
        )
        return cls(PreprocessingConfig.from_dict(d), window)

    def to_dict(self) -> dict:
        out = {
            **self.config.to_dict(),
            "patch_size": list(self.window.patch_size),
            "overlap": self.window.overlap,
            "batch_size": self.window.batch_size,
        }
        if self.window.foreground_threshold is not None:
            out["foreground_threshold"] = self.window.foreground_threshold
        return out


@dataclass
class BundleMeta:
    """All of bundle.json. ``files`` and ``format_version`` are filled in by ``save_bundle``."""

    architecture: NetworkConfig
    preprocessing: PreprocessingBlock
    labels: list[LabelEntry]
    contexts: list[ContextEntry]
    ood: OodBlock
    label_mode: Optional[str] = None
    postprocessing: Optional[Postprocessing] = None
    calibration: Calibration = field(default_factory=Calibration)
    inference: InferenceBlock = field(default_factory=InferenceBlock)
    training: TrainingBlock = field(default_factory=TrainingBlock)
    metrics: Optional[dict] = None
    format_version: Optional[int] = None
    files: Optional[dict] = None  # file name → sha256
    quality: Optional[dict] = None  # QualityModel.to_dict(); parsed by Bundle.quality_model()
    extra: dict = field(default_factory=dict)

    BLOCKS: ClassVar[dict[str, Any]] = {
        "ood": OodBlock,
        "postprocessing": Postprocessing,
        "calibration": Calibration,
        "inference": InferenceBlock,
        "training": TrainingBlock,
    }

    @classmethod
    def from_dict(cls, d: dict) -> BundleMeta:
        kw: dict[str, Any] = {
            "architecture": NetworkConfig.from_dict(d["architecture"]),
            "preprocessing": PreprocessingBlock.from_dict(d["preprocessing"]),
            "labels": [LabelEntry.from_dict(x) for x in d["labels"]],
            "contexts": [ContextEntry.from_dict(x) for x in d["contexts"]],
        }
        for name, block in cls.BLOCKS.items():
            if d.get(name) is not None:
                kw[name] = block.from_dict(d[name])
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        for name in ("label_mode", "metrics", "format_version", "files", "quality"):
            if name in d:
                kw[name] = d[name]
        return cls(**kw, extra={k: v for k, v in d.items() if k not in names})

    def to_dict(self) -> dict:
        out: dict[str, Any] = {
            "architecture": self.architecture.to_dict(),
            "preprocessing": self.preprocessing.to_dict(),
            "labels": [x.to_dict() for x in self.labels],
            "contexts": [x.to_dict() for x in self.contexts],
        }
        for name in (
            "label_mode",
            "postprocessing",
            "calibration",
            "ood",
            "inference",
            "training",
            "metrics",
            "format_version",
            "files",
            "quality",
        ):
            value = getattr(self, name)
            if value is not None:
                out[name] = value.to_dict() if hasattr(value, "to_dict") else value
        return {**out, **self.extra}
