"""Labels on the input grid: the argmax of the linearly resampled probabilities, computed where it can change.

A linearly interpolated point is a weighted sum, with non-negative weights, of the 8 canonical
voxels around it (its cell). Three facts keep the labels exact while most of the work is skipped:

- where the 8 corners have the same argmax c, z[c] ≥ z[k] holds at each of them and so at the
  point: the label is c (ties too: c is already the lowest maximum). Each input voxel reads its
  cell's label (one gather); only voxels in cells whose corners disagree (a structure's
  boundary) are interpolated;
- in such a cell, class k can win only if its largest corner value reaches the largest
  smallest-corner value of any class (the winner's interpolated value is at least that), and
  only if it reaches 1/C somewhere (interpolated probabilities sum to 1): the others are skipped;
- with a context restriction (``allowed``), a cell where no allowed structure can win is
  background whatever wins there.

Axis-aligned grids (every scanner volume) resolve the mixed cells one box of target voxels at a
time, separably (cell_boxes.py); oblique grids, here, voxel by voxel: each voxel's cell index from
the affine index map, its 8 corner weights, and a table of its cell's candidates. The 512×512×300
CT phantom, CPU time at 1 thread on a loaded machine (benchmarks/label_mapping_ab.py): 4.9 s voxel
by voxel, 1.6 s by boxes.

The result equals resampling every class everywhere and taking the argmax (SimpleITK's rule,
see resampling.py; lowest class on ties), then restricting, up to float rounding at near-ties.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import SimpleITK as sitk
import torch

from .cell_boxes import MIXED, labels_on_axis_grid
from .resampling import axis_maps, target_to_source
from .uncertainty import class_argmax

_MIXED = MIXED  # cell label where the corners disagree (at most 255 classes)
_SLAB_VOXELS = 1 << 24  # target voxels per slab: few of them (every op is a barrier for torch's threads)


def _agreement(argmax: torch.Tensor) -> torch.Tensor:
    """Per cell (low corner index, the last index repeated at the far edge): the label its 8
    corners agree on, else _MIXED."""
    cell = argmax
    for axis in range(3):
        n = cell.shape[axis]
        nxt = torch.cat([cell.narrow(axis, 1, n - 1), cell.narrow(axis, n - 1, 1)], axis)
        cell = torch.where(cell == nxt, cell, _MIXED)
    return cell


def _corners(cells: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """(n, 8) flat canonical indices of the corners of the cells ``cells`` (flat low-corner indices),
    in (dz, dy, dx) order, clamped at the far edges."""
    d, h, w = sizes
    z, y, x = cells // (h * w), cells // w % h, cells % w
    zs = torch.stack([z, (z + 1).clamp_(max=d - 1)], 1) * (h * w)
    ys = torch.stack([y, (y + 1).clamp_(max=h - 1)], 1) * w
    xs = torch.stack([x, (x + 1).clamp_(max=w - 1)], 1)
    return (zs[:, :, None, None] + ys[:, None, :, None] + xs[:, None, None, :]).reshape(-1, 8)


def _axis(c: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ITK's linear rule along one source axis of size n: the padded cell index (low + 1, or 0
    outside [-0.5, n - 0.5)) and the weight of the upper neighbour."""
    inside = (c >= -0.5) & (c < n - 0.5)
    low = c.floor().clamp_(0, n - 1)
    weight = (c - low).clamp_(0.0, 1.0)
    return torch.where(inside, low.long() + 1, 0), weight


def _gather(cells: torch.Tensor, index: Sequence[torch.Tensor], out: torch.Tensor) -> None:
    """out[p] = cells[index[0][p], index[1][p], index[2][p]] (indices broadcastable to ``out``)."""
    dims = [[d for d in range(3) if i.shape[d] > 1] for i in index]
    if sorted(len(d) for d in dims) == [1, 1, 1] and sorted(d[0] for d in dims) == [0, 1, 2]:
        # axis-aligned: one uint8 index_select per axis instead of a full-size int64 index
        x = cells.permute(*sorted(range(3), key=lambda a: dims[a][0])).contiguous()
        for d in range(3):
            a = next(a for a in range(3) if dims[a][0] == d)
            x = x[(slice(None),) * d + (index[a].reshape(-1),)]  # index_select is erratic on CPU
        out.copy_(x)
        return
    stride = (cells.shape[1] * cells.shape[2], cells.shape[2])
    flat = (index[0] * stride[0] + index[1] * stride[1] + index[2]).expand(out.shape)
    torch.take(cells, flat, out=out)


def _pick(t: torch.Tensor, at: Sequence[torch.Tensor]) -> torch.Tensor:
    """``t`` (broadcastable to the slab) at the slab positions ``at`` (z, y, x)."""
    return t[tuple(i if t.shape[d] > 1 else 0 for d, i in enumerate(at))].expand(len(at[0]))


_BUCKETS = (2, 4)  # slots per cell table: most boundary cells have 2 candidate classes, nearly all ≤ 4


class _MixedCells:
    """The cells whose label needs interpolation, as tables of their candidates' corner values.

    Cells go into buckets by their number of candidate classes (2, up to 4, more: one slot per
    class); within a cell the slots go by ascending class, unused ones hold -1 (never the
    maximum), so the first maximum is the lowest class, as ``argmax``.
    """

    def __init__(self, probs: torch.Tensor, padded: Sequence[int], hit: torch.Tensor, allowed: Sequence[int] | None):
        """``hit``: the mixed cells some target voxel reads, as flat indices into the ``padded`` shape."""
        n, sizes = probs.shape[0], probs.shape[1:]
        z, y, x = hit // (padded[1] * padded[2]) - 1, hit // padded[2] % padded[1] - 1, hit % padded[2] - 1
        corners = _corners((z * sizes[1] + y) * sizes[2] + x, sizes)
        values = probs.reshape(n, -1)[:, corners.view(-1)].view(n, -1, 8)  # (C, cells, 8)
        floor = values.amin(2).amax(0)  # the winner anywhere in the cell reaches this
        candidate = (values.amax(2) >= floor).T  # (cells, C)
        keep = torch.arange(len(hit))
        if allowed is not None:  # cells where no allowed structure can win are background (no slot)
            keep = torch.nonzero(candidate[:, [c for c in allowed if 0 < c < n]].any(1)).flatten()
            candidate = candidate[keep]
        bounds = [b for b in _BUCKETS if b < n] + [n]
        bucket = torch.bucketize(candidate.sum(1), torch.tensor(bounds))  # index of the first bound ≥ count
        order = torch.argsort(bucket, stable=True)
        k = torch.arange(n)
        ranked = torch.where(candidate, k, n + k).sort(1).values % n  # candidates first, by class
        self.tables: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # (first slot, values, classes)
        start = 0
        for b, m in enumerate(bounds):
            part = order[start : start + int((bucket == b).sum())]
            idx = ranked[part, :m]
            table = values[idx, keep[part][:, None]]  # (cells, m, 8)
            table = torch.where(candidate[part].gather(1, idx)[:, :, None], table, -1.0)
            self.tables.append((start, table, idx.to(torch.uint8)))
            start += len(part)
        self.slot = torch.full((int(np.prod(padded)),), -1, dtype=torch.int64)
        self.slot[hit[keep[order]]] = torch.arange(len(keep))

    def argmax(self, slots: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Winning class (lowest on ties) at points of the cells ``slots`` (all with a slot) with
        corner weights (n, 8)."""
        label = torch.empty(len(slots), dtype=torch.uint8)
        for i, (start, table, classes) in enumerate(self.tables):
            if not len(table):
                continue
            stop = self.tables[i + 1][0] if i + 1 < len(self.tables) else None
            inside = slots >= start if stop is None else (slots >= start) & (slots < stop)
            at = torch.nonzero(inside).flatten()
            s = slots[at] - start
            value = (table[s] * weights[at, None, :]).sum(2)  # (n, m): interpolated candidate probabilities
            label[at] = classes[s, value.max(1).indices]  # the first maximum: the lowest class
        return label


def _prune(probs: torch.Tensor, cells: torch.Tensor, allowed: Sequence[int] | None) -> int:
    """Mixed cells where no allowed structure can win become background (in place): an allowed class
    wins only where it reaches background and 1/C (interpolated probabilities sum to 1). Returns the
    number of mixed cells left."""
    flat = torch.nonzero(cells.view(-1) == _MIXED).flatten()
    n = probs.shape[0]
    if allowed is None or not len(flat):
        return len(flat)
    classes = [c for c in allowed if 0 < c < n]
    corners = _corners(flat, cells.shape).view(-1)
    values = probs.reshape(n, -1)[[0, *classes]][:, corners].view(len(classes) + 1, -1, 8)
    bound = values[0].amin(1).clamp(min=(1.0 - 1e-3) / n)  # the margin covers float rounding of the sum
    can_win = (values[1:].amax(2) >= bound).any(0)
    cells.view(-1)[flat[~can_win]] = 0
    return int(can_win.sum())


def labels_on_target(
    probs: torch.Tensor, grid: sitk.Image, target: sitk.Image, allowed: Sequence[int] | None = None
) -> np.ndarray:
    """uint8 argmax over the classes of ``probs`` (C, d, h, w) on ``grid``, resampled onto ``target``;
    with ``allowed``, labels outside it (and background) become background, as ``restrict_labels``."""
    n = probs.shape[0]
    assert n < _MIXED
    keep = torch.ones(256, dtype=torch.bool)
    if allowed is not None:
        keep[:n] = False
        keep[[0, *allowed]] = True
    lut = torch.where(keep, torch.arange(256), 0).to(torch.uint8)
    sizes = probs.shape[1:]
    argmax = torch.from_numpy(class_argmax(probs))
    cells = lut[_agreement(argmax).long()]
    maps = axis_maps(grid, target)
    if maps is not None:  # every scanner volume: cell by cell, separably (cell_boxes.py)
        return labels_on_axis_grid(probs, argmax, cells, maps, lut, allowed)
    _prune(probs, cells, allowed)
    padded = torch.nn.functional.pad(cells[None], (1, 1, 1, 1, 1, 1))[0]  # border 0: outside the grid
    stride = (padded.shape[1] * padded.shape[2], padded.shape[2])
    shape = target.GetSize()[::-1]
    labels = np.empty(shape, np.uint8)
    out = torch.from_numpy(labels)
    step = max(1, _SLAB_VOXELS // (shape[1] * shape[2]))

    def slab(r: int) -> tuple[int, list]:
        rows = min(step, shape[0] - r)
        return rows, [_axis(c, m) for c, m in zip(target_to_source(grid, target, r, rows), sizes)]

    def decode(at_mixed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return at_mixed // (shape[1] * shape[2]), at_mixed // shape[2] % shape[1], at_mixed % shape[2]

    # pass 1: every voxel reads its cell's label; the mixed cells actually read are noted
    pending = []
    hit = torch.zeros(padded.numel(), dtype=torch.bool)
    for r in range(0, shape[0], step):
        rows, axes = slab(r)
        part = out[r : r + rows]
        _gather(padded, [a[0] for a in axes], part)
        at_mixed = torch.nonzero(part.view(-1) == _MIXED).flatten()
        if len(at_mixed):
            at = decode(at_mixed)
            cell = _pick(axes[0][0], at) * stride[0] + _pick(axes[1][0], at) * stride[1] + _pick(axes[2][0], at)
            hit[cell] = True
            pending.append((r, at_mixed, cell))
    if not pending:
        return labels
    # pass 2: interpolate there, over the candidates of each cell
    mixed = _MixedCells(probs, padded.shape, torch.nonzero(hit).flatten(), allowed)
    for r, at_mixed, cell in pending:
        rows, axes = slab(r)
        part = out[r : r + rows].view(-1)
        slots = mixed.slot[cell]
        part[at_mixed] = 0  # cells without a slot: no allowed structure can win there
        at_mixed, slots = at_mixed[slots >= 0], slots[slots >= 0]
        at = decode(at_mixed)  # once: the comprehension below used to decode per axis
        w = [_pick(a[1], at).float() for a in axes]
        pairs = [torch.stack([1.0 - x, x], 1) for x in w]
        weights = (pairs[0][:, :, None, None] * pairs[1][:, None, :, None] * pairs[2][:, None, None, :]).view(-1, 8)
        part[at_mixed] = lut[mixed.argmax(slots, weights).long()]
    return labels
