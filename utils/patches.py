"""Patch grid, patch extraction, global-feature crops and merging, as pure tensor functions.

Sizes are (H, W). A patch is addressed by its pixel origin (top, left); feature maps are
addressed through the fractions top/H, left/W and the ratio patch/H, patch/W, rounded half
to even exactly as the authors did, so crops land on the same cells as theirs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from utils.resample import nearest_indices, resize

MIN_OVERLAP = 50  # pixels shared by neighbouring patches, the authors' constant


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


def _axis_coverage(origins: Sequence[int], patch: int, length: int, device: torch.device | None = None) -> Tensor:
    counts = torch.zeros(length, device=device)
    for o in origins:
        counts[o : o + patch] += 1
    return counts


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
    """Crop a whole-image map (1, C, Hf, Wf) at each patch and resize to `size`: (n, C, *size)."""
    crops = []
    for i in indices:
        t, l, h, w = grid.cell_box(i, fmap.shape[-2:])
        crops.append(fmap[0, :, t : t + h, l : l + w])
    if all(c.shape == crops[0].shape for c in crops):
        return resize(torch.stack(crops), size)
    return torch.cat([resize(c[None], size) for c in crops])


def paste_patches(canvas: Tensor, patch_maps: Tensor, grid: PatchGrid, indices: Sequence[int]) -> Tensor:
    """Add each patch's map, resized to its cell box, into canvas (1, C, Hf, Wf) in place."""
    boxes = [grid.cell_box(i, canvas.shape[-2:]) for i in indices]
    sizes = {(h, w) for _, _, h, w in boxes}
    # Boxes share one size except where the map's edge cut one short: resize together.
    resized = {size: resize(patch_maps, size) for size in sizes}
    for k, (t, l, h, w) in enumerate(boxes):
        canvas[0, :, t : t + h, l : l + w] += resized[(h, w)][k]
    return canvas


def merge_logits(patch_logits: Tensor, grid: PatchGrid, rows: tuple[int, int] | None = None) -> Tensor:
    """Sum patch logits (N, K, h, w), nearest-upsampled to the patch size, into (K, r1 - r0, W).

    Overlaps are summed, not averaged, as the authors did; `rows` restricts the result to
    a horizontal band of the image so callers can bound memory on huge images.
    """
    (h_img, w_img), (ph, pw) = grid.image_size, grid.patch_size
    r0, r1 = rows if rows is not None else (0, h_img)
    k, h, w = patch_logits.shape[1:]
    # Sum in at least fp32 even when the network ran under bf16/fp16 autocast.
    canvas = patch_logits.new_zeros(k, r1 - r0, w_img, dtype=torch.promote_types(patch_logits.dtype, torch.float32))
    row_idx = nearest_indices(ph, h, patch_logits.device)
    col_idx = nearest_indices(pw, w, patch_logits.device)
    for i in range(len(grid)):
        top, left = grid.origin(i)
        a, b = max(r0, top), min(r1, top + ph)
        if a >= b:
            continue
        band = patch_logits[i].index_select(1, row_idx[a - top : b - top]).index_select(2, col_idx)
        canvas[:, a - r0 : b - r0, left : left + pw] += band
    return canvas


def class_dtype(n_class: int) -> torch.dtype:
    """The dtype of class maps: one byte per pixel wherever the ids fit, which keeps the
    maps of huge images (three per image in evaluation) small."""
    return torch.uint8 if n_class <= 256 else torch.long


def merge_argmax(patch_logits: Tensor, grid: PatchGrid, max_band_bytes: int = 64 << 20) -> Tensor:
    """Argmax over classes of the merged patch logits, (H, W) of class_dtype, built band by band."""
    k = patch_logits.shape[1]
    h_img, w_img = grid.image_size
    band = max(1, max_band_bytes // (k * w_img * patch_logits.element_size()))
    out = torch.empty(h_img, w_img, dtype=class_dtype(k), device=patch_logits.device)
    for r0 in range(0, h_img, band):
        r1 = min(h_img, r0 + band)
        out[r0:r1] = merge_logits(patch_logits, grid, (r0, r1)).argmax(0)
    return out


def upsample_argmax(logits: Tensor, size: Sequence[int]) -> Tensor:
    """Argmax of (K, h, w) logits nearest-upsampled to `size`: (H, W) of class_dtype."""
    rows = nearest_indices(int(size[0]), logits.shape[-2], logits.device)
    cols = nearest_indices(int(size[1]), logits.shape[-1], logits.device)
    return logits.argmax(0).to(class_dtype(logits.shape[0])).index_select(0, rows).index_select(1, cols)
