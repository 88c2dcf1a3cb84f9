"""Patch grid, extraction, feature crops and merging (utils/patches.py), and the
resampling rules they rest on (utils/resample.py).

Golden values come from the reference fixtures (the authors' own grid function); the
rest are properties any correct tiling has, checked over many sizes.
"""
from __future__ import annotations

import csv
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from PIL import Image

from bench.op_count import OpCount
from conftest import DEVICES, FIXTURES
from parity import merged_scores
from utils.patches import (
    MIN_OVERLAP,
    PatchGrid,
    axis_origins,
    coverage_on_map,
    crop_sampled,
    crop_to_patches,
    extract_patches,
    merge_argmax,
    merge_argmax_rows,
    merge_logits,
    paste_patches,
    sampling_plan,
    upsample_argmax,
    _box_units,
)
from utils.resample import nearest_indices, pil_nearest_indices, resize, resize_labels


def _read_tsv(name: str) -> list[dict[str, str]]:
    with open(FIXTURES / name, newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


PATCH_INFO = _read_tsv("patch_info.tsv")

# (H, W, p): square and non-square, sides below, at and just above p, large and odd sizes.
GRID_CASES = [
    (600, 600, 256), (2448, 2448, 508), (300, 420, 160), (200, 260, 96), (257, 1000, 256),
    (100, 100, 256), (256, 256, 256), (80, 300, 96), (300, 80, 96), (509, 508, 508),
    (1001, 777, 128), (5000, 3001, 508), (51 + 1, 999, 51), (2448, 1224, 300), (97, 1537, 96),
]


# --------------------------------------------------------------------------- golden grids


def test_golden_grid_2448_508():
    rows = _read_tsv("global2patch_2448_508.tsv")
    grid = PatchGrid.build((2448, 2448), (508, 508))
    assert len(grid) == len(rows) == 36
    assert (grid.n_rows, grid.n_cols) == (6, 6)
    assert grid.patch_size == (508, 508)
    # Step 388: the origins are whole multiples of it.
    assert grid.tops == grid.lefts == tuple(388 * i for i in range(6))
    for row in rows:
        i = int(row["index"])
        assert (i // grid.n_cols, i % grid.n_cols) == (int(row["row"]), int(row["col"]))
        top, left = grid.origin(i)
        assert (top, left) == (int(row["top_px"]), int(row["left_px"]))
        assert (int(row["height_px"]), int(row["width_px"])) == grid.patch_size
        # The fractions the authors carried, bit for bit.
        assert top / 2448 == float(row["top_frac"])
        assert left / 2448 == float(row["left_frac"])


@pytest.mark.parametrize("row", PATCH_INFO, ids=[f"{r['x']}-{r['p']}" for r in PATCH_INFO])
def test_patch_info_row(row):
    x, p = int(row["x"]), int(row["p"])
    error = row["error"]
    if error.startswith("NoReturn"):
        # The authors loop forever for p <= 50; we refuse with a clear message.
        with pytest.raises(ValueError, match="too small"):
            axis_origins(x, p)
        with pytest.raises(ValueError):
            PatchGrid.build((x, x), (p, p))
        return
    origins, extent = axis_origins(x, p)
    grid = PatchGrid.build((x, x), (p, p))
    if error.startswith("ZeroDivisionError"):
        # Documented behaviour where the authors divide by zero (side <= patch): one patch
        # that shrinks to the side.
        assert x <= p
        assert (origins, extent) == ((0,), x)
        assert len(grid) == 1 and grid.patch_size == (x, x) and grid.origin(0) == (0, 0)
        return
    assert not error
    n, m, step = int(row["n"]), int(row["m"]), float(row["step_x"])
    assert len(origins) == n and extent == p
    assert (grid.n_rows, grid.n_cols) == (n, m)
    assert (x - p) / (n - 1) == step  # the same float step as the authors'
    assert origins == tuple(round(i * step) for i in range(n - 1)) + (x - p,)


# --------------------------------------------------------------------------- grid properties


def _brute_coverage(grid: PatchGrid) -> np.ndarray:
    cov = np.zeros(grid.image_size, dtype=np.int64)
    ph, pw = grid.patch_size
    for top, left in grid.origins():
        cov[top : top + ph, left : left + pw] += 1
    return cov


@pytest.mark.parametrize("h, w, p", GRID_CASES)
def test_grid_covers_everything(h, w, p):
    grid = PatchGrid.build((h, w), (p, p))
    ph, pw = grid.patch_size
    assert (ph, pw) == (min(h, p), min(w, p))
    cov = grid.coverage()
    assert cov.shape == (h, w)
    expected = _brute_coverage(grid)
    assert (expected >= 1).all()
    assert np.array_equal(cov.numpy(), expected)
    # Where no two patches overlap, every pixel is covered exactly once.
    if grid.n_rows == 1 and grid.n_cols == 1:
        assert (cov == 1).all()
    # Row-major patch order.
    assert grid.origins() == [(t, l) for t in grid.tops for l in grid.lefts]


@pytest.mark.parametrize("h, w, p", GRID_CASES)
def test_grid_axis_rules(h, w, p):
    grid = PatchGrid.build((h, w), (p, p))
    for origins, extent, length in ((grid.tops, grid.patch_size[0], h), (grid.lefts, grid.patch_size[1], w)):
        assert origins[0] == 0
        assert origins[-1] == length - extent  # last patch flush with the end
        assert all(b > a for a, b in zip(origins, origins[1:]))
        # Neighbours overlap by at least MIN_OVERLAP px.
        assert all(a + extent - b >= MIN_OVERLAP for a, b in zip(origins, origins[1:]))
        n = len(origins)
        if n > 1:
            # n is the smallest count satisfying both rules: one patch fewer fails one of them.
            fewer = n - 1
            too_few = fewer * extent < length
            assert too_few or extent - (length - extent) / (fewer - 1) < MIN_OVERLAP


def test_one_patch_per_short_side():
    grid = PatchGrid.build((80, 300), (96, 96))
    assert grid.n_rows == 1 and grid.tops == (0,)
    assert grid.patch_size == (80, 96)
    image = torch.arange(80 * 300, dtype=torch.float32).reshape(1, 80, 300)
    patches = extract_patches(image, grid, range(len(grid)))
    assert patches.shape == (grid.n_cols, 1, 80, 96)


def test_batches_cover_indices_in_order():
    grid = PatchGrid.build((600, 600), (256, 256))
    assert [list(r) for r in grid.batches(4)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8]]
    for size in (1, 2, 5, 9, 100):
        assert list(itertools.chain(*grid.batches(size))) == list(range(len(grid)))
        assert all(1 <= len(r) <= size for r in grid.batches(size))
    with pytest.raises(ValueError):
        grid.batches(0)


# --------------------------------------------------------------------------- extraction and merging


@pytest.mark.parametrize("h, w, p", [(600, 600, 256), (300, 420, 160), (80, 300, 96), (257, 509, 128)])
def test_extract_then_merge_round_trip(h, w, p):
    grid = PatchGrid.build((h, w), (p, p))
    x = torch.randn(3, h, w, dtype=torch.float64, generator=torch.Generator().manual_seed(h * w))
    patches = extract_patches(x, grid, range(len(grid)))
    assert patches.shape == (len(grid), 3, *grid.patch_size)
    for i, (top, left) in enumerate(grid.origins()):
        assert torch.equal(patches[i], x[:, top : top + grid.patch_size[0], left : left + grid.patch_size[1]])
    # Logits at patch resolution: merge sums the overlaps; dividing by coverage gives x back.
    merged = merge_logits(patches, grid)
    assert merged.shape == x.shape
    torch.testing.assert_close(merged / grid.coverage().double(), x, rtol=1e-12, atol=1e-12)


def test_extract_labels_keeps_dtype():
    grid = PatchGrid.build((200, 260), (96, 96))
    label = torch.randint(0, 7, (200, 260), dtype=torch.uint8)
    patches = extract_patches(label, grid, [0, 5, len(grid) - 1])
    assert patches.shape == (3, 96, 96) and patches.dtype == torch.uint8
    top, left = grid.origin(len(grid) - 1)
    assert torch.equal(patches[2], label[top:, left:])


MERGE_CASES = [
    (600, 600, 256, 64, torch.float64),
    (300, 420, 160, 40, torch.float32),
    (257, 509, 130, 33, torch.float32),
    (200, 260, 60, 15, torch.float32),  # up to 6 x 6 patches over one pixel
    (2448, 700, 508, 127, torch.bfloat16),
    (90, 300, 96, 24, torch.float32),  # one patch shrunk to the image's height
]


@pytest.mark.parametrize("h, w, p, cells, dtype", MERGE_CASES)
def test_merge_logits_is_the_patch_by_patch_sum_to_the_bit(h, w, p, cells, dtype):
    """Layer by layer, every pixel still receives its terms in patch order: the sums are the
    same floating-point numbers, not merely close ones."""
    grid = PatchGrid.build((h, w), (p, p))
    logits = torch.randn(len(grid), 5, cells, cells + 1, generator=torch.Generator().manual_seed(h + w)).to(dtype)
    merged = merge_logits(logits, grid)
    assert merged.shape == (5, h, w) and merged.dtype == torch.float64
    assert torch.equal(merged, merged_scores(logits, grid))
    # Working in bands of five rows, or of one (a band starting at every row), changes nothing.
    for band_bytes in (5 * w * 4 * 2 * 7, 1):
        assert torch.equal(merge_logits(logits, grid, max_band_bytes=band_bytes), merged)


def test_merge_argmax_decides_near_ties_as_the_authors_float64_sums():
    """Where two patches overlap, class 1 leads class 0 by less than float32 can hold: summed
    in float32 both would round to 1.0 and the tie go to class 0; the authors' float64
    canvas keeps class 1 ahead."""
    grid = PatchGrid.build((100, 150), (100, 100))  # two patches sharing columns 50..99
    logits = torch.ones(len(grid), 2, 25, 25)
    logits[1, 0] = 2.0**-25
    logits[1, 1] = 2.0**-24
    assert (logits[0, 1] + logits[1, 1] == logits[0, 0] + logits[1, 0]).all()  # tied in float32
    expected = merged_scores(logits, grid).argmax(0)
    assert (expected[:, 50:100] == 1).all()
    assert torch.equal(merge_argmax(logits, grid).long(), expected)


def test_merge_costs_the_same_operators_however_many_patches():
    """Each operator costs the host time on a GPU: merging gathers one cover layer at a
    time, so 9 patches and 121 cost the same number of operators."""
    def calls(size, patch):
        grid = PatchGrid.build((size, size), (patch, patch))
        logits = torch.randn(len(grid), 7, 16, 16)
        merge_argmax(logits, grid, max_band_bytes=1 << 40)  # the first call makes the layers
        with OpCount() as count:
            merge_argmax(logits, grid, max_band_bytes=1 << 40)
        return len(grid), count.calls

    (few, few_calls), (many, many_calls) = calls(600, 256), calls(5000, 508)
    assert (few, many) == (9, 121)
    assert few_calls == many_calls <= 40


@pytest.mark.parametrize("max_band_bytes", [1, 1000, 7 * 420 * 4 * 13, 64 << 20])
def test_merge_argmax_in_bands_equals_full_argmax(max_band_bytes):
    grid = PatchGrid.build((300, 420), (160, 160))
    logits = torch.randn(len(grid), 7, 40, 40, generator=torch.Generator().manual_seed(1))
    expected = merge_logits(logits, grid).argmax(0)
    pred = merge_argmax(logits, grid, max_band_bytes=max_band_bytes)
    assert pred.dtype == torch.uint8 and pred.shape == (300, 420)
    assert torch.equal(pred.long(), expected)


@pytest.mark.parametrize("h, w, p, cells", [(600, 700, 256, 64), (257, 509, 130, 33), (200, 260, 60, 15), (90, 300, 96, 24)])
def test_a_band_merged_from_its_grid_rows_is_that_band_of_the_authors_merge(h, w, p, cells):
    """Whatever the band and the columns merged at a time: the rows of the authors' float64
    canvas, argmax's ties included, from the logits of the grid rows over the band alone
    (plus rows above it, as a caller that has not dropped them yet holds)."""
    grid = PatchGrid.build((h, w), (p, p))
    logits = torch.randn(len(grid), 5, cells, cells, generator=torch.Generator().manual_seed(h * w)).round()
    expected = merged_scores(logits, grid).argmax(0)
    by_row = logits.view(grid.n_rows, grid.n_cols, *logits.shape[1:])
    ph = grid.patch_size[0]
    for y0, y1 in ((0, h), (0, 1), (h - 1, h), (h // 3, min(h, h // 3 + 37)), (ph - 1, min(h, ph + 1))):
        first = next(r for r in range(grid.n_rows) if grid.tops[r] + grid.patch_size[0] > y0)  # brute force
        assert grid.first_row_reaching(y0) == first
        held = {r: by_row[r] for r in range(max(0, first - 1), grid.n_rows) if grid.tops[r] < y1}
        for columns in (w, 7, p - 1):
            band = merge_argmax_rows(held, grid, y0, y1, columns)
            assert band.dtype == torch.uint8 and torch.equal(band.long(), expected[y0:y1]), (y0, y1, columns)


def test_class_maps_are_bytes_up_to_256_classes():
    grid = PatchGrid.build((100, 120), (96, 96))
    for k, dtype in ((2, torch.uint8), (256, torch.uint8), (257, torch.long)):
        logits = torch.randn(len(grid), k, 24, 24)
        logits[:, -1] += 100.0  # the last class wins everywhere
        for pred in (merge_argmax(logits, grid), upsample_argmax(logits[0], (100, 120))):
            assert pred.dtype == dtype and int(pred.min()) == int(pred.max()) == k - 1


def test_upsample_argmax_equals_argmax_of_nearest_upsampling():
    logits = torch.randn(7, 64, 48)
    for size in ((600, 600), (257, 131), (64, 48), (2448, 1000)):
        expected = F.interpolate(logits[None], size=size, mode="nearest")[0].argmax(0)
        assert torch.equal(upsample_argmax(logits, size).long(), expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtype_and_device_preserved(device, dtype):
    grid = PatchGrid.build((300, 420), (160, 160))
    idx = range(len(grid))
    image = torch.rand(3, 300, 420, dtype=dtype, device=device)
    patches = extract_patches(image, grid, idx)
    logits = torch.randn(len(grid), 4, 40, 40, dtype=dtype, device=device)
    fmap = torch.randn(1, 8, 10, 13, dtype=dtype, device=device)
    canvas = torch.zeros(1, 8, 10, 13, dtype=dtype, device=device)
    merged = merge_logits(logits, grid)
    assert merged.dtype == torch.float64 and merged.device.type == device  # the authors' sums
    outputs = {
        "extract_patches": patches,
        "crop_to_patches": crop_to_patches(fmap, grid, idx, (5, 5)),
        "paste_patches": paste_patches(canvas, torch.randn(len(grid), 8, 5, 5, dtype=dtype, device=device), grid, idx),
    }
    for name, out in outputs.items():
        assert out.dtype == dtype and out.device.type == device, name
    for name, out in {"merge_argmax": merge_argmax(logits, grid), "upsample_argmax": upsample_argmax(logits[0], (300, 420))}.items():
        assert out.dtype == torch.uint8 and out.device.type == device, name
    cov = coverage_on_map(grid, (10, 13), torch.device(device))
    assert cov.shape == (1, 1, 10, 13) and cov.device.type == device
    labels = torch.randint(0, 7, (2, 300, 420), device=device, dtype=torch.uint8)
    resized = resize_labels(labels, (75, 105))
    assert resized.dtype == torch.uint8 and resized.device.type == device and resized.shape == (2, 75, 105)


# --------------------------------------------------------------------------- feature-map crops


@pytest.mark.parametrize("h, w, p", GRID_CASES[:10] + [(768, 768, 96), (10000, 10000, 508)])
def test_cell_box_stays_on_the_map(h, w, p):
    grid = PatchGrid.build((h, w), (p, p))
    # Boxes are separable: checking every row origin in column 0 and every column origin
    # in row 0 covers every patch.
    indices = [r * grid.n_cols for r in range(grid.n_rows)] + list(range(grid.n_cols))
    for hf, wf in [(1, 1), (2, 3), (4, 4), (8, 8), (16, 5), (33, 65), (127, 127)]:
        for i in indices:
            t, l, bh, bw = grid.cell_box(i, (hf, wf))
            assert 0 <= t and t + bh <= hf and bh >= 1, (i, hf, (t, l, bh, bw))
            assert 0 <= l and l + bw <= wf and bw >= 1, (i, wf, (t, l, bh, bw))


def test_crop_on_a_map_smaller_than_one_cell_per_patch():
    # Regression: the last patch of a 768 px image in 96 px patches starts at 672, and
    # round(672 / 768 * 4) = 4 is one past a 4-cell map.
    grid = PatchGrid.build((768, 768), (96, 96))
    fmap = torch.randn(1, 3, 4, 4)
    crops = crop_to_patches(fmap, grid, range(len(grid)), (2, 2))
    assert crops.shape == (len(grid), 3, 2, 2) and torch.isfinite(crops).all()
    canvas = paste_patches(torch.zeros(1, 3, 4, 4), torch.ones(len(grid), 3, 2, 2), grid, range(len(grid)))
    assert (canvas > 0).any()


def test_parity_crops():
    # docs/authors_behaviour.md, section 7.5: for the parity run the 8x8 c5 map gets 3x3 crops at rows/cols 0, 2, 5.
    grid = PatchGrid.build((600, 600), (256, 256))
    fmap = torch.arange(2 * 8 * 8, dtype=torch.float32).reshape(1, 2, 8, 8)
    crops = crop_to_patches(fmap, grid, range(len(grid)), (3, 3))
    for i, (r, c) in enumerate(itertools.product((0, 2, 5), repeat=2)):
        assert grid.cell_box(i, (8, 8)) == (r, c, 3, 3)
        assert torch.equal(crops[i], fmap[0, :, r : r + 3, c : c + 3])
    # A crop resized to another size is the bilinear resize of that crop.
    big = crop_to_patches(fmap, grid, [4], (16, 16))
    expected = F.interpolate(fmap[:, :, 2:5, 2:5], size=(16, 16), mode="bilinear", align_corners=False)
    torch.testing.assert_close(big, expected, rtol=0, atol=0)


def test_paste_adds_each_patch_at_its_box():
    grid = PatchGrid.build((600, 600), (256, 256))
    maps = torch.rand(len(grid), 2, 3, 3)
    canvas = paste_patches(torch.zeros(1, 2, 8, 8), maps, grid, range(len(grid)))
    expected = torch.zeros(1, 2, 8, 8)
    for i, (r, c) in enumerate(itertools.product((0, 2, 5), repeat=2)):
        expected[0, :, r : r + 3, c : c + 3] += maps[i]
    torch.testing.assert_close(canvas, expected, rtol=0, atol=1e-7)


# Grids, map sizes and patch sets for crops and pastes: boxes cut short at a map's edge (up
# to four box sizes), patches overlapping beyond their neighbours (160 px in 100 px patches: three
# per axis, 30 px apart), micro-batches across rows, and every patch at once.
BOX_CASES = [
    ((2448, 2448), 508, (127, 127), range(6)),
    ((2448, 2448), 508, (16, 16), range(36)),
    ((600, 600), 256, (8, 8), range(9)),
    ((300, 420), 160, (10, 13), [1, 3, 4]),
    ((257, 509), 128, (33, 65), range(2, 9)),
    ((160, 160), 100, (20, 20), range(9)),
    ((160, 160), 100, (5, 5), [0, 2, 6, 8, 4]),
    ((5000, 3001), 508, (32, 19), range(10, 30)),
    ((768, 768), 96, (4, 4), range(64)),
    ((512, 512), 256, (7, 7), range(9)),  # boxes of 4 x 4, 4 x 3, 3 x 4 and 3 x 3
    ((512, 512), 256, (7, 7), [8, 0, 4, 5]),
]


def _boxes(grid, indices, map_size):
    return [grid.cell_box(i, map_size) for i in indices]


@pytest.mark.parametrize("image, p, map_size, indices", BOX_CASES)
@pytest.mark.parametrize("disjoint", [False, True])
def test_box_units_partition_the_patches(image, p, map_size, indices, disjoint):
    grid = PatchGrid.build(image, (p, p))
    units = _box_units(grid, tuple(indices), map_size, torch.device("cpu"), disjoint)
    boxes = _boxes(grid, indices, map_size)
    seen = []
    for unit in units:
        members = torch.arange(len(indices))[unit.picks].tolist()
        seen += members
        assert unit.single == ((members[0], *boxes[members[0]][:2]) if len(members) == 1 else None)
        expected_cells = []
        for t, l, h, w in (boxes[k] for k in members):
            assert unit.size == (h, w)
            expected_cells += [y * map_size[1] + x for y in range(t, t + h) for x in range(l, l + w)]
        assert unit.cells.tolist() == expected_cells
        if disjoint:
            cells = [(y, x) for k in members for y in range(boxes[k][0], boxes[k][0] + boxes[k][2])
                     for x in range(boxes[k][1], boxes[k][1] + boxes[k][3])]
            assert len(cells) == len(set(cells)), "boxes of a disjoint unit share a cell"
    assert sorted(seen) == list(range(len(indices)))
    if not disjoint:
        assert len(units) == len({b[2:] for b in boxes})


@pytest.mark.parametrize("image, p, map_size, indices", BOX_CASES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_crop_equals_slicing_each_box(image, p, map_size, indices, channels_last):
    grid = PatchGrid.build(image, (p, p))
    fmap = torch.randn(1, 5, *map_size)
    if channels_last:
        fmap = fmap.contiguous(memory_format=torch.channels_last)
    for size in ((7, 9), grid.cell_box(indices[0], map_size)[2:]):
        expected = torch.cat([F.interpolate(fmap[:, :, t : t + h, l : l + w], size=size, mode="bilinear",
                                            align_corners=False) if (h, w) != tuple(size)
                              else fmap[:, :, t : t + h, l : l + w] for t, l, h, w in _boxes(grid, indices, map_size)])
        crops = crop_to_patches(fmap, grid, indices, size)
        assert torch.equal(crops, expected), size
        # In the map's layout, so a channels-last head joins crops and own maps as they are.
        layout = torch.channels_last if channels_last else torch.contiguous_format
        assert crops.is_contiguous(memory_format=layout), size
        assert channels_last or crops.stride() == torch.empty(crops.shape).stride(), size


@pytest.mark.parametrize("image, p, map_size, indices", BOX_CASES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_sampled_crop_is_the_bilinear_resize_of_each_box_and_its_plan_ignores_the_boxes(image, p, map_size, indices,
                                                                                        channels_last):
    grid = PatchGrid.build(image, (p, p))
    layout = torch.channels_last if channels_last else torch.contiguous_format
    fmap = torch.randn(1, 5, *map_size).contiguous(memory_format=layout)
    for size in ((7, 9), (31, 31), grid.cell_box(indices[0], map_size)[2:]):
        plan = sampling_plan(grid, tuple(indices), map_size, size, torch.device("cpu"))
        # Its shapes depend on the patches' number and the output size only.
        assert [tuple(t.shape) for t in plan] == 4 * [(len(indices), size[0])] + 4 * [(len(indices), size[1])]
        expected = torch.cat([F.interpolate(fmap[:, :, t : t + h, l : l + w], size=size, mode="bilinear",
                                            align_corners=False) for t, l, h, w in _boxes(grid, indices, map_size)])
        crops = crop_sampled(fmap, plan)
        torch.testing.assert_close(crops, expected, rtol=1e-5, atol=1e-5)  # float rounding in another order
        assert crops.is_contiguous(memory_format=layout)
    half = crop_sampled(fmap.bfloat16(), plan)  # computed in float32, rounded once
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half, crop_sampled(fmap.bfloat16().float(), plan).bfloat16(), rtol=0, atol=0)


def test_sampling_weights_are_torchs_bilinear_weights_to_the_bit():
    """Resizing one-hot columns with F.interpolate gives, at each output, the weight torch
    puts on each input: the plan's weights must be those, for upsampling and downsampling."""
    grid = PatchGrid.build((2448, 2448), (508, 508))
    for length in (1, 2, 3, 7, 26, 64, 127):
        one_hot = torch.eye(length).reshape(length, 1, length, 1)
        for out in (1, 2, 5, 16, 31, 64, 127, 300):
            expected = F.interpolate(one_hot, size=(out, 1), mode="bilinear", align_corners=False)[:, 0, :, 0].T
            # A box of that length, starting at row 0 of a map as tall: patch 0's box.
            map_size = (length * 2448 // 508 + 1, 8)
            assert grid.cell_box(0, map_size)[2] == length
            plan = sampling_plan(grid, (0,), map_size, (out, 1), torch.device("cpu"))
            weights = torch.zeros(out, length)
            weights[torch.arange(out), plan.r0[0]] += plan.y0[0]
            weights[torch.arange(out), plan.r1[0]] += plan.y1[0]
            assert torch.equal(weights, expected), (length, out)


@pytest.mark.parametrize("image, p, map_size, indices", BOX_CASES[2:7])
def test_crop_gradients_are_those_of_slicing_and_repeatable(image, p, map_size, indices):
    grid = PatchGrid.build(image, (p, p))
    weights = torch.randn(len(indices), 3, 6, 6)

    def grad(crop):
        fmap = torch.randn(1, 3, *map_size, generator=torch.Generator().manual_seed(0)).requires_grad_()
        (crop(fmap) * weights).sum().backward()
        return fmap.grad

    def by_slicing(fmap):
        return torch.cat([resize(fmap[:, :, t : t + h, l : l + w], (6, 6)) for t, l, h, w in _boxes(grid, indices, map_size)])

    mine = grad(lambda f: crop_to_patches(f, grid, indices, (6, 6)))
    torch.testing.assert_close(mine, grad(by_slicing), rtol=1e-5, atol=1e-6)
    with torch.inference_mode():  # index tensors cached under inference mode still serve autograd
        crop_to_patches(torch.randn(1, 3, *map_size), grid, indices, (6, 6))
    for _ in range(3):
        assert torch.equal(grad(lambda f: crop_to_patches(f, grid, indices, (6, 6))), mine)


def _paste_patch_by_patch(canvas, maps, grid, indices):
    for k, (t, l, h, w) in enumerate(_boxes(grid, indices, canvas.shape[-2:])):
        canvas[:, :, t : t + h, l : l + w] += resize(maps[k : k + 1], (h, w))
    return canvas


@pytest.mark.parametrize("image, p, map_size, indices", BOX_CASES)
def test_paste_equals_adding_patch_by_patch(image, p, map_size, indices):
    grid = PatchGrid.build(image, (p, p))
    maps = torch.randn(len(indices), 4, 11, 12)
    start = torch.randn(1, 4, *map_size)
    pasted = paste_patches(start.clone(), maps, grid, indices)
    torch.testing.assert_close(pasted, _paste_patch_by_patch(start.clone(), maps, grid, indices), rtol=1e-6, atol=1e-6)
    # Whole numbers sum exactly in any order: then the two agree to the bit.
    whole = torch.randint(-50, 50, (len(indices), 4, 11, 12)).float()
    (h, w) = grid.cell_box(indices[0], map_size)[2:]
    if all(b[2:] == (h, w) for b in _boxes(grid, indices, map_size)):
        whole = torch.randint(-50, 50, (len(indices), 4, h, w)).float()
        assert torch.equal(paste_patches(torch.zeros(1, 4, *map_size), whole, grid, indices),
                           _paste_patch_by_patch(torch.zeros(1, 4, *map_size), whole, grid, indices))


class _Kernels(TorchDispatchMode):
    """Operators that launch a kernel: neither views nor _unsafe_view (a reshape's view)."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and func is not torch.ops.aten._unsafe_view.default:
            self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_crop_and_paste_cost_few_kernels_however_many_patches(channels_last):
    """Each kernel costs the host time on a GPU: once their index tensors exist, a pass's
    crops and pastes take a handful of them, not a few per patch."""
    grid = PatchGrid.build((2448, 2448), (508, 508))  # 6 x 6 patches; every box 26 x 26 on a 127-cell map
    layout = torch.channels_last if channels_last else torch.contiguous_format
    fmap, canvas = (torch.randn(1, 4, 127, 127).contiguous(memory_format=layout) for _ in range(2))

    def kernels(n):
        maps = torch.randn(n, 4, 127, 127).contiguous(memory_format=layout)
        crop_to_patches(fmap, grid, range(n), (127, 127))  # the first call makes the index tensors
        paste_patches(canvas, maps, grid, range(n))
        with _Kernels() as crop:
            crop_to_patches(fmap, grid, range(n), (127, 127))
        with _Kernels() as paste:
            paste_patches(canvas, maps, grid, range(n))
        return crop.names, paste.names

    # One patch is a slice: the crop copies and resizes it, the paste resizes and adds.
    assert kernels(1) == (["clone", "upsample_bilinear2d"], ["upsample_bilinear2d", "add_"])
    # Crops: one gather and one resize, with a copy between into NCHW (a gather of boxes
    # comes out channels-last).
    crop = ["index", "upsample_bilinear2d"] if channels_last else ["index", "clone", "upsample_bilinear2d"]
    # Pastes: the patches resized together, then one indexed add per group of disjoint
    # boxes. In a row of patches the 2 groups are every other patch (a strided view, copied
    # into a table of cells); the grid's 4 groups span rows and are gathered (NCHW maps are
    # then copied into a table of cells, channels-last ones are one).
    in_row = ["clone", "index_add_"]
    across_rows = ["index", "index_add_"] if channels_last else ["index", "clone", "index_add_"]
    assert kernels(6) == (crop, ["upsample_bilinear2d"] + 2 * in_row)
    assert kernels(36) == (crop, ["upsample_bilinear2d"] + 4 * across_rows)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("indices", [range(6), range(36), [3, 9, 10, 20]], ids=["row", "grid", "scattered"])
def test_paste_of_several_maps_adds_each_into_its_own_channels(channels_last, dtype, indices):
    """Maps of one size pasted together: each channel of the canvas gets, to the bit, what
    pasting its own map alone gives (itself checked against patch-by-patch slicing above)."""
    grid = PatchGrid.build((2448, 2448), (508, 508))
    layout = torch.channels_last if channels_last else torch.contiguous_format
    parts = [torch.randn(len(indices), c, 31, 31, dtype=dtype).contiguous(memory_format=layout) for c in (8, 3, 16)]
    starts = [torch.randn(1, p.shape[1], 29, 29, dtype=dtype).contiguous(memory_format=layout) for p in parts]
    canvas = torch.cat(starts, dim=1).contiguous(memory_format=layout)
    paste_patches(canvas, parts, grid, indices)
    alone = [paste_patches(start.clone(), part, grid, indices) for start, part in zip(starts, parts)]
    assert torch.equal(canvas, torch.cat(alone, dim=1))
    with pytest.raises(ValueError, match="do not fill a canvas of 28"):
        paste_patches(torch.zeros(1, 28, 29, 29, dtype=dtype), parts, grid, indices)


def test_paste_of_several_maps_widens_narrower_ones_and_refuses_wider_ones():
    grid = PatchGrid.build((600, 600), (256, 256))
    parts = [torch.randn(len(grid), 2, 5, 5).bfloat16(), torch.randn(len(grid), 3, 5, 5)]
    canvas = paste_patches(torch.zeros(1, 5, 8, 8), parts, grid, range(len(grid)))
    alone = [paste_patches(torch.zeros(1, p.shape[1], 8, 8), p, grid, range(len(grid))) for p in parts]
    assert canvas.dtype == torch.float32 and torch.equal(canvas, torch.cat(alone, dim=1))
    with pytest.raises(TypeError, match="rounding twice"):
        paste_patches(torch.zeros(1, 5, 8, 8, dtype=torch.bfloat16), parts, grid, range(len(grid)))


def test_crop_is_never_a_view_of_the_map():
    # One patch over the whole image and a crop of the map's own size: nothing to gather or
    # resize, yet the crop must not share the map's memory (a caller may write into either).
    grid = PatchGrid.build((200, 300), (508, 508))
    for layout in (torch.contiguous_format, torch.channels_last):
        fmap = torch.randn(1, 3, 8, 12).contiguous(memory_format=layout)
        crop = crop_to_patches(fmap, grid, [0], (8, 12))
        assert torch.equal(crop, fmap) and crop.untyped_storage().data_ptr() != fmap.untyped_storage().data_ptr()


def test_paste_of_narrower_maps_rounds_once_and_wider_ones_are_refused():
    grid = PatchGrid.build((600, 600), (256, 256))
    maps = torch.randn(len(grid), 4, 3, 3).bfloat16()  # 3 x 3: every box's size, so no resize
    wide = paste_patches(torch.zeros(1, 4, 8, 8), maps, grid, range(len(grid)))
    # bf16 values are exact in fp32: the same sums as pasting them already widened.
    assert torch.equal(wide, paste_patches(torch.zeros(1, 4, 8, 8), maps.float(), grid, range(len(grid))))
    with pytest.raises(TypeError, match="rounding twice"):
        paste_patches(torch.zeros(1, 4, 8, 8, dtype=torch.bfloat16), maps.float(), grid, range(len(grid)))


def test_paste_into_a_channels_last_canvas():
    grid = PatchGrid.build((600, 600), (256, 256))
    maps = torch.randn(len(grid), 4, 5, 5)
    canvas = torch.zeros(1, 4, 8, 8).contiguous(memory_format=torch.channels_last)
    pasted = paste_patches(canvas, maps, grid, range(len(grid)))
    assert pasted is canvas and pasted.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(pasted, paste_patches(torch.zeros(1, 4, 8, 8), maps, grid, range(len(grid))), rtol=0, atol=0)


# --------------------------------------------------------------------------- coverage template


def test_coverage_equals_parity_overlap_template(parity_ref):
    grid = PatchGrid.build((600, 600), (256, 256))
    assert np.array_equal(grid.coverage().numpy(), parity_ref["overlap_template"].astype(np.float32))


@pytest.mark.parametrize("h, w, p", [(600, 600, 256), (300, 420, 160), (2448, 2448, 508), (257, 1000, 256), (80, 300, 96)])
def test_coverage_on_map_equals_bilinear_resize_of_template(h, w, p):
    grid = PatchGrid.build((h, w), (p, p))
    template = grid.coverage()[None, None]
    for size in ((64, 64), (8, 8), (1, 1), (16, 5), (127, 127), (h // 4, w // 4)):
        expected = F.interpolate(template, size=size, mode="bilinear", align_corners=False)
        torch.testing.assert_close(coverage_on_map(grid, size), expected, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- resampling rules


NEAREST_PAIRS = [(o, i) for i in (1, 2, 3, 7, 24, 63, 64, 127) for o in (1, 5, 64, 82, 96, 123, 256, 508, 600, 2448)]


@pytest.mark.parametrize("device", DEVICES)
def test_nearest_indices_is_torch_legacy_nearest(device):
    # (82, 2) is a regression: i * in / out = 1 exactly at i = 41, which torch's float32
    # arithmetic puts just below 1.
    for out_len, in_len in NEAREST_PAIRS + [(82, 2), (141, 3), (123, 3)]:
        x = torch.arange(in_len, dtype=torch.float32, device=device)[None, None]
        expected = F.interpolate(x, size=out_len, mode="nearest")[0, 0].long()
        got = nearest_indices(out_len, in_len, torch.device(device))
        assert got.device.type == device
        assert torch.equal(got, expected), (out_len, in_len)


def _pil_indices(in_len: int, out_len: int) -> np.ndarray:
    """Which input column Image.resize(NEAREST) reads for each output column (index coded in RGB)."""
    a = np.arange(in_len)
    row = np.stack([a % 256, a // 256, np.zeros_like(a)], -1)[None].astype(np.uint8)
    out = np.asarray(Image.fromarray(row, "RGB").resize((out_len, 1), Image.NEAREST))[0].astype(np.int64)
    return out[:, 0] + 256 * out[:, 1]


PIL_PAIRS = [(2448, 127), (600, 64), (508, 127), (1000, 63), (256, 64), (200, 50), (96, 24), (260, 16),
             (8, 6), (16, 12), (20, 15), (2, 7), (127, 2448), (63, 1000), (5, 5), (3001, 750)]


@pytest.mark.parametrize("in_len, out_len", PIL_PAIRS)
def test_pil_nearest_indices_equal_pillow(in_len, out_len):
    # (8, 6), (16, 12), (20, 15), (2, 7) are exact ties that Pillow's accumulated float64
    # step puts on the lower input pixel.
    assert np.array_equal(pil_nearest_indices(out_len, in_len).numpy(), _pil_indices(in_len, out_len))


@pytest.mark.parametrize("size_in, size_out", [((2448, 2448), (127, 127)), ((600, 600), (64, 64)),
                                               ((508, 508), (127, 127)), ((1000, 1000), (63, 63)),
                                               ((300, 420), (32, 32)), ((96, 160), (24, 40)), ((16, 20), (12, 15))])
def test_resize_labels_equals_pillow_nearest(size_in, size_out):
    rng = np.random.default_rng(sum(size_in))
    label = rng.integers(0, 7, size_in, dtype=np.uint8)
    expected = np.asarray(Image.fromarray(label).resize(size_out[::-1], Image.NEAREST))
    got = resize_labels(torch.from_numpy(label), size_out)
    assert got.shape == size_out
    assert np.array_equal(got.numpy(), expected)
    # Leading dimensions are carried along.
    batch = resize_labels(torch.from_numpy(np.stack([label, label[::-1].copy()])), size_out)
    assert torch.equal(batch[0], got)
