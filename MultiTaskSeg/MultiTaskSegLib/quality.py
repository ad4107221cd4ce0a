"""Per-case quality estimate: an expected Dice per structure, without ground truth.

Evidence per predicted structure (all on the canonical grid `predict` already has):

- ``soft_dice``: the Dice between the structure's probability map and its own argmax mask,
  2·Σ_mask p / (Σ p + |mask|). 1 when the network is certain everywhere; it drops when the
  probability mass spreads outside the mask or the mask is only barely won;
- ``mean_entropy``: mean normalised predictive entropy inside the predicted mask (1 when the
  mask is empty: nothing found counts as maximally uncertain);
- ``volume_z``: |log volume − mean| / std of the structure's log volume on the training cases
  (4 when the mask is empty);
- ``stray_share``: the share of the mask outside its largest connected component (before the
  bundle's post-processing): a confused network scatters fragments, and the largest-component
  filter may then keep the wrong one (1 when the mask is empty);
- ``ood_z``: the case's OOD score divided by its threshold (shared by all structures);
- ``context_confidence``: the context head's softmax probability of the recognised context.

A logistic model maps the standardised evidence to an expected Dice in [0, 1]; its
coefficients are plain numbers in bundle.json (no pickle). Each coefficient is fitted within the
sign its evidence implies (``DIRECTION``): more OOD, more entropy, a more unusual volume or more
fragments can never raise the expected Dice, however the fit cases happen to fall, so the estimate
extrapolates sanely to images unlike them. The case's expected Dice is the
mean over the recognised context's structures; the case is flagged when it falls below
``flag_below`` or the OOD detector flags the image.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from .postprocessing import stray_share

FEATURES = ("soft_dice", "mean_entropy", "volume_z", "stray_share", "ood_z", "context_confidence")
# the sign each feature's coefficient may take: +1 = may only raise the expected Dice, -1 = may only lower it
DIRECTION = {
    "soft_dice": 1,
    "mean_entropy": -1,
    "volume_z": -1,
    "stray_share": -1,
    "ood_z": -1,
    "context_confidence": 1,
}
EMPTY_VOLUME_Z = 4.0  # an empty mask is as unusual as a volume 4 std away from the training mean


def structure_evidence(
    probs: torch.Tensor, labels: np.ndarray, entropy: torch.Tensor, structures: list[int], voxel_ml: float
) -> dict[int, dict[str, float]]:
    """Evidence per structure value from (C, z, y, x) probabilities, the (restricted) argmax labels and
    the entropy map, all on the same grid. Linear in the voxels: one gather, three bincounts and one
    connected-component pass per structure (within its bounding box)."""
    n_classes = probs.shape[0]
    lab = torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64)).reshape(-1)
    p_own = probs.reshape(n_classes, -1).gather(0, lab[None])[0]  # each voxel's probability of its own label
    counts = torch.bincount(lab, minlength=n_classes).double()
    inside = torch.bincount(lab, weights=p_own.double(), minlength=n_classes)
    ent = torch.bincount(lab, weights=entropy.reshape(-1).double(), minlength=n_classes)
    out = {}
    for v in structures:
        n, total = float(counts[v]), float(probs[v].sum(dtype=torch.float64))  # only the rows needed
        out[v] = {
            "soft_dice": 2.0 * float(inside[v]) / (total + n) if total + n > 0 else 0.0,
            "mean_entropy": float(ent[v]) / n if n else 1.0,
            "volume_ml": n * voxel_ml,
            "stray_share": stray_share(labels, v) if n else 1.0,
        }
    return out


@dataclass
class QualityResult:
    expected_dice: float
    per_structure: dict[str, float]
    flag: bool

    def to_dict(self) -> dict:
        return {"expected_dice": self.expected_dice, "per_structure": dict(self.per_structure), "flag": self.flag}


@dataclass
class QualityModel:
    """Logistic expected-Dice model on standardised evidence; JSON-serialisable."""

    coef: list[float]
    intercept: float
    mean: list[float]
    scale: list[float]
    log_volume: dict[str, list[float]]  # structure name → [mean, std] of log(volume ml) on training cases
    flag_below: float = 0.5
    features: list[str] = field(default_factory=lambda: list(FEATURES))
    fitted_on: str = ""

    @classmethod
    def from_dict(cls, d: dict) -> "QualityModel":
        model = cls(
            **{
                k: d[k]
                for k in ("coef", "intercept", "mean", "scale", "log_volume", "flag_below", "features", "fitted_on")
                if k in d
            }
        )
        unknown = [f for f in model.features if f not in FEATURES]
        if unknown:  # a bundle from newer code; older bundles use a subset of today's features
            raise ValueError(
                f"quality model features {unknown} are not among the ones this code computes ({list(FEATURES)})"
            )
        if not (len(model.coef) == len(model.mean) == len(model.scale) == len(model.features)):
            raise ValueError("quality model: coef/mean/scale lengths differ from the feature count")
        return model

    def to_dict(self) -> dict:
        return asdict(self)

    def volume_z(self, name: str, volume_ml: float) -> float:
        if volume_ml <= 0:
            return EMPTY_VOLUME_Z
        m, s = self.log_volume.get(name, (math.log(volume_ml), 1.0))
        return min(abs(math.log(volume_ml) - m) / max(s, 1e-3), EMPTY_VOLUME_Z)

    def feature_row(
        self, evidence: dict[str, float], name: str, ood_z: float, context_confidence: float
    ) -> list[float]:
        """The model's features (its own list, in its order) of one structure."""
        values = {
            "soft_dice": evidence["soft_dice"],
            "mean_entropy": evidence["mean_entropy"],
            "volume_z": self.volume_z(name, evidence["volume_ml"]),
            "stray_share": evidence.get("stray_share", 0.0),
            "ood_z": min(ood_z, 10.0),
            "context_confidence": context_confidence,
        }
        return [values[f] for f in self.features]

    def expected_dice(self, rows: np.ndarray) -> np.ndarray:
        x = (np.atleast_2d(np.asarray(rows, dtype=np.float64)) - np.asarray(self.mean)) / np.asarray(self.scale)
        z = x @ np.asarray(self.coef) + self.intercept
        return 1.0 / (1.0 + np.exp(-z))

    def assess(
        self,
        evidence: dict[int, dict[str, float]],
        names: dict[int, str],
        ood_z: float,
        context_confidence: float,
        is_ood: bool,
    ) -> QualityResult:
        """Expected Dice per structure and for the case (mean), and the review flag."""
        values = list(evidence)
        if not values:
            return QualityResult(0.0, {}, True)
        rows = [self.feature_row(evidence[v], names[v], ood_z, context_confidence) for v in values]
        dice = self.expected_dice(np.asarray(rows))
        per = {names[v]: float(d) for v, d in zip(values, dice)}
        case = float(np.mean(dice))
        return QualityResult(case, per, bool(is_ood or case < self.flag_below))
