"""The model bundle: a directory with bundle.json, model.safetensors and signatures.npz.

No pickle anywhere: weights are safetensors, signatures an .npz read with
``allow_pickle=False``. Loading checks ``format_version`` and the sha256 of every file.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .atomic import write_text_atomic
from .bundle_schema import BundleMeta
from .errors import BundleError
from .inference import WindowConfig
from .network import NetworkConfig, ResidualUNet3D
from .ood import SpectralDetector
from .preprocessing import PreprocessingConfig
from .quality import QualityModel

FORMAT_VERSION = 1
MODEL_FILE = "model.safetensors"
SIGNATURES_FILE = "signatures.npz"
META_FILE = "bundle.json"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class Bundle:
    path: Path
    meta: dict  # bundle.json as read (the labels and contexts travel as these dicts to MRML and the worker)
    schema: BundleMeta = field(init=False, repr=False)

    def __post_init__(self) -> None:
        try:
            self.schema = BundleMeta.from_dict(self.meta)
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(
                f"{self.path}: {META_FILE} is malformed ({type(exc).__name__}: {exc}); re-export the bundle"
            ) from None

    # --- parsed views of bundle.json -------------------------------------------------
    @property
    def network_config(self) -> NetworkConfig:
        return self.schema.architecture

    @property
    def preprocessing(self) -> PreprocessingConfig:
        return self.schema.preprocessing.config

    @property
    def window(self) -> WindowConfig:
        return self.schema.preprocessing.window

    @property
    def temperature(self) -> float:
        return float(self.schema.calibration.temperature)

    @property
    def labels(self) -> list[dict]:
        return self.meta["labels"]

    @property
    def label_names(self) -> dict[int, str]:
        return {int(entry.value): entry.name for entry in self.schema.labels}

    @property
    def contexts(self) -> list[dict]:
        return self.meta["contexts"]

    @property
    def context_names(self) -> list[str]:
        return [c.name for c in self.schema.contexts]

    # --- heavy parts -----------------------------------------------------------------
    def load_model(self, device: torch.device | str = "cpu") -> ResidualUNet3D:
        model = ResidualUNet3D(self.network_config)
        try:
            state = load_file(str(self.path / MODEL_FILE), device="cpu")
            model.load_state_dict(state)
        except Exception as exc:  # safetensors raises several types for a corrupt file
            raise BundleError(f"{self.path}: cannot load {MODEL_FILE}: {exc}") from None
        return model.to(device).eval()

    def detector(self) -> SpectralDetector:
        ood = self.schema.ood
        if ood.combination is not None:
            ok = isinstance(ood.combination, dict) and set(ood.combination) == {"spectral", "confidence"}
            ok = ok and all(
                len(v) == 2 and all(isinstance(x, (int, float)) for x in v) and v[1] > 0
                for v in ood.combination.values()
            )
            if not ok:
                raise BundleError(
                    f"{self.path}: ood.combination must be {{'spectral': [median, spread], 'confidence': "
                    f"[median, spread]}} with spreads > 0, got {ood.combination!r}; re-run mtseg finalise"
                )
        factor = ood.context_factor
        if factor is not None and not (
            len(factor) == len(self.context_names) and all(isinstance(v, (int, float)) and 0 < v <= 1 for v in factor)
        ):
            raise BundleError(
                f"{self.path}: ood.context_factor must hold one number in (0, 1] per context "
                f"({len(self.context_names)}), got {factor!r}; re-run mtseg finalise"
            )
        if (ood.conditioning or "any") not in ("any", "recognised"):
            raise BundleError(f"{self.path}: ood.conditioning must be 'any' or 'recognised', not {ood.conditioning!r}")
        with np.load(self.path / SIGNATURES_FILE, allow_pickle=False) as data:
            scale = ood.context_scale  # per-context kNN (absent in older bundles: plain nearest neighbour)
            return SpectralDetector(
                signatures=data["signatures"],
                context_index=data["context_index"],
                case_ids=data["case_ids"],
                context_names=self.context_names,
                layers=list(ood.layers),
                spectrum_length=ood.spectrum_length,
                threshold=math.inf if ood.threshold is None else float(ood.threshold),
                context_scale=None if scale is None else np.asarray(scale, dtype=np.float64),
                conditioning=ood.conditioning or "any",
                combination=ood.combination,
                context_factor=None if ood.context_factor is None else np.asarray(ood.context_factor, np.float64),
            )

    def quality_model(self) -> QualityModel | None:
        """The expected-Dice model (bundle.json 'quality', plain numbers); None for bundles without one."""
        if not self.schema.quality:
            return None
        try:
            return QualityModel.from_dict(self.schema.quality)
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(
                f"{self.path}: {META_FILE} has an unusable 'quality' section ({exc}); "
                "re-finalise the bundle (mtseg finalise)"
            ) from None


def load_bundle(path: str | os.PathLike) -> Bundle:
    """Open a bundle directory, verifying its format version and every file hash."""
    path = Path(path)
    if not path.is_dir():
        raise BundleError(f"{path}: model bundle not found (expected a directory with {META_FILE})")
    meta_path = path / META_FILE
    if not meta_path.is_file():
        raise BundleError(f"{path}: not a model bundle ({META_FILE} is missing)")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{meta_path}: not valid JSON ({exc})") from None
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(
            f"{path}: unknown bundle format_version {version!r}; this MultiTaskSeg reads "
            f"version {FORMAT_VERSION} — update MultiTaskSeg or re-export the bundle"
        )
    files = meta.get("files") or {}
    for required in (MODEL_FILE, SIGNATURES_FILE):
        if required not in files:
            raise BundleError(f"{path}: {META_FILE} lists no sha256 for {required}")
    for name, digest in files.items():
        file = path / name
        if not file.is_file():
            raise BundleError(f"{path}: {name} is missing from the bundle")
        actual = sha256_file(file)
        if actual != digest:
            raise BundleError(
                f"{path}: {name} is corrupt or was modified (sha256 {actual[:12]}… "
                f"does not match {digest[:12]}… in {META_FILE}); restore or re-download the bundle"
            )
    for key in ("architecture", "preprocessing", "labels", "contexts", "ood"):
        if key not in meta:
            raise BundleError(f"{path}: {META_FILE} has no '{key}' section")
    return Bundle(path, meta)


def save_bundle(
    path: str | os.PathLike,
    meta: BundleMeta | dict,
    state_dict: dict[str, torch.Tensor],
    signatures: np.ndarray,
    context_index: np.ndarray,
    case_ids: list[str],
) -> Bundle:
    """Write a complete bundle (files first, bundle.json with their hashes last)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    save_file(tensors, str(path / MODEL_FILE))
    np.savez_compressed(
        path / SIGNATURES_FILE,
        signatures=np.asarray(signatures, dtype=np.float32),
        context_index=np.asarray(context_index, dtype=np.int32),
        case_ids=np.asarray(case_ids, dtype=str),
    )
    meta = meta.to_dict() if isinstance(meta, BundleMeta) else dict(meta)
    meta["format_version"] = FORMAT_VERSION
    meta["files"] = {name: sha256_file(path / name) for name in (MODEL_FILE, SIGNATURES_FILE)}
    write_text_atomic(path / META_FILE, json.dumps(meta, indent=2))
    return load_bundle(path)
