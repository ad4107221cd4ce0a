"""Seeded acquisition artefacts (TorchIO) at named severities, for the trust benchmark.

Every transform runs on the image rescaled to [0, 1] by its 0.5/99.5 percentiles (so one
severity means the same on CT in HU, z-scored MR and [0, 1] MR) and is mapped back to the
original intensity range afterwards; geometry (size, spacing, origin, direction) is kept.
Severity 1 is mild, 2 moderate, 3 severe. The parameters are fixed per severity (not drawn
from ranges), only the random phase of each artefact comes from the seed.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

#: type → severity → TorchIO keyword arguments (fixed values: (v, v) ranges)
SEVERITIES: dict[str, dict[int, dict]] = {
    "noise": {1: {"std": (0.03, 0.03)}, 2: {"std": (0.08, 0.08)}, 3: {"std": (0.2, 0.2)}},
    "blur": {1: {"std": (1.0, 1.0)}, 2: {"std": (2.5, 2.5)}, 3: {"std": (5.0, 5.0)}},
    "bias": {1: {"coefficients": (0.1, 0.1)}, 2: {"coefficients": (0.25, 0.25)}, 3: {"coefficients": (0.5, 0.5)}},
    "ghosting": {
        1: {"num_ghosts": (4, 4), "intensity": (0.3, 0.3)},
        2: {"num_ghosts": (6, 6), "intensity": (0.7, 0.7)},
        3: {"num_ghosts": (10, 10), "intensity": (1.2, 1.2)},
    },
    "motion": {
        1: {"degrees": 3, "translation": 3, "num_transforms": 2},
        2: {"degrees": 8, "translation": 8, "num_transforms": 3},
        3: {"degrees": 15, "translation": 15, "num_transforms": 4},
    },
    "spike": {
        1: {"num_spikes": 1, "intensity": (0.3, 0.3)},
        2: {"num_spikes": 2, "intensity": (0.8, 0.8)},
        3: {"num_spikes": 4, "intensity": (1.5, 1.5)},
    },
    "anisotropy": {1: {"downsampling": (2, 2)}, 2: {"downsampling": (4, 4)}, 3: {"downsampling": (7, 7)}},
    "gamma": {1: {"log_gamma": (0.3, 0.3)}, 2: {"log_gamma": (-0.7, -0.7)}, 3: {"log_gamma": (1.2, 1.2)}},
}


def _transform(kind: str, severity: int):
    import torchio as tio

    cls = {
        "noise": tio.RandomNoise,
        "blur": tio.RandomBlur,
        "bias": tio.RandomBiasField,
        "ghosting": tio.RandomGhosting,
        "motion": tio.RandomMotion,
        "spike": tio.RandomSpike,
        "anisotropy": tio.RandomAnisotropy,
        "gamma": tio.RandomGamma,
    }[kind]
    kwargs = dict(SEVERITIES[kind][severity])
    if kind == "noise":
        kwargs["mean"] = 0.0
    return cls(**kwargs)


def corrupt(image: sitk.Image, kind: str, severity: int, seed: int) -> sitk.Image:
    """``image`` with the artefact ``kind`` at ``severity`` (1–3), reproducible from ``seed``."""
    import torch
    import torchio as tio

    if kind not in SEVERITIES or severity not in SEVERITIES[kind]:
        raise ValueError(f"unknown corruption {kind!r} severity {severity!r}; known: {sorted(SEVERITIES)} × 1–3")
    arr = sitk.GetArrayFromImage(image).astype(np.float32)  # (z, y, x)
    lo, hi = np.percentile(arr, [0.5, 99.5])
    span = float(hi - lo) if hi > lo else 1.0
    unit = np.clip((arr - lo) / span, 0.0, None)  # gamma needs non-negative intensities
    spacing = image.GetSpacing()
    affine = np.diag([*spacing, 1.0])
    subject = tio.ScalarImage(tensor=torch.from_numpy(unit.transpose(2, 1, 0).copy())[None], affine=affine)
    torch.manual_seed(seed)
    out = _transform(kind, severity)(subject).data[0].numpy().transpose(2, 1, 0)
    result = sitk.GetImageFromArray((out * span + lo).astype(np.float32))
    result.CopyInformation(image)
    return result
