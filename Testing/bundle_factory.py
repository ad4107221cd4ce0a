"""Small bundles for tests: an untrained network with real files and real hashes.

Used where a test checks plumbing (geometry, files, errors, the MRML adapter), not accuracy;
the end-to-end test in test_train_e2e.py trains a network on phantoms instead.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from MultiTaskSegLib import bundle_schema as schema
from MultiTaskSegLib.bundle import Bundle, save_bundle
from MultiTaskSegLib.inference import WindowConfig
from MultiTaskSegLib.network import NetworkConfig, ResidualUNet3D
from MultiTaskSegLib.preprocessing import PreprocessingConfig
from MultiTaskSegLib.terminology import describe

LABELS = [("liver", "AbdomenPhantomCT"), ("spleen", "AbdomenPhantomCT"), ("left ventricle", "HeartPhantomMR")]
CONTEXTS = [
    schema.ContextEntry("AbdomenPhantomCT", "CT", "abdomen", labels=[1, 2], n_training_cases=2),
    schema.ContextEntry("HeartPhantomMR", "MR", "heart", labels=[3], n_training_cases=2),
]


def make_untrained_bundle(
    path: Path, seed: int = 0, spacing: float = 4.0, patch: int = 32, widths: tuple[int, ...] = (4, 8, 16)
) -> Bundle:
    torch.manual_seed(seed)
    config = NetworkConfig(out_channels=len(LABELS) + 1, widths=widths, dropout=0.1, n_contexts=len(CONTEXTS))
    net = ResidualUNet3D(config)
    layers = [f"enc{len(widths) - 1}", "dec0"]
    dim = widths[-1] + widths[0]
    rng = np.random.default_rng(seed)
    signatures = rng.normal(size=(4, dim))
    signatures /= np.linalg.norm(signatures, axis=1, keepdims=True)
    meta = schema.BundleMeta(
        architecture=config,
        preprocessing=schema.PreprocessingBlock(
            PreprocessingConfig((spacing,) * 3), WindowConfig((patch,) * 3, 0.5, 2)
        ),
        labels=[schema.LabelEntry(i + 1, n, c, **describe(n, i)) for i, (n, c) in enumerate(LABELS)],
        contexts=CONTEXTS,
        calibration=schema.Calibration(temperature=1.0),
        ood=schema.OodBlock(
            detector="spectral", layers=layers, spectrum_length=None, threshold=0.5, threshold_rule="test value"
        ),
        inference=schema.InferenceBlock(restrict_to_context=False, context_source="head"),
        training=schema.TrainingBlock(extra={"note": "untrained test bundle"}),
    )
    return save_bundle(path, meta, net.state_dict(), signatures, [0, 0, 1, 1], ["a1", "a2", "h1", "h2"])
