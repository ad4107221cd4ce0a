"""Evaluation plots (matplotlib, Agg backend: no display needed). Each function writes one PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

GREY = "0.35"


def _save(fig, path: Path) -> Path:
    path = Path(path)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _nan(values) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values], dtype=float)


def reliability_diagram(reliability: dict, context: str, path: Path) -> Path:
    """Per structure (columns): observed frequency vs mean predicted probability per bin, whole image
    (top row) and boundary band (bottom row), before (T=1) and after temperature scaling."""
    temps = list(reliability)
    structures = list(next(iter(reliability.values())))
    n = max(len(structures), 1)
    fig, axes = plt.subplots(2, n, figsize=(3.2 * n, 6.4), squeeze=False)
    styles = ["o--", "s-"]
    for j, name in enumerate(structures):
        for i, region in enumerate(("whole", "boundary")):
            ax = axes[i, j]
            ax.plot([0, 1], [0, 1], color="0.7", lw=1)
            for k, key in enumerate(temps):
                r = reliability[key][name][region]
                conf, acc = _nan(r["confidence"]), _nan(r["accuracy"])
                ok = np.isfinite(conf) & np.isfinite(acc)
                ece = r["ece"]
                label = f"{key}: ECE {ece:.3f}" if ece is not None and np.isfinite(ece) else f"{key}: n/a"
                ax.plot(conf[ok], acc[ok], styles[k % 2], ms=4, label=label)
            ax.set_xlim(0, 1)
            ax.set_ylim(0, 1)
            ax.set_title(f"{name}\n({'whole image' if region == 'whole' else 'boundary band'})", fontsize=9)
            ax.set_xlabel("predicted probability")
            if j == 0:
                ax.set_ylabel("observed frequency")
            ax.legend(fontsize=7, loc="upper left")
    fig.suptitle(f"Reliability — {context}", fontsize=11)
    return _save(fig, path)


def signature_pca(
    train: np.ndarray,
    train_context: Sequence[int],
    test: Sequence[np.ndarray],
    test_context: Sequence[int],
    ood: Sequence[np.ndarray],
    context_names: Sequence[str],
    path: Path,
) -> Path:
    """2D PCA (fitted on the training signatures) of training, test and OOD signatures."""
    from sklearn.decomposition import PCA

    train = np.asarray(train, dtype=np.float64)
    pca = PCA(n_components=2).fit(train if len(train) >= 2 else np.vstack([train, *test, *ood]))
    fig, ax = plt.subplots(figsize=(7, 5.5))
    cmap = plt.get_cmap("tab10")
    tr = pca.transform(train)
    train_context = np.asarray(train_context)
    for k, name in enumerate(context_names):
        m = train_context == k
        if m.any():
            ax.scatter(tr[m, 0], tr[m, 1], s=14, color=cmap(k % 10), alpha=0.5, label=f"{name} (train)")
    if len(test):
        te = pca.transform(np.stack(test))
        test_context = np.asarray(test_context)
        for k, name in enumerate(context_names):
            m = test_context == k
            if m.any():
                ax.scatter(
                    te[m, 0], te[m, 1], s=50, marker="^", color=cmap(k % 10), edgecolor="k", label=f"{name} (test)"
                )
    if len(ood):
        oo = pca.transform(np.stack(ood))
        ax.scatter(oo[:, 0], oo[:, 1], s=50, marker="X", color="k", label="OOD")
    ratio = pca.explained_variance_ratio_
    ax.set_xlabel(f"PC1 ({100 * ratio[0]:.0f} % of training variance)")
    ax.set_ylabel(f"PC2 ({100 * ratio[1]:.0f} %)" if len(ratio) > 1 else "PC2")
    ax.set_title("Spectral signatures (PCA)")
    ax.legend(fontsize=7, loc="best", ncol=2)
    return _save(fig, path)


def roc_curves(records: list[dict], detectors: Sequence[str], path: Path) -> Path:
    from sklearn.metrics import roc_auc_score, roc_curve

    fig, ax = plt.subplots(figsize=(6, 5.5))
    ax.plot([0, 1], [0, 1], color="0.8", lw=1)
    for name in detectors:
        pairs = [(r["ood"], r["scores"].get(name)) for r in records]
        pairs = [(y, s) for y, s in pairs if s is not None and np.isfinite(s)]
        y = np.array([p[0] for p in pairs], dtype=int)
        if len(set(y.tolist())) < 2:
            continue
        s = np.array([p[1] for p in pairs])
        fpr, tpr, _ = roc_curve(y, s)
        style = "-" if name.startswith("spectral") else "--"
        ax.plot(fpr, tpr, style, label=f"{name} (AUROC {roc_auc_score(y, s):.2f}, n={len(y)})")
    ax.axhline(0.95, color="0.6", lw=0.8, ls=":")
    ax.set_xlabel("false-positive rate (in-distribution flagged)")
    ax.set_ylabel("true-positive rate (OOD flagged)")
    ax.set_title("OOD detection")
    ax.legend(fontsize=7, loc="lower right")
    return _save(fig, path)


def ood_scores(records: list[dict], detector: str, threshold: float, path: Path) -> Path:
    """The detector's score per case, grouped by context / OOD, with the shipped threshold."""
    groups = []
    for r in records:
        if r["group"] not in groups:
            groups.append(r["group"])
    fig, ax = plt.subplots(figsize=(max(5, 1.3 * len(groups)), 4.5))
    rng = np.random.default_rng(0)
    for i, g in enumerate(groups):
        vals = [r["scores"][detector] for r in records if r["group"] == g]
        x = i + rng.uniform(-0.15, 0.15, len(vals))
        ax.scatter(x, vals, s=22, color="k" if g == "ood" else plt.get_cmap("tab10")(i % 10))
    ax.axhline(threshold, color="r", lw=1, ls="--", label=f"threshold {threshold:.3g}")
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(f"{detector} score")
    ax.legend(fontsize=8)
    return _save(fig, path)


def dice_boxplot(contexts: dict, path: Path) -> Path:
    """Dice per structure: the network's argmax over every structure, and predict's output."""
    labels, plain, restricted = [], [], []
    for ctx, c in contexts.items():
        for name, s in c["structures"].items():
            labels.append(f"{ctx}\n{name}")
            plain.append([v for v in s["dice"]["cases"].values() if v is not None])
            restricted.append([v for v in c["dice_restricted"][name]["cases"].values() if v is not None])
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(labels)), 4.8))
    pos = np.arange(len(labels))
    for data, offset, colour, name in (
        (plain, -0.18, "tab:blue", "network argmax, every structure"),
        (restricted, 0.18, "tab:orange", "mtseg predict's output (restricted, post-processed)"),
    ):
        keep = [i for i, d in enumerate(data) if d]
        if keep:
            bp = ax.boxplot(
                [data[i] for i in keep], positions=pos[keep] + offset, widths=0.3, patch_artist=True, showfliers=True
            )
            for box in bp["boxes"]:
                box.set_facecolor(colour)
                box.set_alpha(0.6)
        ax.plot([], [], color=colour, lw=6, alpha=0.6, label=name)
    ax.set_xticks(pos)
    ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_ylabel("Dice")
    ax.legend(fontsize=8)
    return _save(fig, path)


def size_control(records: list[dict], path: Path) -> Path:
    """Spectral score of each checked case: original, central crop and 2× padding."""
    cases = []
    for r in records:
        key = (r["context"], r["case"])
        if key not in cases:
            cases.append(key)
    variants = ["original", "crop_central_50pct", "pad_2x_min"]
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(cases)), 4.5))
    width = 0.25
    for k, v in enumerate(variants):
        vals = [
            next((r["score"] for r in records if (r["context"], r["case"]) == c and r["variant"] == v), np.nan)
            for c in cases
        ]
        ax.bar(np.arange(len(cases)) + (k - 1) * width, vals, width, label=v)
    threshold = records[0]["threshold"]
    ax.axhline(threshold, color="r", ls="--", lw=1, label="threshold")
    ax.set_xticks(range(len(cases)))
    ax.set_xticklabels([f"{c}\n{i}" for c, i in cases], rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("spectral OOD score")
    ax.set_title("Does image size alone move the score?")
    ax.legend(fontsize=8)
    return _save(fig, path)
