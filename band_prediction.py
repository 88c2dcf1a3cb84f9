"""Prediction of images too large to hold: band by band from patches read as the grid
needs them, into a class map written as it grows (utils.tiled_writer), with stage 3's pass
over every patch kept for a rerun. predict.py's very large images go this way."""
from __future__ import annotations

import sys
import time
from typing import Any, Callable, ContextManager, Iterator, Optional, Sequence

import torch
from torch import Tensor

from dataset.large_image import LargeImage, RegionView
from dataset.streamed_global import global_image_large
from helper import Session
from models.stages import FirstPass, KeepFirstPass, Stage, first_pass_fits, stream_patch_logits
from utils.files import WriteError
from utils.images import class_dtype
from utils.patches import PatchGrid, merge_argmax_rows
from utils.resample import nearest_indices
from utils.tiled_writer import ClassMapWriter

# Output rows per band of a large image: the band's ids, and the grid rows of patch logits
# over it, are what is held of the map (a band of a 100,000 px wide map: 50 MB of ids).
BAND_ROWS = 512
# Image columns merged at a time within a band (predict_bands): about ten 508-pixel patches.
MERGE_COLUMNS = 4096
# Seconds between saves of stage 3's first pass over a very large image, so that a stopped
# run resumes it instead of starting it again (a slide's pass takes hours on a CPU).
FIRST_PASS_EVERY = 60.0


def predict_bands(
    session: Session, image: Any, global_image: Tensor, band_rows: int, start: int = 0,
    first_pass: Optional[FirstPass] = None, on_first_pass: Optional[KeepFirstPass] = None,
) -> Iterator[tuple[int, Tensor]]:
    """The stage's final prediction of one image (what helper.predict_image gives), band by band
    from output row `start` down: (y0, ids (h, W) of rows y0..y0 + h), bands of band_rows
    rows (the last one shorter), on the session's device. The whole map is never held.

    image: (3, H, W) as helper.predict_image takes it, or anything stream_patch_logits can cut
    patches from (a lazy view of a file); global_image: its global image, (3, Hg, Wg) or
    (1, 3, Hg, Wg). Stage 1 upsamples the global argmax row band by row band. Stages 2 and
    3 merge each band from the grid rows of patches over it as they come from
    stream_patch_logits (rows above the band's top whose patches reach no lower are
    dropped): the same patches in the same order per pixel as merge_argmax over the whole
    grid, so the same sums and tie-breaks. A start past row 0 skips the patches wholly
    above it, except stage 3's first pass, which the global branch needs whole; that pass
    can be kept and resumed (first_pass, on_first_pass: see stream_patch_logits).

    Memory: one band of ids, and the logits of the grid rows that cover it (a grid row:
    W / patch columns of (K, h, w) logits).
    """
    if band_rows < 1:
        raise ValueError(f"band_rows must be at least 1, got {band_rows}")
    height, width = (int(s) for s in image.shape[-2:])
    with torch.inference_mode():
        # An inference tensor, as helper.predict_image's global images are: compiled networks
        # (--compile) guard on the kind, and then one graph serves both paths.
        global_image = global_image.to(session.device).clone()
    global_image = global_image if global_image.dim() == 4 else global_image[None]
    if session.stage is Stage.GLOBAL:
        with torch.inference_mode(), session.autocast():
            logits = session.model.global_branch(global_image).logits[0]
            small = logits.argmax(0).to(class_dtype(logits.shape[0]))
        wide = small.index_select(1, nearest_indices(width, small.shape[1], small.device))
        rows = nearest_indices(height, small.shape[0], small.device)
        for y0 in range(start, height, band_rows):
            yield y0, wide.index_select(0, rows[y0 : y0 + band_rows])
        return
    if start >= height:
        return
    grid = PatchGrid.build((height, width), session.size_p)
    patch_h = grid.patch_size[0]
    first = grid.first_row_reaching(start)
    stream = stream_patch_logits(session.stage, session.model, image, global_image, grid,
                                 frozen_global=session.frozen_global, micro_batch_size=session.micro_batch,
                                 start_row=first, on_patches=session.after_pass, first_pass=first_pass,
                                 on_first_pass=on_first_pass)
    del first_pass  # the stream lets go of it once copied
    kept: dict[int, Tensor] = {}
    y0 = start
    for row, logits in _each_under(session.autocast, stream):
        kept[row] = logits
        final = grid.tops[row + 1] if row + 1 < grid.n_rows else height  # rows above it have all their patches
        while y0 < height and min(y0 + band_rows, height) <= final:
            y1 = min(y0 + band_rows, height)
            yield y0, merge_argmax_rows(kept, grid, y0, y1, MERGE_COLUMNS)
            y0 = y1
            for done in [r for r in kept if grid.tops[r] + patch_h <= y0]:
                del kept[done]


def band_patch_count(session: Session, size: Sequence[int], start: int = 0, first_pass_done: int = 0) -> int:
    """Patches predict_bands passes through the local branch for an image of `size` (H, W)
    from output row `start`: the rows of patches over rows start.., and in stage 3 also the
    first pass over every patch, less the patches a kept one had added (first_pass_done,
    from kept_first_pass). 0 for stage 1 (no patches) or a start past the image."""
    if session.stage is Stage.GLOBAL or start >= size[0]:
        return 0
    grid = PatchGrid.build(tuple(size), session.size_p)
    kept = (grid.n_rows - grid.first_row_reaching(start)) * grid.n_cols
    return kept + len(grid) - first_pass_done if session.stage is Stage.LOCAL2GLOBAL else kept


def kept_first_pass(session: Session, writer: ClassMapWriter) -> Optional[FirstPass]:
    """Stage 3's first pass over the image of `writer` as a stopped run kept it in the
    writer's partial store (see predict_large), where it can resume on this session's
    patch grid and micro-batches; else None."""
    state = writer.saved_state() if session.stage is Stage.LOCAL2GLOBAL else None
    if state is None or not isinstance(state.get("first_pass"), list) or not isinstance(state.get("done"), int):
        return None
    buffers, done = state["first_pass"], state["done"]
    grid = PatchGrid.build((writer.height, writer.width), session.size_p)
    fits = all(isinstance(b, Tensor) for b in buffers) and first_pass_fits(done, grid, session.micro_batch)
    return (buffers, done) if fits else None


def _keeping_first_pass(writer: ClassMapWriter) -> KeepFirstPass:
    """on_first_pass for predict_bands: saves the pass into the writer's partial store every
    FIRST_PASS_EVERY seconds, and when it ends if it took that long (a shorter one is
    quicker to redo than to save). A save that fails (a full disk) is said once and the
    pass goes on: it only costs the resume."""
    start = last = time.monotonic()
    failed = False

    def keep(buffers: Sequence[Tensor], done: int, total: int) -> None:
        nonlocal last, failed
        now = time.monotonic()
        due = now - last >= FIRST_PASS_EVERY or (done == total and now - start >= FIRST_PASS_EVERY)
        if failed or not due:
            return
        try:
            writer.save_state({"first_pass": [b.detach().cpu() for b in buffers], "done": done})
        except WriteError as error:
            failed = True
            print(f"warning: {error}; the pass over every patch is not kept for a rerun", file=sys.stderr)
        last = time.monotonic()

    return keep


def predict_large(session: Session, image: LargeImage, writer: ClassMapWriter, *, exact_global: bool = False,
                  band_rows: Optional[int] = None, on_band: Optional[Callable[[int], None]] = None) -> None:
    """Predict a large image into `writer` band by band, from the row it has done on (a
    writer that resumed a partial store continues there). The global image comes from the
    pyramid level global_image_large picks, or from full resolution (exact_global, equal
    to helper.predict_image's); patches are read from the file as they are cut. band_rows: None
    for BAND_ROWS. on_band: told the rows of each band written. Stage 3's first pass over
    every patch, which writes no band, is kept in the writer's partial store as it goes,
    and resumed from there (kept_first_pass).

    Memory: the global image, one band of ids, the grid rows of logits over it, the patches
    of a pass, the reader's tile cache; nothing that grows with the image's height.
    """
    glob = global_image_large(image, session.size_g, exact=exact_global)
    view = RegionView(image, session.device)
    keep = _keeping_first_pass(writer) if session.stage is Stage.LOCAL2GLOBAL else None
    for _, band in predict_bands(session, view, glob, band_rows or BAND_ROWS, start=writer.rows_done,
                                 first_pass=kept_first_pass(session, writer), on_first_pass=keep):
        writer.write_band(band.cpu().numpy())
        if on_band is not None:
            on_band(band.shape[0])


def _each_under(context: Callable[[], ContextManager], items: Iterator[Any]) -> Iterator[Any]:
    """items, each made inside a fresh context(): a context held across a generator's
    yields would be in force in its consumer too."""
    while True:
        with context():
            item = next(items, _END)
        if item is _END:
            return
        yield item


_END = object()
