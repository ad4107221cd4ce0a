"""A bundle of the default architecture for timing and equivalence checks (no trained model needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def default_architecture_bundle(path: Path, checkpoint: str | None = None) -> Path:
    """A network of the default architecture (14 outputs, 5 contexts) with real hashes: untrained, or
    with the weights of a training checkpoint (``checkpoint.pt`` of `mtseg train`) of that architecture."""
    import torch

    from MultiTaskSegLib.bundle import save_bundle
    from MultiTaskSegLib.network import NetworkConfig, ResidualUNet3D
    from MultiTaskSegLib.preprocessing import PreprocessingConfig
    from MultiTaskSegLib.terminology import describe

    torch.manual_seed(0)
    contexts = [
        ("CardiacCineMR", "MR", [1, 2, 3]),
        ("LeftAtriumMR", "MR", [4]),
        ("AbdomenCT", "CT", [5, 6, 7]),
        ("BrainTumorMR", "MR", [8, 9, 10]),
        ("BrainStructuresMR", "MR", [11, 12, 13]),
    ]
    n_labels = 13  # + background = 14 outputs
    config = NetworkConfig(
        out_channels=n_labels + 1, widths=(8, 16, 32, 64, 128), dropout=0.1, n_contexts=len(contexts)
    )
    net = ResidualUNet3D(config)
    if checkpoint:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        net.load_state_dict(state["model"])
    layers = ["enc3", "enc4"]
    rng = np.random.default_rng(0)
    signatures = rng.normal(size=(10, 64 + 128))
    signatures /= np.linalg.norm(signatures, axis=1, keepdims=True)
    owner = {v: c[0] for c in contexts for v in c[2]}
    meta = {
        "architecture": config.to_dict(),
        "preprocessing": {
            **PreprocessingConfig((2.0, 2.0, 2.0)).to_dict(),
            "patch_size": [64, 64, 64],
            "overlap": 0.5,
            "batch_size": 2,
        },
        "labels": [
            {"value": v, "name": f"structure {v}", "context": owner[v], **describe(f"structure {v}", v - 1)}
            for v in range(1, n_labels + 1)
        ],
        "contexts": [
            {"name": n, "modality": m, "region": "unspecified", "labels": lab, "n_training_cases": 2}
            for n, m, lab in contexts
        ],
        "calibration": {"temperature": 1.0},
        "ood": {
            "detector": "spectral",
            "layers": layers,
            "spectrum_length": None,
            "threshold": 0.5,
            "threshold_rule": "benchmark placeholder",
        },
        "inference": {"restrict_to_context": True, "context_source": "head"},
        "training": {
            "note": f"weights of {checkpoint}"
            if checkpoint
            else "untrained network of the default architecture, for timing only"
        },
    }
    save_bundle(path, meta, net.state_dict(), signatures, [i // 2 for i in range(10)], [f"c{i}" for i in range(10)])
    return path
