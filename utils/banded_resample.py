"""Pillow's BILINEAR resize of an image too large to hold, read in bands of rows.

The result equals utils.resample.pil_bilinear of the whole image bit for bit: both of
Pillow's passes compute each output from its own window of inputs, so a pass may run
over any range of outputs given the inputs that range reads, and the passes run in
Pillow's order (pil_vertical_first) over the same inputs.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from utils.resample import _pil_bilinear_taps, _pil_columns, _pil_rows, pil_output_windows, pil_vertical_first

# read(top, height, left, width) -> (C, height, width) uint8: rows and columns of the input.
ReadRows = Callable[[int, int, int, int], Tensor]


def pil_bilinear_banded(read: ReadRows, in_size: Sequence[int], size: Sequence[int], band_rows: int) -> Tensor:
    """pil_bilinear of a uint8 image that `read` returns piece by piece, reading each
    input row that the result depends on once, top to bottom, in bands of `band_rows`.

    How the passes are cut (out_h, out_w = size):
      * horizontal pass first (Pillow's usual order): each band is resized to out_w
        columns as it is read, then the vertical pass runs, output row by output row as
        soon as the rows it reads have arrived, over those narrow rows;
      * vertical pass first: the vertical pass runs over the band's full-width rows (only
        the columns the horizontal pass will read), then the horizontal pass over the
        output rows just made.

    Memory: the band read (C x band_rows x in_w bytes), plus the rows kept for the
    outputs still to come (at most one output window, about 2 * in_h / out_h + 2 rows, of
    out_w or in_w columns), plus the result (C x out_h x out_w) and the fixed buffers of
    _pil_rows (a few tens of MiB).

    Args:
        read: the reader; called with rows inside [0, in_h) and columns inside [0, in_w).
        in_size: (in_h, in_w) of the whole input.
        size: (out_h, out_w), both at least 1.
        band_rows: input rows per read, at least 1.
    Returns:
        (C, out_h, out_w) uint8 on the CPU, equal to pil_bilinear(whole image, size).
    """
    in_h, in_w = int(in_size[0]), int(in_size[1])
    out_h, out_w = int(size[0]), int(size[1])
    if min(in_h, in_w, out_h, out_w) < 1 or band_rows < 1:
        raise ValueError(f"sizes and band_rows must be positive, got {in_size} -> {size} in bands of {band_rows}")
    both = out_h != in_h and out_w != in_w
    if both and pil_vertical_first(in_h, in_w, out_h, out_w):
        cols = _pil_bilinear_taps(in_w, out_w)
        c0, c1 = cols.first, cols.last

        def before(block: Tensor) -> Tensor:
            return block

        def after(rows: Tensor) -> Tensor:
            return _pil_columns(rows, in_w, out_w, c0)
    else:
        c0, c1 = 0, in_w

        def before(block: Tensor) -> Tensor:
            return _pil_columns(block, in_w, out_w) if out_w != in_w else block

        def after(rows: Tensor) -> Tensor:
            return rows

    if out_h == in_h:  # no vertical pass: each band stands alone
        bands = [before(read(r0, min(band_rows, in_h - r0), c0, c1 - c0)) for r0 in range(0, in_h, band_rows)]
        return torch.cat(bands, dim=-2).contiguous()

    starts, stops = pil_output_windows(in_h, out_h)
    out: Tensor | None = None
    held: Tensor | None = None  # the rows [held_top, read_to) that outputs still to come read, after `before`
    held_top, done = int(starts[0]), 0
    for r0 in range(int(starts[0]), int(stops[-1]), band_rows):
        r1 = min(r0 + band_rows, int(stops[-1]))
        block = before(read(r0, r1 - r0, c0, c1 - c0))
        held = block if held is None else torch.cat([held, block], dim=-2)
        ready = int(np.searchsorted(stops, r1, side="right"))  # outputs whose window has fully arrived
        if ready > done:
            rows = after(_pil_rows(held, in_h, out_h, offset=held_top, outputs=(done, ready)))
            if out is None:
                out = torch.empty((*rows.shape[:-2], out_h, rows.shape[-1]), dtype=torch.uint8)
            out[..., done:ready, :] = rows
            done = ready
            if done < out_h:  # keep only what the next outputs read (the next cat copies it)
                keep_from = min(int(starts[done]), r1)
                held = held[..., keep_from - held_top:, :]
                held_top = keep_from
    assert out is not None and done == out_h
    return out
