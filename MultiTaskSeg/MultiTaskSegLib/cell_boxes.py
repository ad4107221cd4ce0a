"""Labels on an axis-aligned target grid: the mixed cells resolved one small box of target voxels at a time.

On a grid whose axes are parallel to the canonical grid's (every scanner volume), the target voxels
whose interpolation reads one canonical cell form a box: along each target axis, the positions whose
lower source index is the cell's (2–3 per axis for a 0.7 mm input on the 2 mm grid). Trilinear
interpolation separates along the axes, so the candidates of many cells are interpolated at once as
small dense tensors, three ``lerp`` steps from the 8 corners; the cells run along the last
(contiguous) dimension of every temporary, so each step is one long vectorised loop however small
the boxes are. Nothing is done per voxel outside the mixed cells and no voxel position is decoded.

- Two candidates (most cells): a class k other than the corners' winners a < b stays below
  1 − p_a − p_b at every corner (the probabilities sum to 1); where that bound is below the larger
  of min p_a and min p_b, the winner anywhere in the cell is a or b, read from 16 corner values
  instead of all C × 8. Only the difference p_a − p_b is interpolated: a wins where it is ≥ 0, so
  exact ties keep the lower class, as ``argmax``, and near a tie the difference of two close
  float32 values is itself exact.
- Other cells read every class and keep grid_mapping.py's candidates (the largest corner value
  reaches the largest smallest-corner value of any class, and 1/C); a two-candidate cell found so
  is interpolated by its difference too, so a cell's labels do not depend on which test caught it.
- A cell whose box has a single label gets it in the canonical label grid before the target is
  filled (one gather along the three axes), so only the boxes a boundary crosses are scattered.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .resampling import AxisMap

MIXED = 255  # cell label where the corners disagree (at most 255 classes)
_CHUNK = 1 << 14  # cells per step: the (candidates × box × cells) temporaries stay in cache
_BUCKETS = ((2, 2), (3, 4), (5, 255))  # candidates per cell: slots of one interpolation
_SUM_MARGIN = 1e-4  # float rounding of a softmax's sum (~C × 6e-8) and of 1 − p_a − p_b, with room to spare


def _axis_boxes(m: AxisMap, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per source index 0 … n - 1 along the map's source axis: (count, positions, weights), the target
    positions inside the source grid whose lower neighbour it is, as (B, n) tables (B the largest
    count); unused slots repeat the first position and weight: a duplicate write of the same label."""
    t = torch.nonzero(m.inside).flatten()
    low = m.low[t]
    count = torch.bincount(low, minlength=n)
    order = torch.argsort(low, stable=True)
    t, low = t[order], low[order]
    rank = torch.arange(len(t)) - (torch.cumsum(count, 0) - count)[low]
    width = max(int(count.max()) if len(t) else 1, 1)
    positions = torch.zeros((width, n), dtype=torch.int64)
    weights = torch.zeros((width, n), dtype=torch.float32)
    positions[rank, low] = t
    weights[rank, low] = m.weight[t]
    unused = torch.arange(width)[:, None] >= count
    return count, torch.where(unused, positions[:1], positions), torch.where(unused, weights[:1], weights)


def _interpolate(v: torch.Tensor, w: Sequence[torch.Tensor]) -> torch.Tensor:
    """(K, 2, 2, 2, G) corner values (target axis order, G cells) at the box positions with upper
    weights w[a] (B_a, G): (K, B0, B1, B2, G), one 1-D step per axis."""
    g = v.shape[-1]
    v = torch.lerp(v[:, :, :, :1], v[:, :, :, 1:], w[2].view(-1, g))
    v = torch.lerp(v[:, :, :1], v[:, :, 1:], w[1].view(-1, 1, g))
    return torch.lerp(v[:, :1], v[:, 1:], w[0].view(-1, 1, 1, g))


def _by_difference(va: torch.Tensor, vb: torch.Tensor, w: Sequence[torch.Tensor], la, lb) -> torch.Tensor:
    """Labels ``la`` where the interpolated p_a − p_b is ≥ 0, else ``lb`` (a < b): (B0, B1, B2, G)."""
    d = _interpolate((va - vb).view(1, 2, 2, 2, -1), w)[0]
    return torch.where(d >= 0, la, lb)


def _take(probs: torch.Tensor, classes: Sequence[int], corners: torch.Tensor, out: torch.Tensor) -> None:
    for i, k in enumerate(classes):
        torch.take(probs[k], corners, out=out[i])


def _all_classes(probs: torch.Tensor, corners: torch.Tensor, w: Sequence[torch.Tensor], lut: torch.Tensor):
    """Labels (B0, B1, B2, G) of cells with corners ``corners`` (8, G), every class read."""
    n = probs.shape[0]
    out = torch.empty((*[len(x) for x in w], corners.shape[1]), dtype=torch.uint8)
    first = [0] + [k for k in range(1, n) if lut[k]]  # background and the allowed classes
    values = torch.empty((n, *corners.shape), dtype=torch.float32)
    _take(probs, first, corners, values)
    if len(first) < n:  # a context restriction: cells where no allowed class can win are background
        floor = values[: len(first)].amin(1).amax(0).clamp(min=(1.0 - 1e-3) / n)  # below the true floor
        hopeful = (values[1 : len(first)].amax(1) >= floor).any(0)
        out[..., ~hopeful] = 0
        keep = torch.nonzero(hopeful).flatten()
        if len(keep) < len(hopeful):
            corners, w, values = corners[:, keep], [x[:, keep] for x in w], values[:, :, keep]
        others = [k for k in range(n) if k not in first]
        _take(probs, others, corners, values[len(first) :])
        order = torch.tensor(first + others).argsort()
        values = values[order]  # by class again
    else:
        keep = None
    floor = values.amin(1).amax(0).clamp(min=(1.0 - 1e-3) / n)  # the winner reaches both (the margin: rounding)
    candidate = values.amax(1) >= floor  # (C, G): at least the classes winning at a corner
    count = candidate.sum(0)
    labels = torch.empty((*[len(x) for x in w], corners.shape[1]), dtype=torch.uint8)
    for low, high in _BUCKETS:
        cells = torch.nonzero((count >= low) & (count <= high)).flatten()
        if not len(cells):
            continue
        c = candidate[:, cells]
        m = min(high, int(count[cells].max()))
        rank = torch.where(c, c.cumsum(0) - 1, m)  # each candidate's slot, by class; the others to a spare row
        classes = torch.full((m + 1, len(cells)), n).scatter_(0, rank, torch.arange(n)[:, None].expand_as(rank))[:m]
        valid = classes < n
        v = values[:, :, cells].gather(0, (classes % n)[:, None].expand(m, 8, -1))
        wk = [x[:, cells] for x in w]
        names = lut[classes % n]
        if m == 2:  # both slots used (two candidates at least)
            labels[..., cells] = _by_difference(v[0], v[1], wk, names[0], names[1])
        else:
            v = torch.where(valid[:, None], v, -1.0)  # an unused slot never wins
            slot = _interpolate(v.view(m, 2, 2, 2, -1), wk).max(0).indices  # the first maximum: the lowest class
            labels[..., cells] = names.gather(0, slot.view(-1, len(cells))).view(slot.shape)
    if keep is None:
        return labels
    out[..., keep] = labels
    return out


def _resolve(probs, argmax, corners: torch.Tensor, w: Sequence[torch.Tensor], lut: torch.Tensor) -> torch.Tensor:
    """Labels (B0, B1, B2, G) at the box positions of cells with corners ``corners`` (8, G)."""
    classes = torch.take(argmax, corners)
    a, b = classes.amin(0).long(), classes.amax(0).long()  # a < b: the corners disagree
    flat = probs.view(-1)
    va, vb = torch.take(flat, a * argmax.numel() + corners), torch.take(flat, b * argmax.numel() + corners)
    others = (1.0 - va - vb).amax(0) + _SUM_MARGIN  # no third class reaches this at a corner
    two = others < torch.maximum(va.amin(0), vb.amin(0))
    out = torch.empty((*[len(x) for x in w], corners.shape[1]), dtype=torch.uint8)
    la, lb = lut[a], lut[b]
    same = torch.nonzero(two & (la == lb)).flatten()  # both restricted to background, say
    out[..., same] = la[same]
    pair = torch.nonzero(two & (la != lb)).flatten()
    if len(pair):
        out[..., pair] = _by_difference(va[:, pair], vb[:, pair], [x[:, pair] for x in w], la[pair], lb[pair])
    rest = torch.nonzero(~two).flatten()
    if len(rest):
        out[..., rest] = _all_classes(probs, corners[:, rest], [x[:, rest] for x in w], lut)
    return out


def _gather_along_axes(padded: torch.Tensor, maps: Sequence[AxisMap], out: torch.Tensor) -> None:
    """out = each target voxel's cell label from ``padded`` (border 0: outside the grid), one axis at a
    time: the last axis first while the array is small, the first axis last (whole planes copied)."""
    x = padded.permute(*[m.source_axis for m in maps])
    index = [torch.where(m.inside, m.low + 1, 0) for m in maps]
    x = x[:, :, index[2]]
    x = x[:, index[1]]
    for r, i in enumerate(index[0].tolist()):
        out[r] = x[i]


def labels_on_axis_grid(
    probs: torch.Tensor, argmax: torch.Tensor, cells: torch.Tensor, maps: Sequence[AxisMap], lut: torch.Tensor
) -> np.ndarray:
    """The target's uint8 labels: each voxel its cell's label from ``cells`` (d, h, w, through ``lut``
    already), the voxels of cells labelled ``MIXED`` the argmax of the resampled ``probs`` (C, d, h, w)
    through ``lut``. ``argmax``: the canonical argmax (d, h, w). ``cells`` is changed in place."""
    sizes = probs.shape[1:]
    source = [m.source_axis for m in maps]  # the source axis each target axis reads
    boxes = [_axis_boxes(m, sizes[s]) for m, s in zip(maps, source)]
    flat = torch.nonzero(cells.view(-1) == MIXED).flatten()
    coords = (flat // (sizes[1] * sizes[2]), flat // sizes[2] % sizes[1], flat % sizes[2])
    at = [coords[s] for s in source]  # each cell's source index along each target axis
    read = (boxes[0][0][at[0]] > 0) & (boxes[1][0][at[1]] > 0) & (boxes[2][0][at[2]] > 0)
    if not bool(read.all()):  # cells no target voxel lies in (thick-slice or cropped targets)
        keep = torch.nonzero(read).flatten()
        flat, at = flat[keep], [a[keep] for a in at]
    stride = (sizes[1] * sizes[2], sizes[2], 1)
    pending = []
    for s in range(0, len(flat), _CHUNK):
        c = [a[s : s + _CHUNK] for a in at]
        # corner offsets per target axis: the source stride, or 0 at the far edge (the last voxel repeats)
        step = [torch.where(c[a] < sizes[source[a]] - 1, stride[source[a]], 0) for a in range(3)]
        corners = flat[s : s + _CHUNK] + torch.stack([step[0] * 0, step[0]]).view(2, 1, 1, -1)
        corners = corners + torch.stack([step[1] * 0, step[1]]).view(1, 2, 1, -1)
        corners = (corners + torch.stack([step[2] * 0, step[2]]).view(1, 1, 2, -1)).view(8, -1)
        labels = _resolve(probs, argmax, corners, [boxes[a][2][:, c[a]] for a in range(3)], lut)
        low, high = labels.view(-1, labels.shape[-1]).aminmax(dim=0)
        uniform = low == high  # one label in the whole box: the gather below writes it
        cells.view(-1)[flat[s : s + _CHUNK][uniform]] = low[uniform]
        crossed = torch.nonzero(~uniform).flatten()
        pending.append(([x[crossed] for x in c], labels[..., crossed]))
    result = np.empty([len(m.low) for m in maps], np.uint8)
    out = torch.from_numpy(result)
    _gather_along_axes(torch.nn.functional.pad(cells[None], (1, 1, 1, 1, 1, 1))[0], maps, out)
    scale = (out.shape[1] * out.shape[2], out.shape[2], 1)
    for c, labels in pending:  # the boxes a boundary crosses
        p = [boxes[a][1][:, c[a]] * scale[a] for a in range(3)]
        index = p[0][:, None, None] + p[1][None, :, None] + p[2][None, None, :]
        out.view(-1)[index.view(-1)] = labels.reshape(-1)
    return result
