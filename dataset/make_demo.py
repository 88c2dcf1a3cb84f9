"""Small synthetic data sets, deterministic from a seed, for demos and tests.

    python -m dataset.make_demo --dst data/demo [--n-train 4 --n-val 2 --n-test 2 --size 1024 --seed 0] [--force]
    python -m dataset.make_demo --xrays 10 --dst data/xray_src [--size 1024 --seed 0] [--force]

The first writes DeepGlobe's prepared layout (every split labelled): smooth regions of the
seven classes, each with its own colour and texture so a network can learn them, crossed by
3-6 px wide urban "roads" that only full-resolution patches resolve. The second writes a
Montgomery-style source tree of 16-bit grey chest X-ray lookalikes with left and right lung
masks, to be split by dataset.prepare_lung.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw

from dataset.classes import DEEPGLOBE
from dataset.io import write_label, write_png
from dataset.layouts import DEEP_GLOBE, SPLITS
from dataset.prepare_common import claimed_destination
from dataset.prepare_lung import MONTGOMERY_IMAGES, MONTGOMERY_MASK_DIR, MONTGOMERY_MASKS
from utils.errors import OneLineParser, reports_data_errors
from utils.files import replacing

URBAN = DEEPGLOBE.names.index("urban")
# Per class: mean RGB, per-pixel noise and stripe strength. Stripes mark agriculture's
# fields; noise separates rough (urban, forest) from smooth (water) surfaces.
LOOK_RGB = np.array([(30, 30, 30), (150, 150, 160), (190, 170, 90), (150, 135, 105), (40, 90, 40), (30, 60, 130), (205, 195, 175)], np.float32)
LOOK_NOISE = np.array([4, 28, 8, 14, 22, 3, 9], np.float32)
LOOK_STRIPES = np.array([0, 0, 30, 0, 0, 0, 0], np.float32)
N_CELLS = 14
MONTGOMERY_ASPECT = 4020 / 4892  # W / H of the real scans


def smooth_noise(rng: np.random.Generator, size: tuple[int, int], cells: int) -> np.ndarray:
    """Low-frequency noise: a (cells x cells) grid of N(0, 1) values upsampled bicubically to (H, W)."""
    coarse = Image.fromarray(rng.standard_normal((cells, cells)).astype(np.float32), mode="F")
    return np.asarray(coarse.resize((size[1], size[0]), Image.BICUBIC))


def land_cover_label(rng: np.random.Generator, size: int) -> np.ndarray:
    """(size, size) uint8 class ids: warped Voronoi cells of random classes, then roads."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    warp = size / 12
    yy += warp * smooth_noise(rng, (size, size), 6)
    xx += warp * smooth_noise(rng, (size, size), 6)
    seeds = rng.uniform(0, size, (N_CELLS, 2)).astype(np.float32)
    cell_classes = rng.integers(0, DEEPGLOBE.n_class, N_CELLS).astype(np.uint8)
    label, best = np.zeros((size, size), np.uint8), np.full((size, size), np.inf, np.float32)
    for (sy, sx), cls in zip(seeds, cell_classes):
        distance = (yy - sy) ** 2 + (xx - sx) ** 2
        closer = distance < best
        label[closer], best[closer] = cls, distance[closer]
    canvas = Image.fromarray(label)
    draw = ImageDraw.Draw(canvas)
    for _ in range(rng.integers(3, 7)):
        # A road enters on the left edge and leaves on the right (or top to bottom) with one bend.
        ends = rng.uniform(0, size, 3)
        points = [(0.0, ends[0]), (rng.uniform(0.3, 0.7) * size, ends[1]), (float(size), ends[2])]
        if rng.random() < 0.5:
            points = [(y, x) for x, y in points]
        draw.line(points, fill=URBAN, width=int(rng.integers(3, 7)))
    return np.asarray(canvas)


def land_cover_image(rng: np.random.Generator, label: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB drawing each class of `label` (H, W) in its own look."""
    h, w = label.shape
    angle = rng.uniform(0, np.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    stripes = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * (2 * np.pi / 12))
    texture = LOOK_NOISE[label] * rng.standard_normal((h, w)).astype(np.float32) + LOOK_STRIPES[label] * stripes
    shade = 10 * smooth_noise(rng, (h, w), 4)  # gentle illumination changes across the tile
    return np.clip(LOOK_RGB[label] + (texture + shade)[..., None], 0, 255).astype(np.uint8)


def make_deep_globe_demo(dst: Path, n_train: int = 4, n_val: int = 2, n_test: int = 2, size: int = 1024, seed: int = 0) -> None:
    """Write a labelled land-cover demo in DeepGlobe's prepared layout.

    Args:
        dst: data root; gets <split>/Sat/demo<split><i>_sat.jpg and <split>/Label/..._mask.png.
        n_train, n_val, n_test: images in train, crossvali and test.
        size: image side in pixels.
        seed: everything is a function of (seed, split, index).
    """
    for split_index, (split, count) in enumerate(zip(SPLITS, (n_train, n_val, n_test))):
        for i in range(count):
            rng = np.random.default_rng((seed, split_index, i))
            label = land_cover_label(rng, size)
            sample_id = f"demo{split}{i:03d}"
            image_path = DEEP_GLOBE.image_path(dst / split, sample_id)
            with replacing(image_path) as tmp:
                Image.fromarray(land_cover_image(rng, label)).save(tmp, format="JPEG", quality=92)
            write_label(DEEP_GLOBE.mask_path(dst / split, sample_id), label)


def lung_mask(rng: np.random.Generator, size: tuple[int, int], centre_x: float) -> np.ndarray:
    """(H, W) bool: an ellipse-ish lung whose radius wobbles with the angle."""
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    cy, cx = h * rng.uniform(0.45, 0.52), w * (centre_x + rng.uniform(-0.02, 0.02))
    ry, rx = h * rng.uniform(0.24, 0.3), w * rng.uniform(0.11, 0.14)
    theta = np.arctan2(yy - cy, xx - cx)
    wobble = 1 + 0.08 * np.sin(3 * theta + rng.uniform(0, 2 * np.pi))
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < wobble**2


def make_synthetic_xrays(dst: Path, n: int, size: tuple[int, int] = (1024, round(1024 * MONTGOMERY_ASPECT)), seed: int = 0) -> None:
    """Write a Montgomery-County-style tree: <dst>/CXR_png/<name>.png (16-bit grey) and
    <dst>/ManualMask/{leftMask,rightMask}/<name>.png (0/255 8-bit).

    Args:
        dst: the tree's root.
        n: number of X-rays, named MCUCXR_<iiii>_0.png.
        size: (H, W); the default has Montgomery's aspect ratio.
        seed: image i is a function of (seed, i).
    """
    h, w = size
    for i in range(n):
        rng = np.random.default_rng((seed, i))
        lungs = [lung_mask(rng, size, centre_x) for centre_x in (0.32, 0.68)]
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        body = ((xx - w / 2) / (0.45 * w)) ** 2 < 1  # the torso: bright soft tissue between dark air
        ribs = 0.04 * np.sin(yy * (2 * np.pi / (h / 14)) + 0.3 * np.abs(xx - w / 2) / w * 2 * np.pi)
        intensity = 0.1 + 0.55 * body + ribs * body - 0.3 * (lungs[0] | lungs[1]) + 0.03 * smooth_noise(rng, size, 16)
        pixels = np.clip(intensity + 0.01 * rng.standard_normal(size), 0, 1)
        name = f"MCUCXR_{i:04d}_0.png"
        files = {MONTGOMERY_IMAGES: (pixels * 65535).astype(np.uint16)}
        files.update({folder: lung.astype(np.uint8) * 255 for folder, lung in zip(MONTGOMERY_MASKS, lungs)})
        for folder, array in files.items():
            write_png(dst / folder / name, array)


@reports_data_errors
def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = OneLineParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dst", type=Path, required=True, help="folder to write: a data root (e.g. data/demo), or "
                        "with --xrays a source tree for dataset.prepare_lung")
    parser.add_argument("--n-train", type=int, default=4, help="images in train/ (default: 4)")
    parser.add_argument("--n-val", type=int, default=2, help="images in crossvali/, the validation split (default: 2)")
    parser.add_argument("--n-test", type=int, default=2, help="images in test/ (default: 2)")
    parser.add_argument("--size", type=int, default=1024, help="image side; X-rays: the height, the width in "
                        "Montgomery's ratio (default: 1024)")
    parser.add_argument("--seed", type=int, default=0, help="the same seed writes the same files (default: 0)")
    parser.add_argument("--xrays", type=int, default=0, metavar="N", help="write N synthetic X-rays in the Montgomery layout instead")
    parser.add_argument("--force", action="store_true", help="replace what a previous run wrote into a non-empty --dst")
    args = parser.parse_args(argv)
    if args.xrays:
        with claimed_destination(args.dst, args.force, owned=(MONTGOMERY_IMAGES, MONTGOMERY_MASK_DIR)):
            make_synthetic_xrays(args.dst, args.xrays, (args.size, round(args.size * MONTGOMERY_ASPECT)), args.seed)
        print(f"wrote {args.xrays} X-rays to {args.dst}")
    else:
        with claimed_destination(args.dst, args.force):
            make_deep_globe_demo(args.dst, args.n_train, args.n_val, args.n_test, args.size, args.seed)
        print(f"wrote {args.n_train}/{args.n_val}/{args.n_test} train/crossvali/test images to {args.dst}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
