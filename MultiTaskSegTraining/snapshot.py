"""A PNG of one slice with the segmentation and the uncertainty map overlaid (matplotlib)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk


def _axial(image: sitk.Image) -> np.ndarray:
    """The volume in LPS-ish axial (z, y, x) order, whatever its direction matrix."""
    return sitk.GetArrayFromImage(sitk.DICOMOrient(image, "LPS"))


def write_overlay_png(
    image: sitk.Image,
    labels: sitk.Image,
    uncertainty: sitk.Image,
    colors: dict[int, list[int]],
    names: dict[int, str],
    path: Path,
    title: str = "",
) -> Path:
    """Axial slice through the largest segmented area: image | image + labels | image + uncertainty."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    img, lab, unc = _axial(image).astype(np.float32), _axial(labels), _axial(uncertainty)
    z = int(np.argmax((lab > 0).sum(axis=(1, 2)))) if lab.any() else img.shape[0] // 2
    lo, hi = np.percentile(img[z], [1, 99])
    sp = sitk.DICOMOrient(image, "LPS").GetSpacing()
    aspect = sp[1] / sp[0]
    n = max(colors) + 1 if colors else 1
    table = np.zeros((n, 4))
    for v, rgb in colors.items():
        table[v] = [*(np.array(rgb) / 255.0), 0.6]
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.4))
    for ax in axes:
        ax.imshow(img[z], cmap="gray", vmin=lo, vmax=hi, aspect=aspect)
        ax.axis("off")
    axes[0].set_title("image")
    axes[1].imshow(
        np.ma.masked_equal(lab[z], 0),
        cmap=ListedColormap(table),
        vmin=0,
        vmax=n - 1,
        interpolation="nearest",
        aspect=aspect,
    )
    present = [v for v in np.unique(lab[z]) if v > 0]
    axes[1].set_title("segmentation: " + ", ".join(names.get(int(v), str(v)) for v in present)[:60])
    shown = axes[2].imshow(unc[z], cmap="inferno", vmin=0, vmax=1, alpha=0.6, aspect=aspect)
    axes[2].set_title("uncertainty (normalised entropy)")
    fig.colorbar(shown, ax=axes[2], fraction=0.046)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
