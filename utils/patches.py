"""Patch grid, patch extraction, global-feature crops and merging, as pure tensor functions.

Sizes are (H, W). A patch is addressed by its pixel origin (top, left); feature maps are
addressed through the fractions top/H, left/W and the ratio patch/H, patch/W, rounded half
to even exactly as the authors did, so crops land on the same cells as theirs.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from utils.images import class_dtype
from utils.layout import memory_format_of
from utils.resample import nearest_indices, resize

MIN_OVERLAP = 50  # pixels shared by neighbouring patches, the authors' constant
# Merged patch logits are summed in float64, as the authors summed them into a NumPy canvas:
# the terms (fp32, or bf16/fp16 under autocast) are exact in float64, so sums taken in their
# order are the authors' to the bit, and so are the argmax's tie-breaks.
SUM_DTYPE = torch.float64


def axis_origins(length: int, patch: int) -> tuple[tuple[int, ...], int]:
    """Patch origins along one axis and the patch extent actually used on it.

    Start from the fewest patches that cover the axis, add patches until neighbours
    overlap by at least MIN_OVERLAP px, spread them evenly (origins rounded half to even)
    and put the last one flush with the end.

    Where the authors' formula is undefined we choose:
      * length <= patch: one patch that shrinks to the whole axis (they divide by zero);
      * patch <= MIN_OVERLAP: a ValueError (they loop forever).
    """
    if length < 1:
        raise ValueError(f"image side must be positive, got {length}")
    if patch <= MIN_OVERLAP:
        raise ValueError(
            f"patch size {patch} px is too small: patches must be larger than the "
            f"{MIN_OVERLAP} px they overlap by (use size_p > {MIN_OVERLAP})"
        )
    if length <= patch:
        return (0,), length
    n = math.ceil(length / patch)
    while patch - (length - patch) / (n - 1) < MIN_OVERLAP:
        n += 1
    step = (length - patch) / (n - 1)
    return tuple(round(i * step) for i in range(n - 1)) + (length - patch,), patch


def chunks(n: int, size: int) -> list[range]:
    """range(n) cut into consecutive ranges of at most `size` items."""
    if size < 1:
        raise ValueError(f"sub-batch size must be at least 1, got {size}")
    return [range(i, min(i + size, n)) for i in range(0, n, size)]


@dataclass(frozen=True)
class PatchGrid:
    """Row-major grid of patches over one image: patch index = row * n_cols + col."""

    image_size: tuple[int, int]
    patch_size: tuple[int, int]
    tops: tuple[int, ...]
    lefts: tuple[int, ...]

    @classmethod
    def build(cls, image_size: Sequence[int], patch_size: Sequence[int]) -> PatchGrid:
        (tops, ph), (lefts, pw) = (axis_origins(int(s), int(p)) for s, p in zip(image_size, patch_size))
        return cls((int(image_size[0]), int(image_size[1])), (ph, pw), tops, lefts)

    @property
    def n_rows(self) -> int:
        return len(self.tops)

    @property
    def n_cols(self) -> int:
        return len(self.lefts)

    def __len__(self) -> int:
        return self.n_rows * self.n_cols

    def origin(self, index: int) -> tuple[int, int]:
        return self.tops[index // self.n_cols], self.lefts[index % self.n_cols]

    def origins(self) -> list[tuple[int, int]]:
        return [self.origin(i) for i in range(len(self))]

    def batches(self, size: int) -> list[range]:
        """Consecutive patch-index ranges of at most `size` patches (the sub-batches)."""
        return chunks(len(self), size)

    def first_row_reaching(self, y: int) -> int:
        """The first grid row whose patches reach image row y or below."""
        return next(r for r in range(self.n_rows) if self.tops[r] + self.patch_size[0] > y)

    def cell_box(self, index: int, map_size: Sequence[int]) -> tuple[int, int, int, int]:
        """(top, left, height, width) of the patch on a feature map of the whole image."""
        top, left = self.origin(index)
        (h_img, w_img), (ph, pw) = self.image_size, self.patch_size
        hf, wf = int(map_size[0]), int(map_size[1])
        # Same float expressions as the authors (fraction times size), then half-to-even.
        t, l = round(top / h_img * hf), round(left / w_img * wf)
        h, w = round(hf * (ph / h_img)), round(wf * (pw / w_img))
        # Keep the box on the map; the authors' slices were cut short the same way. A
        # rounded origin can land one past the last cell (e.g. 3.5 -> 4 on a 4-cell map,
        # where the authors' slice was empty and crashed): move it onto the last cell.
        t, l = min(t, hf - 1), min(l, wf - 1)
        return t, l, max(1, min(h, hf - t)), max(1, min(w, wf - l))

    def coverage(self) -> Tensor:
        """(H, W) number of patches covering each pixel."""
        return _axis_coverage(self.tops, self.patch_size[0], self.image_size[0])[:, None] * _axis_coverage(
            self.lefts, self.patch_size[1], self.image_size[1]
        )


@functools.lru_cache(maxsize=256)
def _axis_coverage(origins: tuple[int, ...], patch: int, length: int, device: torch.device | None = None) -> Tensor:
    """(length,) number of patches covering each position of one axis. Cached per device
    (every image of a size has the same) and shared, so read only."""
    with torch.inference_mode(False):
        counts = torch.zeros(length)
        for o in origins:
            counts[o : o + patch] += 1
        return counts.to(device)


def coverage_on_map(grid: PatchGrid, map_size: Sequence[int], device: torch.device | None = None) -> Tensor:
    """The coverage template bilinearly resized to a feature map: (1, 1, Hf, Wf).

    Coverage is separable (rows covering y times columns covering x), and so is bilinear
    resizing, so this never builds the full-resolution template.
    """
    rows = _axis_coverage(grid.tops, grid.patch_size[0], grid.image_size[0], device)
    cols = _axis_coverage(grid.lefts, grid.patch_size[1], grid.image_size[1], device)
    rows = F.interpolate(rows[None, None], size=int(map_size[0]), mode="linear", align_corners=False)[0, 0]
    cols = F.interpolate(cols[None, None], size=int(map_size[1]), mode="linear", align_corners=False)[0, 0]
    return (rows[:, None] * cols)[None, None]


def extract_patches(image: Tensor, grid: PatchGrid, indices: Sequence[int]) -> Tensor:
    """Slice patches out of (C, H, W) or (H, W): returns (n, C, ph, pw) or (n, ph, pw)."""
    ph, pw = grid.patch_size
    crops = []
    for i in indices:
        top, left = grid.origin(i)
        crops.append(image[..., top : top + ph, left : left + pw])
    return torch.stack(crops)


def crop_to_patches(fmap: Tensor, grid: PatchGrid, indices: Sequence[int], size: Sequence[int]) -> Tensor:
    """Crop a whole-image map (1, C, Hf, Wf) at each patch and resize to `size`: (n, C, *size),
    in the map's memory format.

    Boxes of one size are gathered in one indexing call. A map that needs gradients is
    gathered in groups of disjoint boxes: the gather's backward then adds into each cell at
    most once per call, where a scatter-add of overlapping boxes would sum in an order that
    varies from run to run (parallel atomics).
    """
    units = _box_units(grid, tuple(indices), tuple(fmap.shape[-2:]), fmap.device, fmap.requires_grad)
    pixels = fmap[0].permute(1, 2, 0)  # (Hf, Wf, C): a gather of boxes yields (m, h, w, C)
    # In the map's own layout (with standard strides even where h or w is 1), which the
    # resize keeps: the head then joins crops and its own maps without converting either.
    layout = memory_format_of(fmap)
    pieces = [resize(_fresh_in_layout(_unit_crops(fmap, pixels, u), u, layout), size) for u in units]
    if len(pieces) == 1:  # one unit: every patch, in order
        return pieces[0]
    first = pieces[0]
    out = torch.empty((len(indices), *first.shape[1:]), dtype=first.dtype, device=first.device, memory_format=layout)
    for unit, piece in zip(units, pieces):
        out[unit.picks] = piece
    return out


class SamplingPlan(NamedTuple):
    """Where and with what weights each output pixel of a bilinear crop reads its map: per
    patch, output rows read map rows r0 and r1 weighted y0 and y1, columns likewise."""

    r0: Tensor  # (n, H) int64
    r1: Tensor
    y0: Tensor  # (n, H) float32
    y1: Tensor
    c0: Tensor  # (n, W) int64
    c1: Tensor
    x0: Tensor  # (n, W) float32
    x1: Tensor


@functools.lru_cache(maxsize=4096)
def sampling_plan(
    grid: PatchGrid, indices: tuple[int, ...], map_size: tuple[int, int], size: tuple[int, int], device: torch.device
) -> SamplingPlan:
    """The plan of crop_sampled: crop_to_patches's boxes on a map of map_size, each resized
    to `size` as F.interpolate's bilinear rule (align_corners=False) resizes it. Its shapes
    depend on the patches' number and `size` alone, not on the boxes. Cached per device."""
    boxes = [grid.cell_box(i, map_size) for i in indices]
    with torch.inference_mode(False):
        rows = [_axis_taps(t, h, size[0]) for t, _, h, _ in boxes]
        cols = [_axis_taps(l, w, size[1]) for _, l, _, w in boxes]
        r0, r1, y0, y1 = (torch.stack(part).to(device) for part in zip(*rows))
        c0, c1, x0, x1 = (torch.stack(part).to(device) for part in zip(*cols))
        return SamplingPlan(r0, r1, y0, y1, c0, c1, x0, x1)


def _axis_taps(start: int, length: int, out: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Bilinear taps along one axis of a box (start, length) resized to `out` cells, by
    torch's rule for align_corners=False: source (i + 0.5) * scale - 0.5 with scale
    length / out in float32, the source rounded to float32 once (as a fused multiply-add
    rounds it), clamped at 0; the upper tap stays on the box's last cell."""
    scale = torch.tensor(length, dtype=torch.float32) / out
    source = ((torch.arange(out, dtype=torch.float64) + 0.5) * scale.double() - 0.5).float().clamp_(min=0)
    lower = source.long()
    upper = torch.where(lower < length - 1, lower + 1, lower)
    weight_upper = source - lower
    return start + lower, start + upper, 1 - weight_upper, weight_upper


def crop_sampled(fmap: Tensor, plan: SamplingPlan) -> Tensor:
    """crop_to_patches of a whole-image map (1, C, Hf, Wf) by its sampling plan: (n, C, H, W),
    in the map's memory format, computed in float32 (float16 and bfloat16 maps are rounded
    once, at the end).

    For compiled code: the result's shape and the graph depend on the plan's shapes, not on
    where the boxes lie or how large they are, so one graph serves images of any size; a
    compiler fuses the four gathers and their weighted sum into the kernels that use it.
    The plan's weights are torch's; the sums equal crop_to_patches's up to float rounding.
    Eager, it holds four float32 gathers per crop: for compiled code only. Not for float64
    maps, whose resize torch weighs in float64.
    """
    pixels = fmap[0].permute(1, 2, 0)  # (Hf, Wf, C)
    work = torch.promote_types(fmap.dtype, torch.float32)

    def taps(rows: Tensor, cols: Tensor) -> Tensor:  # (n, H, W, C)
        return pixels[rows[:, :, None], cols[:, None, :]].to(work)

    def across(rows: Tensor) -> Tensor:
        return taps(rows, plan.c0) * plan.x0[:, None, :, None] + taps(rows, plan.c1) * plan.x1[:, None, :, None]

    out = across(plan.r0) * plan.y0[:, :, None, None] + across(plan.r1) * plan.y1[:, :, None, None]
    return out.to(fmap.dtype).permute(0, 3, 1, 2).contiguous(memory_format=memory_format_of(fmap))


def paste_patches(
    canvas: Tensor, patch_maps: Tensor | Sequence[Tensor], grid: PatchGrid, indices: Sequence[int]
) -> Tensor:
    """Add each patch's map, resized to its cell box, into canvas (1, C, Hf, Wf) in place
    (the one function here that writes into its input), and return canvas. The canvas is a
    dense NCHW or channels-last tensor of the maps' dtype or a wider one.

    patch_maps: (n, C, h, w), one map per patch of `indices`; or several such maps of one
    size whose channels, joined in order, are the canvas's C: each is resized alone and the
    pieces joined, so the canvas's channels receive what each map would add on its own,
    in fewer, wider calls.

    Patches go in groups whose boxes are disjoint, one indexed add per group and box size,
    so every cell receives its terms in a fixed order on every device: group by group, which
    where three or more boxes overlap is not always patch order (the sum can then differ from
    a patch-by-patch loop in its last bits).
    """
    parts = [patch_maps] if isinstance(patch_maps, Tensor) else list(patch_maps)
    for part in parts:
        if part.dtype != canvas.dtype and part.dtype.itemsize >= canvas.dtype.itemsize:
            raise TypeError(f"cannot add {part.dtype} maps into a {canvas.dtype} canvas without rounding twice")
    if sum(part.shape[1] for part in parts) != canvas.shape[1]:
        raise ValueError(f"maps of {[part.shape[1] for part in parts]} channels do not fill a canvas of {canvas.shape[1]}")
    units = _box_units(grid, tuple(indices), tuple(canvas.shape[-2:]), canvas.device, True)
    # Every patch resized at once, one resize per box size, then each unit's picked: on the
    # CPU a strided slice of a channels-last batch resizes some 20 times slower.
    resized: dict[tuple[int, int], Tensor] = {}
    for unit in units:
        if unit.size not in resized:
            pieces = [resize(part, unit.size) for part in parts]
            resized[unit.size] = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)
        maps = resized[unit.size][unit.picks]
        if unit.single is not None:  # one box: a slice, no gather
            _box_slice(canvas, unit).add_(maps)
            continue
        cells, dim = _cell_table(canvas)
        # No two terms of one call meet in a cell, so the sums do not depend on the order
        # in which the device adds them.
        cells.index_add_(dim, unit.cells, _as_cell_table(maps, dim).to(canvas.dtype))
    return canvas


def _cell_table(fmap: Tensor) -> tuple[Tensor, int]:
    """A view of fmap (1, C, Hf, Wf) as a table of its cells (cell = row * Wf + column), and
    the dimension they run along: (Hf * Wf, C) and 0 for a channels-last map, else
    (C, Hf * Wf) and 1."""
    if memory_format_of(fmap) == torch.channels_last:
        return fmap[0].permute(1, 2, 0).view(-1, fmap.shape[1]), 0
    return fmap[0].view(fmap.shape[1], -1), 1


def _as_cell_table(maps: Tensor, dim: int) -> Tensor:
    """Boxes' maps (m, C, h, w) as a table of cells along dim, in the order of _BoxUnit.cells
    (a view where their strides allow)."""
    if dim == 0:
        return maps.permute(0, 2, 3, 1).reshape(-1, maps.shape[1])
    return maps.transpose(0, 1).reshape(maps.shape[1], -1)


class _BoxUnit(NamedTuple):
    """Patches whose cell boxes on one map share a size (and, in a disjoint unit, no cell)."""

    picks: slice | Tensor  # their positions among the requested indices, as a slice where evenly spaced
    size: tuple[int, int]
    rows: Tensor  # (m, h, 1) map rows of each box
    cols: Tensor  # (m, 1, w) map columns of each box
    cells: Tensor  # (m * h * w,) the boxes' cells (row * Wf + column), box by box, row-major
    single: Optional[tuple[int, int, int]]  # (position, top, left) of a unit's only box


def _box_slice(fmap: Tensor, unit: _BoxUnit) -> Tensor:
    """The only box of a one-box unit on fmap (1, C, Hf, Wf), as a (1, C, h, w) view."""
    _, t, l = unit.single  # type: ignore[misc]
    return fmap[:, :, t : t + unit.size[0], l : l + unit.size[1]]


def _unit_crops(fmap: Tensor, pixels: Tensor, unit: _BoxUnit) -> Tensor:
    """The unit's boxes of fmap (1, C, Hf, Wf) as an (m, C, h, w) view or gather; pixels is
    fmap[0] as (Hf, Wf, C). One box is a slice, which costs no kernel."""
    if unit.single is not None:
        return _box_slice(fmap, unit)
    return pixels[unit.rows, unit.cols].permute(0, 3, 1, 2)


def _fresh_in_layout(crops: Tensor, unit: _BoxUnit, layout: torch.memory_format) -> Tensor:
    """The unit's crops as a tensor of their own with the standard strides of layout: a
    gather is one already where it has them (a gather of boxes has channels-last's); a
    slice of the map is copied."""
    _, c, h, w = crops.shape
    standard = (h * w * c, 1, w * c, c) if layout == torch.channels_last else (c * h * w, h * w, w, 1)
    return crops if unit.single is None and crops.stride() == standard else crops.clone(memory_format=layout)


# Entries are small (index tensors of a few boxes). An image needs about eight per pass
# (crops and pastes on four map sizes): room for 8000 x 8000 at one patch per pass, so a
# folder of such images does not rebuild them (on a GPU each rebuild is a host-to-device
# copy that waits for the queued work).
@functools.lru_cache(maxsize=4096)
def _box_units(
    grid: PatchGrid, indices: tuple[int, ...], map_size: tuple[int, int], device: torch.device, disjoint: bool
) -> tuple[_BoxUnit, ...]:
    """The patches `indices` split into units of one box size on a map of map_size, and,
    with disjoint, of pairwise disjoint boxes (first fit in index order: four units on a
    grid whose neighbours overlap). Index tensors are made once per device; on a GPU,
    building them per call would mean host-to-device copies for every crop and paste."""
    with torch.inference_mode(False):  # cached: autograd may save them in a later call
        return _make_box_units(grid, indices, map_size, device, disjoint)


def _make_box_units(
    grid: PatchGrid, indices: tuple[int, ...], map_size: tuple[int, int], device: torch.device, disjoint: bool
) -> tuple[_BoxUnit, ...]:
    boxes = [grid.cell_box(i, map_size) for i in indices]
    groups: list[list[int]] = []
    for k, box in enumerate(boxes):
        for group in groups:
            if not disjoint or not any(_overlap(box, boxes[j]) for j in group):
                group.append(k)
                break
        else:
            groups.append([k])
    units = []
    for group in groups:
        for size in dict.fromkeys(boxes[k][2:] for k in group):
            members = [k for k in group if boxes[k][2:] == size]
            tops = torch.tensor([boxes[k][0] for k in members])
            lefts = torch.tensor([boxes[k][1] for k in members])
            rows = (tops[:, None] + torch.arange(size[0]))[:, :, None]
            cols = (lefts[:, None] + torch.arange(size[1]))[:, None, :]
            units.append(_BoxUnit(
                picks=_picks(members, device),
                size=size,
                rows=rows.to(device),
                cols=cols.to(device),
                cells=(rows * map_size[1] + cols).flatten().to(device),
                single=(members[0], *boxes[members[0]][:2]) if len(members) == 1 else None,
            ))
    return tuple(units)


def _picks(members: list[int], device: torch.device) -> slice | Tensor:
    """Increasing positions as a slice where evenly spaced (the two disjoint groups of a
    row of patches: a view of their maps, no gather), else an index tensor."""
    step = members[1] - members[0] if len(members) > 1 else 1
    if members == list(range(members[0], members[-1] + 1, step)):
        return slice(members[0], members[-1] + 1, step)
    return torch.tensor(members, device=device)


def _overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]


def merge_logits(patch_logits: Tensor, grid: PatchGrid, max_band_bytes: int = 64 << 20) -> Tensor:
    """Sum patch logits (N, K, h, w), nearest-upsampled to the patch size, into (K, H, W)
    float64 (a view of an (H, W, K) tensor).

    Overlaps are summed, not averaged, as the authors did. Beyond the result, the work
    takes about max_band_bytes.
    """
    by_cell = _by_cell(patch_logits, grid)
    out = by_cell.new_empty(*grid.image_size, by_cell.shape[2], dtype=SUM_DTYPE)
    for r0, r1 in _bands(0, grid.image_size[0], out[0].nbytes, max_band_bytes):
        _add_cover_layers(out[r0:r1].zero_(), by_cell, grid, r0)
    return out.permute(2, 0, 1)


def merge_argmax(patch_logits: Tensor, grid: PatchGrid, max_band_bytes: int = 64 << 20) -> Tensor:
    """Argmax over classes of the merged patch logits, (H, W) of class_dtype, built band by
    band in about max_band_bytes."""
    k = patch_logits.shape[1]
    h_img, w_img = grid.image_size
    by_cell = _by_cell(patch_logits, grid)
    bands = _bands(0, h_img, k * w_img * SUM_DTYPE.itemsize, max_band_bytes)
    buffer = by_cell.new_empty(bands[0][1], w_img, k, dtype=SUM_DTYPE)
    out = torch.empty(h_img, w_img, dtype=class_dtype(k), device=patch_logits.device)
    for r0, r1 in bands:
        band = _add_cover_layers(buffer[: r1 - r0].zero_(), by_cell, grid, r0)
        # Classes innermost: the CPU's argmax over the outermost dimension is ten times slower.
        out[r0:r1] = band.argmax(-1)
    return out


def merge_argmax_rows(row_logits: dict[int, Tensor], grid: PatchGrid, y0: int, y1: int, columns: int) -> Tensor:
    """merge_argmax(all patch logits, grid)[y0:y1], from the logits of the grid rows over
    image rows y0:y1 alone. row_logits: grid row -> its patches' logits (n_cols, K, h, w);
    it must hold every row whose patches reach into y0:y1 and may hold others.

    Built piece by piece of `columns` image columns, each merged on a grid of the patches
    over it alone, their origins moved by (y0, x0) (a patch may start above or left of the
    piece): the same patches in the same order per pixel, so the same sums and tie-breaks.
    A piece copies only its own patches' logits into the layout merging needs, not a whole
    grid row's, which on a wide image is tens of MB."""
    (ph, pw), width = grid.patch_size, grid.image_size[1]
    rows = [r for r in sorted(row_logits) if grid.tops[r] < y1 and grid.tops[r] + ph > y0]
    tops = tuple(grid.tops[r] - y0 for r in rows)
    like = row_logits[rows[0]]
    out = torch.empty((y1 - y0, width), dtype=class_dtype(like.shape[1]), device=like.device)
    for x0 in range(0, width, columns):
        x1 = min(width, x0 + columns)
        cols = [c for c in range(grid.n_cols) if grid.lefts[c] < x1 and grid.lefts[c] + pw > x0]  # contiguous
        piece = PatchGrid((y1 - y0, x1 - x0), grid.patch_size, tops, tuple(grid.lefts[c] - x0 for c in cols))
        out[:, x0:x1] = merge_argmax(torch.cat([row_logits[r][cols[0] : cols[-1] + 1] for r in rows]), piece)
    return out


def _bands(r0: int, r1: int, row_bytes: int, max_bytes: int) -> list[tuple[int, int]]:
    """Rows r0:r1 cut into even bands of rows whose canvas and one cover layer being added
    into it take at most max_bytes (one row at least)."""
    n_bands = math.ceil((r1 - r0) / max(1, max_bytes // (2 * row_bytes)))
    size = math.ceil((r1 - r0) / n_bands)  # even bands: no sliver of a few rows at the end
    return [(a, min(r1, a + size)) for a in range(r0, r1, size)]


def _by_cell(patch_logits: Tensor, grid: PatchGrid) -> Tensor:
    """Patch logits (N, K, h, w) laid out as ((rows + 1) * h, (cols + 1) * w, K): grid row r,
    logit row y at r * h + y, and likewise for columns. The last row and column of patches
    are zeros, which stand for "no patch" in a cover layer."""
    k, h, w = patch_logits.shape[1:]
    rows, cols = grid.n_rows, grid.n_cols
    by_cell = patch_logits.new_zeros(rows + 1, h, cols + 1, w, k)
    by_cell[:rows, :, :cols] = patch_logits.view(rows, cols, k, h, w).permute(0, 3, 1, 4, 2)
    return by_cell.view((rows + 1) * h, (cols + 1) * w, k)


def _add_cover_layers(canvas: Tensor, by_cell: Tensor, grid: PatchGrid, r0: int) -> Tensor:
    """Add into canvas (n, W, K) image rows r0:r0 + n of the merged logits, from the logits
    by cell; returns canvas.

    Cover layer (i, j) holds, at each pixel, the logits of the patch that is the i-th of
    those covering its row and the j-th of those covering its column (zeros where there
    is none): two gathers per layer instead of a few operators per patch. Added in the
    order of (i, j), the layers give every pixel its terms in patch (row-major) order, so
    on a zeroed canvas the sums are those of adding patch by patch, to the bit.
    """
    (h_img, w_img), (ph, pw) = grid.image_size, grid.patch_size
    h, w = by_cell.shape[0] // (grid.n_rows + 1), by_cell.shape[1] // (grid.n_cols + 1)
    col_layers = _cover_layers(grid.lefts, pw, w_img, w, by_cell.device)
    for row_layer in _cover_layers(grid.tops, ph, h_img, h, by_cell.device):
        rows = by_cell.index_select(0, row_layer[r0 : r0 + canvas.shape[0]])
        for col_layer in col_layers:
            canvas.add_(rows.index_select(1, col_layer))
    return canvas


@functools.lru_cache(maxsize=256)
def _cover_layers(origins: tuple[int, ...], patch: int, length: int, cells: int, device: torch.device) -> tuple[Tensor, ...]:
    """Per cover layer l of one axis, (length,) indices into that axis of the logits by cell:
    at each position, the cell (torch's legacy nearest rule from `cells` to `patch`) of the
    l-th patch covering it, or a cell of the zero patch where fewer cover it. Cached per
    device and shared, so read only."""
    with torch.inference_mode(False):
        starts = torch.tensor(origins)
        position = torch.arange(length)
        first = torch.searchsorted(starts + patch, position, right=True)  # first patch still covering
        count = torch.searchsorted(starts, position, right=True) - first
        cell_of = nearest_indices(patch, cells)
        layers = []
        for layer in range(int(count.max())):
            covered = layer < count
            index = torch.where(covered, first + layer, 0)
            flat = index * cells + cell_of[(position - starts[index]).clamp(0, patch - 1)]
            layers.append(torch.where(covered, flat, len(origins) * cells).to(device))
        return tuple(layers)


def upsample_nearest(x: Tensor, size: Sequence[int]) -> Tensor:
    """(..., h, w) nearest-upsampled to `size` by PyTorch's legacy nearest rule (as
    F.interpolate's "nearest"), by two index selects."""
    rows = nearest_indices(int(size[0]), x.shape[-2], x.device)
    cols = nearest_indices(int(size[1]), x.shape[-1], x.device)
    return x.index_select(-2, rows).index_select(-1, cols)


def upsample_argmax(logits: Tensor, size: Sequence[int]) -> Tensor:
    """Argmax of (K, h, w) logits nearest-upsampled to `size`: (H, W) of class_dtype; the
    argmax runs before the upsampling, on the small map."""
    return upsample_nearest(logits.argmax(0).to(class_dtype(logits.shape[0])), size)
