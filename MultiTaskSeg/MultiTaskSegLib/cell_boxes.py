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
- Other cells, under a context restriction, read background and the allowed classes first: where
  none of the allowed ones reaches the largest smallest-corner value of those (and 1/C), the cell
  is background. The rest read every class and keep grid_mapping.py's candidates (the largest
  corner value reaches the largest smallest-corner value of any class, and 1/C), in slots of 2,
  up to 4 or more per cell; a two-candidate cell found so is interpolated by its difference too,
  so a cell's labels do not depend on which test caught it.
- A cell whose box has a single label gets it in the canonical label grid before the target is
  filled (one gather along the three axes), so only the boxes a boundary crosses are scattered.
"""

from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, Sequence

import numpy as np
import torch

from .resampling import AxisMap

MIXED = 255  # cell label where the corners disagree (at most 255 classes)
_CHUNK = 1 << 14  # cells per step: the (candidates × box × cells) temporaries stay in cache
_BUCKETS = ((2, 2), (3, 4), (5, 255))  # candidates per cell: slots of one interpolation
_SUM_MARGIN = 1e-4  # float rounding of a softmax's sum (~C × 6e-8) and of 1 − p_a − p_b, with room to spare
_Results = list[tuple[torch.Tensor, torch.Tensor]]  # (cell ids, their labels: (B0, B1, B2, G), (G,) or one)


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


def _by_difference(
    va: torch.Tensor, vb: torch.Tensor, w: Sequence[torch.Tensor], la: torch.Tensor, lb: torch.Tensor
) -> torch.Tensor:
    """Labels ``la`` where the interpolated p_a − p_b is ≥ 0, else ``lb`` (a < b): (B0, B1, B2, G)."""
    d = _interpolate((va - vb).view(1, 2, 2, 2, -1), w)[0]
    return torch.where(d >= 0, la, lb)


class _Cells:
    """The mixed cells some target voxel lies in, by id 0 … M - 1: their corners and boxes."""

    def __init__(self, cells: torch.Tensor, maps: Sequence[AxisMap], target: Sequence[int]):
        sizes = cells.shape
        source = [m.source_axis for m in maps]  # the source axis each target axis reads
        count, self.positions, self.weights = zip(*[_axis_boxes(m, sizes[s]) for m, s in zip(maps, source)])
        flat = torch.nonzero(cells.view(-1) == MIXED).flatten()
        coords = (flat // (sizes[1] * sizes[2]), flat // sizes[2] % sizes[1], flat % sizes[2])
        at = [coords[s] for s in source]  # each cell's source index along each target axis
        read = (count[0][at[0]] > 0) & (count[1][at[1]] > 0) & (count[2][at[2]] > 0)
        if not bool(read.all()):  # cells no target voxel lies in (thick-slice or cropped targets)
            keep = torch.nonzero(read).flatten()
            flat, at = flat[keep], [a[keep] for a in at]
        self.flat, self.at = flat, at
        stride = (sizes[1] * sizes[2], sizes[2], 1)
        # corner offset per target axis: the source stride, or 0 at the far edge (the last voxel repeats)
        self.step = [torch.where(a < sizes[s] - 1, stride[s], 0) for a, s in zip(at, source)]
        self.scale = (target[1] * target[2], target[2], 1)

    def __len__(self) -> int:
        return len(self.flat)

    def corners(self, ids: torch.Tensor) -> torch.Tensor:
        """(8, G) flat canonical indices of the corners, (dz, dy, dx) in target axis order."""
        s = [torch.stack([torch.zeros_like(x), x]) for x in (step[ids] for step in self.step)]
        c = self.flat[ids] + s[0].view(2, 1, 1, -1) + s[1].view(1, 2, 1, -1)
        return (c + s[2].view(1, 1, 2, -1)).view(8, -1)

    def box_weights(self, ids: torch.Tensor) -> list[torch.Tensor]:
        return [w[:, a[ids]] for w, a in zip(self.weights, self.at)]

    def box_index(self, ids: torch.Tensor) -> torch.Tensor:
        """(B0, B1, B2, G) flat target indices of the boxes."""
        p = [pos[:, a[ids]] * k for pos, a, k in zip(self.positions, self.at, self.scale)]
        return p[0][:, None, None] + p[1][None, :, None] + p[2][None, None, :]


def _chunks(ids: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.split(ids, _CHUNK))


def _take(probs: torch.Tensor, classes: Sequence[int], corners: torch.Tensor) -> torch.Tensor:
    """(K, 8, G) corner values of ``classes``."""
    out = torch.empty((len(classes), *corners.shape), dtype=torch.float32)
    for i, k in enumerate(classes):
        torch.take(probs[k], corners, out=out[i])
    return out


def _pairs(
    probs: torch.Tensor, argmax: torch.Tensor, cells: _Cells, ids: torch.Tensor, lut: torch.Tensor, results: _Results
) -> torch.Tensor:
    """Resolve the cells ``ids`` whose only candidates are their corners' two winners (into ``results``);
    returns the others."""
    corners = cells.corners(ids)
    classes = torch.take(argmax, corners)
    a, b = classes.amin(0).long(), classes.amax(0).long()  # a < b: the corners disagree
    flat = probs.view(-1)
    va, vb = torch.take(flat, a * argmax.numel() + corners), torch.take(flat, b * argmax.numel() + corners)
    others = (1.0 - va - vb).amax(0) + _SUM_MARGIN  # no third class reaches this at a corner
    two = others < torch.maximum(va.amin(0), vb.amin(0))
    la, lb = lut[a], lut[b]
    same = two & (la == lb)  # both restricted to background, say
    results.append((ids[same], la[same]))
    pair = torch.nonzero(two & (la != lb)).flatten()
    if len(pair):
        w = [x[:, pair] for x in cells.box_weights(ids)]
        results.append((ids[pair], _by_difference(va[:, pair], vb[:, pair], w, la[pair], lb[pair])))
    return ids[~two]


def _hopeful(
    probs: torch.Tensor, cells: _Cells, ids: torch.Tensor, allowed: list[int], results: _Results
) -> torch.Tensor:
    """Cells ``ids`` where no allowed class can win become background (into ``results``); returns the others."""
    n = probs.shape[0]
    values = _take(probs, [0, *allowed], cells.corners(ids))
    floor = values.amin(1).amax(0).clamp(min=(1.0 - 1e-3) / n)  # below the winner's (the margin: rounding)
    hopeful = (values[1:].amax(1) >= floor).any(0)
    results.append((ids[~hopeful], torch.zeros((), dtype=torch.uint8)))
    return ids[hopeful]


def _all_classes(probs: torch.Tensor, cells: _Cells, ids: torch.Tensor, lut: torch.Tensor, results: _Results) -> None:
    """Resolve the cells ``ids`` reading every class (into ``results``)."""
    n = probs.shape[0]
    values = _take(probs, range(n), cells.corners(ids))
    floor = values.amin(1).amax(0).clamp(min=(1.0 - 1e-3) / n)  # the winner reaches both (the margin: rounding)
    candidate = values.amax(1) >= floor  # (C, G): at least the classes winning at a corner
    count = candidate.sum(0)
    weights = cells.box_weights(ids)
    for low, high in _BUCKETS:
        part = torch.nonzero((count >= low) & (count <= high)).flatten()
        if not len(part):
            continue
        c = candidate[:, part]
        m = min(high, int(count[part].max()))
        rank = torch.where(c, c.cumsum(0) - 1, m)  # each candidate's slot, by class; the others to a spare row
        classes = torch.full((m + 1, len(part)), n).scatter_(0, rank, torch.arange(n)[:, None].expand_as(rank))[:m]
        valid = classes < n
        classes %= n
        g = values.shape[-1]
        v = torch.take(values, (classes[:, None] * 8 + torch.arange(8)[:, None]) * g + part)  # (m, 8, G')
        w = [x[:, part] for x in weights]
        names = lut[classes]
        if m == 2:  # both slots used (every cell has two candidates at least)
            results.append((ids[part], _by_difference(v[0], v[1], w, names[0], names[1])))
        else:
            v = torch.where(valid[:, None], v, -1.0)  # an unused slot never wins
            slot = _interpolate(v.view(m, 2, 2, 2, -1), w).max(0).indices  # the first maximum: the lowest class
            results.append((ids[part], names.gather(0, slot.view(-1, len(part))).view(slot.shape)))


def _gather_along_axes(padded: torch.Tensor, maps: Sequence[AxisMap], out: torch.Tensor) -> None:
    """out = each target voxel's cell label from ``padded`` (border 0: outside the grid), one axis at a
    time: the last axis first while the array is small, the first axis last (whole planes copied)."""
    x = padded.permute(*[m.source_axis for m in maps])
    index = [torch.where(m.inside, m.low + 1, 0) for m in maps]
    x = x[:, :, index[2]]
    x = x[:, index[1]]
    for r, i in enumerate(index[0].tolist()):
        out[r] = x[i]


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """torch's intra-op threads off: the steps below are many small operations, and each parallel one
    waits for every thread; on a loaded 2-core machine (load 5) the CT phantom's cells took 41 s of CPU
    with 2 threads against 1.6 s with 1."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def labels_on_axis_grid(
    probs: torch.Tensor,
    argmax: torch.Tensor,
    cells: torch.Tensor,
    maps: Sequence[AxisMap],
    lut: torch.Tensor,
    allowed: Sequence[int] | None,
) -> np.ndarray:
    """The target's uint8 labels: each voxel its cell's label from ``cells`` (d, h, w, through ``lut``
    already), the voxels of cells labelled ``MIXED`` the argmax of the resampled ``probs`` (C, d, h, w)
    through ``lut`` (the restriction to ``allowed``). ``argmax``: the canonical argmax (d, h, w).
    ``cells`` is changed in place."""
    workers = torch.get_num_threads()  # the caller's CPU budget: chunks in as many Python threads instead
    with _one_thread():
        return _labels(probs.contiguous(), argmax, cells, maps, lut, allowed, workers)  # contiguous: flat indices


def _labels(
    probs: torch.Tensor,
    argmax: torch.Tensor,
    cells: torch.Tensor,
    maps: Sequence[AxisMap],
    lut: torch.Tensor,
    allowed: Sequence[int] | None,
    workers: int,
) -> np.ndarray:
    result = np.empty([len(m.low) for m in maps], np.uint8)
    out = torch.from_numpy(result)
    mixed = _Cells(cells, maps, out.shape)
    results: _Results = []  # list.append is atomic: the workers share it
    # chunks on the caller's cores, each in one Python thread with single-threaded ops (torch releases the
    # GIL): the CT phantom's cells 1.49 → 1.03 s wall on 2 cores, the same CPU time
    with ThreadPoolExecutor(max(workers, 1)) as pool:
        all_cells = _chunks(torch.arange(len(mixed)))
        rest = list(pool.map(lambda ids: _pairs(probs, argmax, mixed, ids, lut, results), all_cells))
        if allowed is not None:
            wanted = [c for c in allowed if 0 < c < probs.shape[0]]
            rest = list(pool.map(lambda ids: _hopeful(probs, mixed, ids, wanted, results), _chunks(torch.cat(rest))))
        list(pool.map(lambda ids: _all_classes(probs, mixed, ids, lut, results), _chunks(torch.cat(rest))))
    pending = []
    for ids, labels in results:  # a box with one label: the cell gets it, the gather below writes it
        if labels.dim() <= 1 or not len(ids):
            cells.view(-1)[mixed.flat[ids]] = labels
            continue
        low, high = labels.view(-1, len(ids)).aminmax(dim=0)
        uniform = low == high
        cells.view(-1)[mixed.flat[ids[uniform]]] = low[uniform]
        crossed = torch.nonzero(~uniform).flatten()
        pending.append((ids[crossed], labels[..., crossed]))
    _gather_along_axes(torch.nn.functional.pad(cells[None], (1, 1, 1, 1, 1, 1))[0], maps, out)
    for ids, labels in pending:  # the boxes a boundary crosses
        out.view(-1)[mixed.box_index(ids).view(-1)] = labels.reshape(-1)
    return result
