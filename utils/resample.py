"""Resampling rules the authors' numbers depend on, each written down once.

Feature maps: bilinear, align_corners=False. Logits for prediction: torch's legacy
nearest. Label maps for the loss: Pillow's NEAREST (the authors resized labels with PIL).
The global image: Pillow's BILINEAR (antialiased when shrinking), reproduced bit for bit
on tensors so that it can run on the GPU (pil_bilinear).
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def resize(x: Tensor, size: Sequence[int]) -> Tensor:
    """Bilinear resize of (B, C, H, W), align_corners=False; skipped when the size matches."""
    size = (int(size[0]), int(size[1]))
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def nearest_indices(out_len: int, in_len: int, device: torch.device | None = None) -> Tensor:
    """torch's legacy nearest rule: output i reads input floor(i * in / out).

    Computed in float32 as torch does (scale = float(in) / out, then i * scale), so that
    products that are whole numbers in exact arithmetic round the way torch's do.
    """
    scale = float(np.float32(in_len) / np.float32(out_len))
    return (torch.arange(out_len, device=device, dtype=torch.float32) * scale).floor().long().clamp_(max=in_len - 1)


def pil_nearest_indices(out_len: int, in_len: int, device: torch.device | None = None) -> Tensor:
    """Pillow's NEAREST rule: output i reads input floor((i + 0.5) * in / out).

    Pillow evaluates (i + 0.5) * in / out by accumulating the step in float64, starting at
    step / 2 and adding step per output pixel, so where the exact value is a whole number
    the accumulated one can fall just below it. NumPy's cumsum adds in the same order.
    """
    step = in_len / out_len
    coords = np.full(out_len, step)
    coords[0] = step * 0.5
    idx = np.minimum(np.cumsum(coords).astype(np.int64), in_len - 1)
    return torch.from_numpy(idx).to(device)


def resize_labels(labels: Tensor, size: Sequence[int]) -> Tensor:
    """Resize (..., H, W) class-id maps with Pillow's NEAREST sampling."""
    rows = pil_nearest_indices(int(size[0]), labels.shape[-2], labels.device)
    cols = pil_nearest_indices(int(size[1]), labels.shape[-1], labels.device)
    return labels.index_select(-2, rows).index_select(-1, cols)


# ------------------------------------------------------------------ Pillow's BILINEAR

# Pillow's fixed point for 8-bit images (Resample.c): 32 bits less 8 for the result and 2
# spare for filters with negative lobes.
PIL_PRECISION_BITS = 32 - 8 - 2


class _PilTaps(NamedTuple):
    """Pillow's BILINEAR coefficients for one axis, tap-major: row j serves tap j of every output."""

    index: Tensor  # (taps, out) int64: input position of tap j (clamped where past the last tap)
    weight: Tensor  # (taps, out) float64: Pillow's normalised weights, 0 past the last tap
    weight8: Tensor  # (taps, out) int32: the same in 22-bit fixed point, as for 8-bit images
    valid: Tensor  # (taps, out) bool: tap j is one of Pillow's taps of that output
    full_taps: int  # taps every output has (tap j < full_taps needs no mask)
    first: int  # first input position any output reads
    last: int  # one past the last input position any output reads


@functools.lru_cache(maxsize=64)
def _pil_bilinear_taps(in_len: int, out_len: int, device: torch.device = torch.device("cpu")) -> _PilTaps:
    """Pillow's precompute_coeffs for BILINEAR (support 1) over a whole axis, as tables on
    `device` (cached, so a GPU receives them once, not a copy per image that would wait
    for the work already queued).

    Computed in float64 NumPy, operation by operation as Resample.c does it: the filter argument is
    multiplied by 1 / filterscale (not divided by filterscale), the weights are summed in
    tap order (not NumPy's pairwise sum) and each is divided by that sum.
    """
    scale = float(in_len) / out_len  # Pillow divides the float box width, exact below 2**24
    filterscale = max(scale, 1.0)
    support = 1.0 * filterscale
    inv = 1.0 / filterscale
    center = (np.arange(out_len, dtype=np.float64) + 0.5) * scale
    xmin = np.maximum((center - support + 0.5).astype(np.int64), 0)  # C casts truncate toward 0
    count = np.minimum((center + support + 0.5).astype(np.int64), in_len) - xmin
    taps = int(count.max())
    positions = xmin[:, None] + np.arange(taps)  # (out, taps)
    valid = np.arange(taps) < count[:, None]
    t = np.abs((positions.astype(np.float64) - center[:, None] + 0.5) * inv)
    w = np.where(valid & (t < 1.0), 1.0 - t, 0.0)
    total = np.zeros(out_len)
    for j in range(taps):
        total = total + w[:, j]
    w = np.where(total[:, None] != 0.0, w / np.where(total != 0.0, total, 1.0)[:, None], w)
    scaled = w * float(1 << PIL_PRECISION_BITS)
    w8 = np.where(w < 0.0, np.trunc(-0.5 + scaled), np.trunc(0.5 + scaled)).astype(np.int32)
    return _PilTaps(
        index=torch.from_numpy(np.ascontiguousarray(np.minimum(positions, in_len - 1).T)).to(device),
        weight=torch.from_numpy(np.ascontiguousarray(w.T)).to(device),
        weight8=torch.from_numpy(np.ascontiguousarray(w8.T)).to(device),
        valid=torch.from_numpy(np.ascontiguousarray(valid.T)).to(device),
        full_taps=int(count.min()),
        first=int(xmin[0]),
        last=int(xmin[-1] + count[-1]),
    )


# Input elements a pass copies at a time on a CPU (4M: 4 MiB for uint8, 16 MiB for
# float32); 16 times as many elsewhere, where each band costs kernel launches.
_PIL_BAND = 1 << 22


def _pil_rows(x: Tensor, in_len: int, out_len: int, offset: int = 0,
              outputs: Optional[tuple[int, int]] = None) -> Tensor:
    """Pillow's BILINEAR pass along dim -2 of uint8 or float32 (..., n, m) `x`, any strides.

    `x` holds input rows `offset` onwards (Pillow's first pass only covers what the
    second one reads). `outputs` = (start, stop) computes only those output rows of the
    out_len (each output is a sum over its own taps, so a range of them is exactly that
    range of the whole pass): a caller streaming an image in bands passes the rows those
    outputs read (pil_output_windows) and their first row as `offset`. Bands of columns
    are copied in turn into a contiguous buffer (the copy also undoes a transpose), so
    the extra memory stays bounded for any image size.
    Within a band, a loop over taps: tap j gathers one output-sized block of whole rows,
    widens it to the accumulator's type (int32 for uint8, float64 for float32) and adds
    it weighted.
    """
    device = x.device
    taps = _pil_bilinear_taps(in_len, out_len, device)
    o0, o1 = (0, out_len) if outputs is None else outputs
    if not 0 <= o0 < o1 <= out_len:
        raise ValueError(f"output rows {outputs} are not a non-empty range within 0..{out_len}")
    # The taps that count must read rows `x` holds: a caller's wrong offset or window is an
    # error, not pixels read from other rows. Checked on the CPU tables (windows only move
    # forward, so the first and last outputs bound them all): a GPU need not synchronise.
    start, stop = pil_output_windows(in_len, out_len)
    if start[o0] < offset or stop[o1 - 1] > offset + x.shape[-2]:
        raise ValueError(f"output rows {o0}..{o1} read input rows {start[o0]}..{stop[o1 - 1]}, "
                         f"outside the {x.shape[-2]} held from row {offset}")
    # Clamped into `x`: a tap past an output's last one (weight 0, or masked) may point past
    # the rows held.
    out_len = o1 - o0
    index = (taps.index[:, o0:o1] - offset).clamp_(0, x.shape[-2] - 1)
    eight_bit = x.dtype == torch.uint8
    if eight_bit:
        # Pillow: int ss = 1 << 21; ss += pixel * k; at most 255 * 2**22 + 2**21 < 2**31.
        work, weight = torch.int32, taps.weight8[:, o0:o1, None]
    else:
        # Mode "F": double ss = 0.0; ss += (double)pixel * k, tap by tap; stored as float.
        # full_taps is the whole axis's minimum, so a range may mask taps it need not: no change.
        work, weight = torch.float64, taps.weight[:, o0:o1, None]
        invalid = (~taps.valid[:, o0:o1])[:, :, None]
    lead, cols = x.shape[:-1], x.shape[-1]
    out = torch.empty((*x.shape[:-2], out_len, cols), dtype=x.dtype, device=device)
    budget = _PIL_BAND if device.type == "cpu" else 16 * _PIL_BAND
    band = -(-cols // -(-x.numel() // budget))
    # Flat buffers sized for a whole band, reused by every band (fresh pages cost more
    # than the arithmetic); the last, narrower band views their beginning.
    n_in, n_out = x[..., :band].numel(), x[..., :band].numel() // x.shape[-2] * out_len
    flat = (torch.empty(n_in, dtype=x.dtype, device=device), torch.empty(n_out, dtype=x.dtype, device=device),
            torch.empty(n_out, dtype=work, device=device), torch.empty(n_out, dtype=work, device=device))
    for c0 in range(0, cols, band):
        part = x[..., c0:c0 + band]
        shape = (*lead[:-1], out_len, part.shape[-1])
        gathered, term, acc = (b[:math.prod(shape)].view(shape) for b in flat[1:])
        if part.is_contiguous():
            buf = part
        else:
            buf = flat[0][:part.numel()].view(part.shape).copy_(part)
        if eight_bit:
            acc.fill_(1 << (PIL_PRECISION_BITS - 1))
            for j in range(index.shape[0]):
                torch.index_select(buf, -2, index[j], out=gathered)
                acc.addcmul_(term.copy_(gathered), weight[j])  # integers: exact
            acc.bitwise_right_shift_(PIL_PRECISION_BITS).clamp_(0, 255)
        else:
            acc.zero_()
            for j in range(index.shape[0]):
                torch.index_select(buf, -2, index[j], out=gathered)
                term.copy_(gathered).mul_(weight[j])  # then a separate add: no fused multiply-add
                if j >= taps.full_taps:  # a tap Pillow lacks for some outputs adds nothing (not 0 * inf)
                    term.masked_fill_(invalid[j], 0.0)
                acc.add_(term)
        out[..., c0:c0 + band] = acc
    return out


def _pil_columns(x: Tensor, in_len: int, out_len: int, offset: int = 0) -> Tensor:
    """Pillow's BILINEAR pass along dim -1 of (..., m, n) `x`: _pil_rows on the transpose.

    Gathering whole rows is far faster than gathering columns (about 10x on a CPU), and
    _pil_rows's band copies do the transposing. Returns a transposed (non-contiguous) view.
    """
    return _pil_rows(x.transpose(-1, -2), in_len, out_len, offset).transpose(-1, -2)


def pil_output_windows(in_len: int, out_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(start, stop) input positions each output of Pillow's BILINEAR pass reads, (out_len,)
    int64 each; both never decrease along the axis, so outputs in order read windows that
    only move forward (what lets a pass run over an image streamed in bands)."""
    taps = _pil_bilinear_taps(in_len, out_len, torch.device("cpu"))  # the CPU tables _pil_rows caches too
    start = taps.index[0].numpy()  # tap 0 is never clamped: it is the window's start
    return start, start + taps.valid.sum(0).numpy()


def pil_vertical_first(in_h: int, in_w: int, out_h: int, out_w: int) -> bool:
    """Whether Pillow resamples rows before columns when both sizes change.

    Pillow 13 (python-pillow/Pillow#9549) runs the vertical pass first when the height
    shrinks by more than twice as many pixels as the width does; earlier Pillow always ran
    the horizontal pass first. The order moves some outputs by one level (8-bit) or an ulp
    (float); shrinking both sides by the same number of pixels, as a square image to a
    square size, takes the horizontal pass first in every version.
    """
    return out_h < in_h and in_h - out_h > 2 * (in_w - out_w)


def pil_bilinear(image: Tensor, size: Sequence[int]) -> Tensor:
    """Pillow's `Image.resize((w, h), Image.BILINEAR)` of (..., H, W), bit for bit, on any device.

    uint8 images follow Pillow's 8-bit path (what RGB and L images take): 22-bit fixed
    point coefficients, integer sums, each pass rounded and clipped to uint8. Float
    images follow mode "F" per channel: they are cast to float32 first, coefficients are
    doubles, sums run in double in tap order, each pass is stored as float32. Antialiased
    when shrinking (the filter widens by the scale factor). As in Pillow, a pass whose
    size does not change is skipped, the two passes run in Pillow's order (horizontal
    first unless pil_vertical_first), and the first pass only covers the rows (or
    columns) the second one reads. Memory beyond the input and output stays bounded
    for any input size (8000 x 8000 RGB: about 25 MiB as uint8, 77 MiB as float32).

    Args:
        image: (..., H, W) uint8 or floating tensor, on any device.
        size: (h, w) output size, both at least 1.
    Returns:
        (..., h, w), uint8 for uint8 input and float32 otherwise, a new tensor on the
        input's device (not differentiable).
    """
    h, w = int(size[0]), int(size[1])
    if h < 1 or w < 1:
        raise ValueError(f"output size must be positive, got {(h, w)}")
    if image.dim() < 2 or image.shape[-2] < 1 or image.shape[-1] < 1:
        raise ValueError(f"expected a non-empty (..., H, W) image, got shape {tuple(image.shape)}")
    image = image.detach()
    if image.dtype != torch.uint8:
        if not image.is_floating_point():
            raise TypeError(f"expected a uint8 or float image tensor, got {image.dtype}")
        image = image.float()
    in_h, in_w = image.shape[-2:]
    x = image
    if x.numel() == 0:
        return x.new_empty((*x.shape[:-2], h, w))
    if w != in_w and h != in_h:
        if pil_vertical_first(in_h, in_w, h, w):
            cols = _pil_bilinear_taps(in_w, w)
            x = _pil_rows(x[..., cols.first:cols.last], in_h, h)
            return _pil_columns(x, in_w, w, cols.first).contiguous()
        rows = _pil_bilinear_taps(in_h, h)
        x = _pil_columns(x[..., rows.first:rows.last, :], in_w, w)
        return _pil_rows(x, in_h, h, rows.first)
    if w != in_w:
        return _pil_columns(x, in_w, w).contiguous()
    if h != in_h:
        return _pil_rows(x, in_h, h)
    return x.clone()
