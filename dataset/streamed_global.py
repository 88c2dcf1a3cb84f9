"""The global branch's input for an image too large to hold: streamed from the
full-resolution level in bands, or resized from a pyramid level.

global_image_streamed(image, size) equals dataset.transforms.global_image of the whole
image decoded in memory, bit for bit. A pyramid level, where the file has one large
enough (pick_level), is much cheaper to read but gives a slightly different image; see
global_image_large.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from dataset.large_image import LargeImage
from dataset.transforms import to_unit_float
from utils.banded_resample import pil_bilinear_banded

# Bytes of full-resolution pixels read per band (3 bytes a pixel): 40,000 px wide, about
# 560 rows; the band is the streamed resize's largest buffer.
BAND_BYTES = 64 << 20
# A level is used for the global image only when it is at least this many times the
# global image's size on both sides (pick_level).
MIN_LEVEL_RATIO = 4


def band_rows(image: LargeImage, level: int, band_bytes: int = BAND_BYTES) -> int:
    """Rows per band: about band_bytes of the level's rows, rounded down to whole tile rows
    (each tile is then decoded once), at least one tile row."""
    width = image.levels[level][1]
    block = max(1, image.block_rows(level))
    return max(1, band_bytes // (3 * width) // block) * block


def global_image_streamed(image: LargeImage, size: Sequence[int], level: int = 0,
                          band_bytes: int = BAND_BYTES) -> Tensor:
    """A level of `image` resized to `size` (H, W) with Pillow's BILINEAR (antialiased),
    float32 (3, H, W) in [0, 1] on the CPU, read top to bottom in bands.

    From level 0 it equals global_image(read whole image, size) exactly: the same
    Pillow-exact passes (utils.banded_resample), then the same division by 255.

    Memory: one band (3 x band_rows x level width bytes, about band_bytes), the rows kept
    between bands (one output's window: about 2 * level height / H rows, narrowed to W
    columns in Pillow's usual horizontal-first order), the result, and the reader's tile
    cache (dataset.tiff_image.TILE_CACHE_BYTES; OpenSlide's own for slides).
    """
    height, width = image.levels[level]

    def read(top: int, rows: int, left: int, cols: int) -> Tensor:
        # (rows, cols, 3) as (3, rows, cols): a view; the resize copies what it reads.
        return torch.from_numpy(image.read_region(top, left, rows, cols, level)).permute(2, 0, 1)

    pixels = pil_bilinear_banded(read, (height, width), size, band_rows(image, level, band_bytes))
    return to_unit_float(pixels)


def pick_level(levels: Sequence[Sequence[int]], size: Sequence[int], min_ratio: int = MIN_LEVEL_RATIO) -> int:
    """The level to make a global image of `size` (H, W) from: the smallest one whose
    sides are both at least min_ratio times the global image's, else 0 (full resolution).

    Why "min_ratio times": a level was made by the scanner or writer with its own filter
    (box, or a JPEG of a box). Resizing it by a further factor of at least min_ratio with
    Pillow's antialiased bilinear, whose filter then spans min_ratio or more of the level's
    pixels, leaves that first filter a small part of the result: it widens the blur by at
    most about 1 / min_ratio of a global pixel, and a level's rounded size moves the image
    by under 1 / min_ratio of a global pixel. A level only just larger than the global
    image would leave its own filter (and its JPEG blocks) to dominate.
    """
    h, w = int(size[0]), int(size[1])
    large_enough = [i for i, (level_h, level_w) in enumerate(levels) if level_h >= min_ratio * h and level_w >= min_ratio * w]
    return min(large_enough, key=lambda i: levels[i][0] * levels[i][1], default=0)


def global_image_large(image: LargeImage, size: Sequence[int], exact: bool = False,
                       min_ratio: int = MIN_LEVEL_RATIO, band_bytes: int = BAND_BYTES) -> Tensor:
    """The global image of a large image: from the level pick_level chooses, or from full
    resolution when `exact` (or when no level is large enough).

    From full resolution the result equals the in-memory path's (global_image) exactly.
    From a pyramid level it differs slightly: the level's own downsampling filter (and
    its compression) come before Pillow's, and the level's size is rounded. A network
    trained on global images of the in-memory path sees the same scene at the same scale
    either way, with differences below the noise of JPEG-compressed slides (see
    pick_level); reading a level halved k times costs 1 / 4**k of the full-resolution
    read that streaming needs (a slide's levels are usually 4 or 16 times smaller a side). Pass exact=True where bit-for-bit agreement with the in-memory path
    matters more than that read (for example, to check a model against it).

    Memory: see global_image_streamed.
    """
    level = 0 if exact else pick_level(image.global_levels(), size, min_ratio)
    return global_image_streamed(image, size, level, band_bytes)

