"""Streamed prediction of very large images: the engine's grid rows (models.stages.stream_patch_logits)
against run_stage, and band_prediction.predict_bands against helper.predict_image.

CPU, ResNet-18 with rule weights, a 150 x 230 image cut into 80-pixel patches (4 x 6).
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import band_prediction
import helper
from dataset.classes import DEEPGLOBE
from dataset.transforms import global_image
from models.glnet import GLNet, GlobalBranch
from models.stages import Batch, Stage, run_stage, set_branch_modes, stream_patch_logits
from utils.files import WriteError
from utils.patches import PatchGrid
from utils.weight_rule import apply_rule_weights

SIZE = (150, 230)
SIZE_G, SIZE_P = (64, 64), (80, 80)


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    rng = np.random.default_rng(0)
    return torch.from_numpy(rng.integers(0, 256, (*SIZE, 3), dtype=np.uint8)).permute(2, 0, 1).contiguous()


@pytest.fixture(scope="module")
def networks() -> tuple[GLNet, GlobalBranch]:
    model, frozen = GLNet(DEEPGLOBE.n_class, "resnet18"), GlobalBranch(DEEPGLOBE.n_class, "resnet18")
    apply_rule_weights(model, 0)
    apply_rule_weights(frozen, 1)
    set_branch_modes(model, Stage.LOCAL2GLOBAL, training=False)
    return model, frozen.eval()


def session(networks, mode: int, micro_batch: int = 1) -> helper.Session:
    model, frozen = networks
    return helper.Session(Stage(mode), model, frozen, DEEPGLOBE, SIZE_G, SIZE_P, micro_batch, 0.15,
                          torch.device("cpu"), micro_batch_size=micro_batch)


@pytest.mark.parametrize("micro_batch", [1, 3])
@pytest.mark.parametrize("mode", [2, 3])
def test_streamed_rows_are_run_stages_ensemble(networks, image, mode, micro_batch):
    model, frozen = networks
    grid = PatchGrid.build(SIZE, SIZE_P)
    glob = global_image(image, SIZE_G)[None]
    with torch.inference_mode():
        expected = run_stage(Stage(mode), model, Batch([image], glob), patch_size=SIZE_P, sub_batch_size=micro_batch,
                             frozen_global=frozen, micro_batch_size=micro_batch).images[0].ensemble_logits
    counted = []
    rows = list(stream_patch_logits(Stage(mode), model, image, glob, grid, frozen_global=frozen,
                                    micro_batch_size=micro_batch, on_patches=counted.append))
    assert [r for r, _ in rows] == list(range(grid.n_rows))
    assert all(logits.shape[0] == grid.n_cols for _, logits in rows)
    torch.testing.assert_close(torch.cat([logits for _, logits in rows]), expected)
    assert sum(counted) == len(grid) * (mode - 1)  # stage 3 passes over the patches twice
    later = list(stream_patch_logits(Stage(mode), model, image, glob, grid, frozen_global=frozen,
                                     micro_batch_size=micro_batch, start_row=1))
    assert [r for r, _ in later] == list(range(1, grid.n_rows))
    torch.testing.assert_close(torch.cat([logits for _, logits in later]), expected[grid.n_cols:])


def test_stage_1_has_no_rows(networks, image):
    with pytest.raises(ValueError, match="stage 1"):
        next(stream_patch_logits(Stage.GLOBAL, networks[0], image, global_image(image, SIZE_G)[None],
                                 PatchGrid.build(SIZE, SIZE_P)))


@pytest.mark.parametrize("mode", [1, 2, 3])
def test_bands_stack_to_predict_image(networks, image, mode, monkeypatch):
    """Exactly equal: with one patch per pass the patch logits are run_stage's to the bit, and
    each band merges its pixels' patches in the same order. The engine runs once; its rows
    are replayed for each band height (the test above holds start_row to the engine)."""
    s = session(networks, mode)
    whole = helper.predict_image(s, image)
    glob = global_image(image, SIZE_G)
    replayed: list = []
    if mode > 1:
        rows = list(stream_patch_logits(Stage(mode), s.model, image, glob[None], PatchGrid.build(SIZE, SIZE_P),
                                         frozen_global=s.frozen_global))
        monkeypatch.setattr(band_prediction, "stream_patch_logits",
                            lambda *a, start_row, **k: replayed.append(start_row) or iter(rows[start_row:]))
    # Bands of several heights, merged in pieces of several widths (one column, a piece
    # edge inside a patch, the whole width).
    for band_rows, columns in [(1, 4096), (7, 4096), (64, 4096), (150, 4096), (500, 4096), (7, 37), (64, 1),
                               (500, 100)]:
        monkeypatch.setattr(band_prediction, "MERGE_COLUMNS", columns)
        bands = list(band_prediction.predict_bands(s, image, glob, band_rows))
        assert [y0 for y0, _ in bands] == list(range(0, SIZE[0], band_rows))
        assert all(band.shape == (min(band_rows, SIZE[0] - y0), SIZE[1]) for y0, band in bands)
        assert torch.equal(torch.cat([band for _, band in bands]), whole), (band_rows, columns)
    for start in (1, 61, 149):  # resuming: the bands from an output row on
        bands = list(band_prediction.predict_bands(s, image, glob, 32, start=start))
        assert bands[0][0] == start
        assert torch.equal(torch.cat([band for _, band in bands]), whole[start:]), start
    assert list(band_prediction.predict_bands(s, image, glob, 32, start=SIZE[0])) == []
    if mode > 1:  # grid rows at tops 0, 23, 47, 70 of 80-row patches: row 61 needs them all, 149 the last
        assert replayed == [0] * 8 + [0, 0, 3]


@pytest.mark.parametrize("mode, start, patches", [
    (1, 0, 0),
    (2, 0, 24), (2, 61, 24), (2, 149, 6), (2, 150, 0),  # tops 0, 23, 47, 70 of 80 rows; 6 columns
    (3, 0, 48), (3, 149, 30),  # stage 3 first passes over all 24, whatever the start
])
def test_band_patch_count_is_what_the_bands_pass_through(networks, image, mode, start, patches, monkeypatch):
    """What predict.py's patch bar counts to: the patches predict_bands reports, run for real;
    on the CPU each pass is followed by a trim of the heap."""
    s = session(networks, mode)
    assert band_prediction.band_patch_count(s, SIZE, start) == patches
    if start in (0, 149) and mode > 1:
        counted: list = []
        s.on_patches = counted.append
        monkeypatch.setattr(helper, "release_free_heap", lambda: counted.append("trim"))
        list(band_prediction.predict_bands(s, image, global_image(image, SIZE_G), 64, start=start))
        assert sum(n for n in counted if n != "trim") == patches
        assert counted[1::2] == ["trim"] * len(counted[::2]) and "trim" not in counted[::2]


@pytest.mark.parametrize("micro_batch, fast", [(1, False), (3, False), (3, True)], ids=["1", "3", "3-bf16-nhwc"])
def test_stage_3s_first_pass_kept_part_way_resumes_to_the_same_rows(networks, image, micro_batch, fast):
    """Kept after any micro-batch and resumed there, the first pass adds the rest of the
    patches in the same order: the rows are those of an uninterrupted pass to the bit (in
    bf16 with channels-last maps too), and only the patches it had not added go through the
    local branch again."""
    model, frozen = networks
    if fast:
        model, frozen = (copy.deepcopy(net).to(memory_format=torch.channels_last) for net in networks)
    grid = PatchGrid.build(SIZE, SIZE_P)
    glob = global_image(image, SIZE_G)[None]
    kept = []

    def keep(buffers, done, total):
        assert total == len(grid)
        kept.append(([b.clone() for b in buffers], done))

    with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=fast):
        expected = list(stream_patch_logits(Stage.LOCAL2GLOBAL, model, image, glob, grid, frozen_global=frozen,
                                            micro_batch_size=micro_batch, on_first_pass=keep))
        assert not fast or kept[0][0][0].dtype == torch.bfloat16
        assert [done for _, done in kept] == [idx.stop for idx in grid.batches(micro_batch)]
        # One that ends where no micro-batch ends, or has other buffers, is ignored: a whole pass.
        for first_pass, fits in ((kept[2], True), (kept[-1], True), ((kept[2][0], len(grid) + 1), False),
                                 (([], kept[2][1]), False)):
            counted: list = []
            rows = list(stream_patch_logits(Stage.LOCAL2GLOBAL, model, image, glob, grid, frozen_global=frozen,
                                            micro_batch_size=micro_batch, on_patches=counted.append,
                                            first_pass=first_pass))
            assert [r for r, _ in rows] == [r for r, _ in expected]
            assert all(torch.equal(a, b) for (_, a), (_, b) in zip(rows, expected))
            assert sum(counted) == 2 * len(grid) - (first_pass[1] if fits else 0)


def test_the_first_pass_is_kept_each_minute_and_a_failed_save_costs_only_the_resume(monkeypatch, capsys):
    now = [0.0]
    monkeypatch.setattr(band_prediction.time, "monotonic", lambda: now[0])
    saved: list = []

    class Writer:
        full = False

        def save_state(self, state):
            if self.full:
                raise WriteError("x: cannot write (No space left on device)")
            saved.append(state["done"])

    def run(writer, steps):
        now[0] = 0.0
        keep = band_prediction._keeping_first_pass(writer)
        for t, done in steps:
            now[0] = t
            keep([torch.zeros(2)], done, 4)

    writer = Writer()
    run(writer, [(30, 1), (61, 2), (90, 3), (125, 4)])
    assert saved == [2, 4]  # a minute after the start, and at the end of a pass that took over a minute
    run(writer, [(10, 4)])
    assert saved == [2, 4]  # a pass of seconds is quicker to redo than to save
    writer.full = True
    run(writer, [(61, 1), (130, 2), (200, 4)])  # no exception: the pass goes on
    assert capsys.readouterr().err.count("the pass over every patch is not kept for a rerun") == 1
