"""Large-image I/O: reading tiled, pyramidal and georeferenced TIFFs and slides by regions,
the streamed global image, and the band-by-band tiled class-map writer.

Every file is made here, small (hundreds of pixels, 256-pixel tiles), so the whole
module runs in seconds on a CPU.
"""
from __future__ import annotations

import ast
import collections
import errno
import json
import logging
import os
import shutil
import struct
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import rasterio
import tifffile
import torch
from PIL import Image

from conftest import write_svs
from dataset.classes import DEEPGLOBE
from dataset.io import read_image
from dataset.large_files import is_large_image_file, open_large_image
from dataset import tiff_image
from dataset.slide_image import SlideImage
from dataset.streamed_global import global_image_large, global_image_streamed, pick_level
from dataset.tiff_image import TiffImage, _ome_mpp
from dataset.transforms import global_image
from utils.banded_resample import pil_bilinear_banded
from utils.errors import DataError
from utils.files import WriteError
from utils.georef import world_file, world_file_name
from utils.resample import pil_bilinear
from utils import band_store, tiled_writer
from utils.tiled_writer import (ClassMapWriter, file_identity, level_sizes, majority_2x2, partial_paths,
                                 preview_size)

ROOT = Path(__file__).resolve().parents[1]
H, W = 700, 900
TILE = 256
CRS = "EPSG:32633"
TRANSFORM = rasterio.Affine(0.5, 0.0, 500000.0, 0.0, -0.5, 4600000.0)  # 0.5 m pixels


def pixels(height: int = H, width: int = W, seed: int = 0) -> np.ndarray:
    """(height, width, 3) uint8 noise: every pixel differs from its neighbours, so a
    region read one pixel off, or a resize one tap off, shows."""
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def halved(a: np.ndarray) -> np.ndarray:
    return a[::2, ::2]


def write_tiled(path: Path, a: np.ndarray, **kw) -> Path:
    tifffile.imwrite(path, a, tile=(TILE, TILE), compression="zlib", metadata=None,
                     photometric="rgb" if a.ndim == 3 else "minisblack", **kw)
    return path


def write_subifd_pyramid(path: Path, a: np.ndarray) -> Path:
    """Full resolution with its halvings as SubIFDs (how OME-TIFF and vips store pyramids)."""
    with tifffile.TiffWriter(path) as tif:
        tif.write(a, tile=(TILE, TILE), compression="zlib", photometric="rgb", subifds=2, metadata=None)
        tif.write(halved(a), tile=(TILE, TILE), compression="zlib", photometric="rgb", subfiletype=1)
        tif.write(halved(halved(a)), tile=(TILE, TILE), compression="zlib", photometric="rgb", subfiletype=1)
    return path


def write_geotiff(path: Path, a: np.ndarray, interleave: str = "band") -> Path:
    """A GDAL GeoTIFF: tiled, deflated, with overviews (band-interleaved by default, as
    GDAL writes many rasters, marked MinIsBlack with extra samples)."""
    with rasterio.open(path, "w", driver="GTiff", width=a.shape[1], height=a.shape[0], count=3, dtype="uint8", crs=CRS,
                       transform=TRANSFORM, tiled=True, blockxsize=TILE, blockysize=TILE, compress="deflate",
                       interleave=interleave) as ds:
        ds.write(a.transpose(2, 0, 1))
        ds.build_overviews([2, 4], rasterio.enums.Resampling.nearest)
    return path


def tag_offset(path: Path, name: str) -> int:
    with tifffile.TiffFile(path) as tif:
        return tif.pages[0].tags[name].valueoffset


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("large")
    a = pixels()
    strips = folder / "strips.tif"
    tifffile.imwrite(strips, a, rowsperstrip=64, compression="zlib", photometric="rgb", metadata=None)
    return {
        "tiled": write_tiled(folder / "tiled.tif", a),
        "pyramid": write_subifd_pyramid(folder / "pyramid.tif", a),
        "geotiff": write_geotiff(folder / "geo.tif", a),
        "svs": write_svs(folder / "slide.svs", a, TILE),
        "strips": strips,
    }


# ------------------------------------------------------------------ reading


@pytest.mark.parametrize("kind", ["tiled", "pyramid", "geotiff", "svs", "strips"])
def test_read_region_matches_the_pixels_written(files, kind):
    a = pixels()
    with open_large_image(files[kind]) as image:
        assert isinstance(image, SlideImage if kind == "svs" else TiffImage)
        assert image.size == (H, W)
        for top, left, h, w in [(0, 0, H, W), (100, 200, 300, 500), (255, 255, 2, 2), (H - 1, W - 1, 1, 1),
                                (600, 10, 100, 890)]:
            region = image.read_region(top, left, h, w)
            assert region.dtype == np.uint8 and region.shape == (h, w, 3)
            np.testing.assert_array_equal(region, a[top:top + h, left:left + w])


@pytest.mark.parametrize("kind, levels", [
    ("tiled", [(H, W)]),
    ("pyramid", [(H, W), (350, 450), (175, 225)]),
    ("geotiff", [(H, W), (350, 450), (175, 225)]),
    ("svs", [(H, W), (175, 225)]),
])
def test_levels_are_listed_full_resolution_first_and_read(files, kind, levels):
    a = pixels()
    with open_large_image(files[kind]) as image:
        assert image.levels == levels
        for i, (h, w) in enumerate(levels[1:], start=1):
            step = W // w if kind == "svs" else 2 ** i  # the halvings were taken by striding
            np.testing.assert_array_equal(image.read_region(0, 0, h, w, level=i), a[::step, ::step][:h, :w])
            np.testing.assert_array_equal(image.read_region(10, 20, 30, 40, level=i), a[::step, ::step][10:40, 20:60])


def test_regions_partly_outside_are_an_error(files):
    with open_large_image(files["tiled"]) as image:
        for region in [(-1, 0, 10, 10), (0, 0, H + 1, 10), (0, W - 5, 10, 10), (0, 0, 0, 10)]:
            with pytest.raises(ValueError, match="not a non-empty region inside level 0"):
                image.read_region(*region)
        with pytest.raises(ValueError, match="level 1 does not exist"):
            image.read_region(0, 0, 1, 1, level=1)


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA"])
def test_grey_palette_and_alpha_read_as_pillow_converts_them(tmp_path, mode):
    """Grey replicated, palettes expanded, alpha dropped: as read_image (Pillow) does on the
    in-memory path, so both paths see the same pixels."""
    a = pixels()
    path = tmp_path / f"{mode}.tif"
    if mode == "P":
        colormap = np.random.default_rng(1).integers(0, 65536, (3, 256), dtype=np.uint16)
        tifffile.imwrite(path, a[..., 0], tile=(TILE, TILE), compression="zlib", photometric="palette",
                         colormap=colormap, metadata=None)
    elif mode == "L":
        write_tiled(path, a[..., 0])
    else:
        samples = np.dstack([a, a[..., :1]]) if mode == "RGBA" else a[..., :2]
        tifffile.imwrite(path, samples, tile=(TILE, TILE), compression="zlib", extrasamples=["unassalpha"],
                         photometric="rgb" if mode == "RGBA" else "minisblack", metadata=None)
    with open_large_image(path) as image:
        ours = image.read_region(0, 0, H, W)
    np.testing.assert_array_equal(ours, read_image(path).permute(1, 2, 0).numpy())


def test_geotiff_georeferencing_and_microns_per_pixel(files, tmp_path):
    with open_large_image(files["geotiff"]) as image:
        assert image.georef.crs == CRS
        assert image.georef.transform == tuple(TRANSFORM)[:6]
        assert image.mpp is None
    with open_large_image(files["svs"]) as image:
        assert image.mpp == (0.499, 0.499) and image.georef is None
    per_cm = tmp_path / "microscope.tif"
    write_tiled(per_cm, pixels(64, 64), resolution=(1e4 / 0.5, 1e4 / 0.25), resolutionunit="CENTIMETER")
    with open_large_image(per_cm) as image:
        assert image.mpp == pytest.approx((0.25, 0.5)) and image.georef is None
    # OME-XML sizes, in its units (microns by default), before resolution tags that disagree.
    ome = tmp_path / "exported.ome.tif"
    tifffile.imwrite(ome, pixels(64, 64), tile=(TILE, TILE), photometric="rgb", ome=True,
                     resolution=(1e4, 1e4), resolutionunit="CENTIMETER",
                     metadata={"PhysicalSizeX": 500, "PhysicalSizeXUnit": "nm", "PhysicalSizeY": 0.25})
    with open_large_image(ome) as image:
        assert image.mpp == pytest.approx((0.25, 0.5)) and image.georef is None
    for broken in ("<OME", '<OME><Image><Pixels PhysicalSizeX="inf" PhysicalSizeY="1"/></Image></OME>',
                   '<OME><Image><Pixels PhysicalSizeX="1" PhysicalSizeY="1" PhysicalSizeYUnit="parsec"/></Image></OME>'):
        assert _ome_mpp(broken) is None, broken
    with open_large_image(files["tiled"]) as image:
        assert image.mpp is None and image.georef is None  # no unit: no size claimed


def test_which_files_go_the_large_way(files, tmp_path):
    assert all(is_large_image_file(files[k]) for k in ("tiled", "pyramid", "geotiff", "svs"))
    small_strips = tmp_path / "small.tif"
    tifffile.imwrite(small_strips, pixels(64, 64), photometric="rgb", metadata=None)
    xray = tmp_path / "xray.tif"
    tifffile.imwrite(xray, np.zeros((512, 512), np.uint16), tile=(TILE, TILE), metadata=None)
    png = tmp_path / "a.png"
    Image.fromarray(pixels(64, 64)).save(png)
    not_tiff = tmp_path / "broken.tif"
    not_tiff.write_bytes(b"not a tiff at all")
    # Today's path reads these (16-bit grey too), or names their problem.
    assert not any(is_large_image_file(p) for p in (small_strips, xray, png, not_tiff, files["strips"]))


# ------------------------------------------------------------------ bad files


def one_line_naming(error: pytest.ExceptionInfo, path: Path) -> str:
    message = str(error.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    return message


def test_truncated_file_is_named_when_opened(files, tmp_path):
    path = tmp_path / "cut.tif"
    shutil.copy(files["tiled"], path)
    os.truncate(path, path.stat().st_size - 1000)
    with pytest.raises(DataError) as error:
        open_large_image(path)
    assert "is truncated" in one_line_naming(error, path) and "re-download" in str(error.value)


def corrupt_tile(source: Path, path: Path, tile: int = 5) -> Path:
    """A copy of source with 64 zero bytes in the middle of tile `tile` of its first page."""
    shutil.copy(source, path)
    with tifffile.TiffFile(path) as tif:
        offset, count = tif.pages[0].dataoffsets[tile], tif.pages[0].databytecounts[tile]
    with open(path, "r+b") as file:
        file.seek(offset + count // 2)
        file.write(bytes(64))
    return path


def test_corrupt_tile_is_named_when_read(files, tmp_path):
    path = corrupt_tile(files["tiled"], tmp_path / "corrupt.tif")
    with open_large_image(path) as image:
        image.read_region(0, 0, TILE, TILE)  # other tiles read
        with pytest.raises(DataError) as error:
            image.read_region(0, 0, H, W)
    assert "cannot decode tile 5 of level 0" in one_line_naming(error, path)


def test_bad_slides_are_named(files, tmp_path):
    corrupt = corrupt_tile(files["svs"], tmp_path / "corrupt.svs")
    with open_large_image(corrupt) as image:
        assert isinstance(image, SlideImage)
        with pytest.raises(DataError) as error:
            image.read_region(0, 0, H, W)  # OpenSlide's own error, named
    assert "corrupt" in one_line_naming(error, corrupt)
    with tifffile.TiffFile(files["svs"]) as tif:
        offset = tif.pages[0].dataoffsets[5]
    cut = tmp_path / "cut.svs"
    shutil.copy(files["svs"], cut)
    os.truncate(cut, offset + 10)  # its reduced level's tables are gone too: OpenSlide declines it
    with pytest.raises(DataError) as error:
        open_large_image(cut)
    assert "is truncated" in one_line_naming(error, cut)


@pytest.mark.parametrize("kind", ["pyramid", "geotiff", "svs"])
def test_a_file_cut_in_its_tables_is_one_line_and_tifffile_logs_nothing(files, tmp_path, caplog, kind):
    path = tmp_path / f"cut{files[kind].suffix}"
    data = files[kind].read_bytes()
    path.write_bytes(data[: len(data) // 2])  # pages past the end: tifffile logs them as it parses
    with caplog.at_level(logging.DEBUG, logger="tifffile"), pytest.raises(DataError) as error:
        open_large_image(path)
    assert "is truncated" in one_line_naming(error, path)
    assert not [record.getMessage() for record in caplog.records if record.name == "tifffile"]


@pytest.mark.parametrize("kind", ["pyramid", "geotiff"])
def test_a_reduced_level_cut_short_is_left_out_and_named(files, tmp_path, kind):
    path = tmp_path / "cut.tif"
    path.write_bytes(files[kind].read_bytes()[:-1000])  # the last tiles are the smallest level's
    with open_large_image(path) as image:
        assert image.levels == [(H, W), (350, 450)]
        np.testing.assert_array_equal(image.read_region(0, 0, H, W), pixels())
        (line,) = image.damaged
    assert line.startswith(f"{path}: its 175 x 225 level is truncated (its tiles reach byte ")
    assert line.endswith(", and is left out; re-download or re-export it")
    with open_large_image(files[kind]) as whole:
        assert whole.damaged == ()


def last_table_cut(source: Path, path: Path) -> Path:
    """`source` cut 4 bytes into the table (IFD) of its smallest level."""
    with tifffile.TiffFile(source) as tif:
        offset = tif.series[0].levels[-1].keyframe.offset
    path.write_bytes(source.read_bytes()[:offset + 4])
    return path


def test_a_reduced_level_whose_table_is_cut_is_left_out_and_named(files, tmp_path):
    path = last_table_cut(files["pyramid"], tmp_path / "cut.tif")
    with open_large_image(path) as image:  # tifffile drops the level as it parses
        assert image.levels == [(H, W), (350, 450)]
        (line,) = image.damaged
    assert line.startswith(f"{path}: tifffile reports, reading its tables: ") and "\n" not in line
    assert "<" not in line  # tifffile's own "<tifffile.TiffFile 'cut.tif'>" is left out


def test_a_table_cut_in_the_chain_of_pages_is_one_line(files, tmp_path):
    path = last_table_cut(files["geotiff"], tmp_path / "cut.tif")  # its pages are a chain, not SubIFDs
    with pytest.raises(DataError) as error:
        open_large_image(path)
    assert "not a TIFF file tifffile can read" in one_line_naming(error, path)


def test_tifffile_warnings_are_held_only_in_the_thread_parsing_and_only_meanwhile(caplog):
    log = tifffile.logger()
    with caplog.at_level(logging.WARNING, logger="tifffile"):
        with tiff_image._HELD.parsing() as held:
            log.warning("<TiffFile 'x.tif'> in this thread")
            other = threading.Thread(target=log.warning, args=("in another thread",))
            other.start()
            other.join()
        log.warning("after parsing")
    assert held == ["in this thread"]
    assert [record.getMessage() for record in caplog.records] == ["in another thread", "after parsing"]


def test_unsupported_compression_is_named(files, tmp_path):
    path = tmp_path / "jbig.tif"
    shutil.copy(files["tiled"], path)
    with open(path, "r+b") as file:  # the Compression tag says JBIG, which imagecodecs cannot decode
        file.seek(tag_offset(path, "Compression"))
        file.write(struct.pack("<H", 34661))
    with pytest.raises(DataError) as error:
        open_large_image(path)
    message = one_line_naming(error, path)
    assert "JBIG" in message and "cannot decode" in message and "re-save" in message


def test_file_without_full_resolution_level_is_named(tmp_path):
    path = tmp_path / "overview_only.tif"
    write_tiled(path, pixels(300, 300), subfiletype=1)
    with pytest.raises(DataError) as error:
        open_large_image(path)
    assert "no full-resolution level" in one_line_naming(error, path)


@pytest.mark.parametrize("dtype, photometric, what", [
    (np.uint16, "rgb", "16-bit unsigned"),
    (np.float32, "minisblack", "32-bit floating-point"),
    (np.uint8, "separated", "SEPARATED"),
])
def test_pixels_that_are_not_rgb_able_are_named(tmp_path, dtype, photometric, what):
    path = tmp_path / "odd.tif"
    shape = (300, 300, 4) if photometric == "separated" else (300, 300, 3) if photometric == "rgb" else (300, 300)
    tifffile.imwrite(path, np.zeros(shape, dtype), tile=(TILE, TILE), photometric=photometric, metadata=None)
    with pytest.raises(DataError) as error:
        open_large_image(path)
    assert what in one_line_naming(error, path)


def test_turned_tiff_is_named(tmp_path):
    """Viewers turn such a file as its Orientation tag says; tiles read as stored would
    give a map that does not lie over the image."""
    path = write_tiled(tmp_path / "turned.tif", pixels(300, 300), extratags=[(274, 3, 1, 6, True)])
    with pytest.raises(DataError) as error:
        open_large_image(path)
    assert "orientation 6" in one_line_naming(error, path)
    assert not is_large_image_file(path)  # small: the in-memory path turns it


@pytest.mark.parametrize("content", [b"", b"II*\x00garbage", b"plain text"])
def test_files_that_are_no_tiff_are_named(tmp_path, content):
    path = tmp_path / "x.tif"
    path.write_bytes(content)
    with pytest.raises(DataError) as error:
        open_large_image(path)
    one_line_naming(error, path)
    with pytest.raises(DataError, match="no such file"):
        open_large_image(tmp_path / "missing.tif")


def test_a_missing_openslide_is_named_for_slides_only(files, monkeypatch):
    monkeypatch.setitem(sys.modules, "openslide", None)  # import openslide now raises ImportError
    with pytest.raises(DataError) as error:
        open_large_image(files["svs"])
    one_line_naming(error, files["svs"])
    assert "needs OpenSlide" in str(error.value) and "requirements.txt" in str(error.value)
    with open_large_image(files["tiled"]) as image:  # TIFFs need only tifffile
        assert image.size == (H, W)


# ------------------------------------------------------------------ the global image


@pytest.mark.parametrize("in_size", [(H, W), (257, 1031), (1031, 257)])
@pytest.mark.parametrize("size", [(508, 508), (50, 700), (123, 45)])
def test_streamed_global_image_equals_the_in_memory_one(tmp_path, in_size, size):
    """The whole chain: the in-memory path (Pillow reads the file, global_image resizes)
    against tiles read by tifffile and resized band by band, bands of one tile row and
    of several, in both of Pillow's pass orders (tall images take the vertical first)."""
    path = write_tiled(tmp_path / "a.tif", pixels(*in_size, seed=sum(in_size)))
    expected = global_image(read_image(path), size)
    with open_large_image(path) as image:
        for band_bytes in (1, 3 * in_size[1] * 3 * TILE):
            assert torch.equal(global_image_streamed(image, size, band_bytes=band_bytes), expected)


@pytest.mark.parametrize("in_size, size", [((97, 1301), (50, 700)), ((1301, 97), (50, 700)), ((64, 64), (64, 20)),
                                           ((64, 64), (20, 64)), ((64, 64), (64, 64)), ((5, 7), (300, 11))])
def test_banded_resize_equals_pil_bilinear(in_size, size):
    image = torch.from_numpy(pixels(*in_size).transpose(2, 0, 1).copy())
    expected = pil_bilinear(image, size)
    # pil_bilinear (whose rows pass now also serves ranges of outputs) is still Pillow's.
    pillow = Image.fromarray(pixels(*in_size)).resize((size[1], size[0]), Image.BILINEAR)
    assert torch.equal(expected, torch.from_numpy(np.array(pillow)).permute(2, 0, 1))

    def read(top, rows, left, cols):
        assert 0 <= top and top + rows <= in_size[0] and 0 <= left and left + cols <= in_size[1]
        return image[:, top:top + rows, left:left + cols]

    for band in (1, 7, 64, 10_000):
        assert torch.equal(pil_bilinear_banded(read, in_size, size, band), expected)


def test_pick_level_takes_the_smallest_level_four_times_the_global_size():
    levels = [(100_000, 80_000), (25_000, 20_000), (6_250, 5_000), (1_562, 1_250)]
    assert pick_level(levels, (508, 508)) == 2  # 1562 < 4 * 508
    assert pick_level(levels, (1_000, 1_000)) == 2
    assert pick_level(levels, (2_000, 1_000)) == 1  # 6250 < 4 * 2000
    assert pick_level(levels, (30_000, 30_000)) == 0  # nothing large enough: full resolution
    assert pick_level(levels[:1], (508, 508)) == 0


def test_global_image_from_a_level(files):
    with open_large_image(files["pyramid"]) as image:
        # 4 x (80, 100) fits in level 1 (350 x 450) but not level 2 (175 x 225).
        from_level = global_image_large(image, (80, 100))
        # Expected: the stored level 1, as tifffile reads it, resized by Pillow itself.
        level = tifffile.TiffFile(files["pyramid"]).series[0].levels[1].asarray()
        resized = np.asarray(Image.fromarray(level).resize((100, 80), Image.Resampling.BILINEAR))
        assert torch.equal(from_level, torch.from_numpy(resized.copy()).permute(2, 0, 1).float() / 255)
        assert torch.equal(global_image_large(image, (80, 100), exact=True), global_image(read_image(files["pyramid"]),
                                                                                          (80, 100)))
        assert not torch.equal(from_level, global_image_large(image, (80, 100), exact=True))


def test_global_image_from_a_slides_reduced_level(files):
    """A slide's level goes through OpenSlide: 4 x (40, 50) fits in its level 1 (175 x 225)."""
    with open_large_image(files["svs"]) as image:
        from_level = global_image_large(image, (40, 50))
    level = pixels()[::4, ::4]  # what write_svs stored as level 1
    resized = np.asarray(Image.fromarray(level).resize((50, 40), Image.Resampling.BILINEAR))
    assert torch.equal(from_level, torch.from_numpy(resized.copy()).permute(2, 0, 1).float() / 255)


# ------------------------------------------------------------------ writing


def class_map(height: int = H, width: int = W) -> np.ndarray:
    """Blocks of classes 0..6 with a diagonal edge: runs to compress, edges to check."""
    rows, cols = np.arange(height)[:, None], np.arange(width)[None, :]
    return ((rows // 37 + cols // 53 + (rows > cols)) % 7).astype(np.uint8)


def write_map(folder: Path, ids: np.ndarray, band: int = 100, **kw) -> ClassMapWriter:
    writer = ClassMapWriter(folder / "x_ids.tif", ids.shape, {"input": "x"}, DEEPGLOBE.colours,
                            preview=folder / "x_preview.png", tile=TILE, **kw)
    for top in range(writer.rows_done, ids.shape[0], band):
        writer.write_band(ids[top:top + band])
    writer.finish()
    writer.close()
    return writer


def majority_by_counting(ids: np.ndarray) -> np.ndarray:
    """The level below `ids`, block by block with a Counter: the class most often in each
    2 x 2 block, ties to the one met first in reading order; a last odd row or column
    counts twice (it stands in for the missing one)."""
    h, w = ids.shape
    out = np.empty((-(-h // 2), -(-w // 2)), np.uint8)
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            rows, cols = (2 * i, min(2 * i + 1, h - 1)), (2 * j, min(2 * j + 1, w - 1))
            counts = collections.Counter(int(ids[r, c]) for r in rows for c in cols)
            out[i, j] = max(counts, key=counts.get)  # max keeps the first of equal counts
    return out


@pytest.mark.parametrize("block, expected", [
    ([[1, 1], [2, 3]], 1), ([[2, 1], [1, 3]], 1), ([[3, 2], [2, 2]], 2), ([[4, 5], [5, 4]], 4),
    ([[1, 2], [3, 4]], 1), ([[6, 2], [3, 2]], 2),
])
def test_each_pyramid_pixel_is_its_blocks_majority(block, expected):
    assert majority_2x2(np.array(block, np.uint8)).tolist() == [[expected]]


def test_majority_of_odd_sized_maps_keeps_every_row_and_column(tmp_path):
    ids = np.random.default_rng(3).integers(0, 4, (9, 13), dtype=np.uint8)
    np.testing.assert_array_equal(majority_2x2(ids), majority_by_counting(ids))
    # Written: an odd level (301 x 421, its last tile row 45 rows high) reduced by the writer.
    ids = class_map(301, 421)
    write_map(tmp_path, ids, band=77)
    with tifffile.TiffFile(tmp_path / "x_ids.tif") as tif:
        pages = [page.asarray() for page in tif.pages]
    assert [p.shape for p in pages] == [(301, 421), (151, 211)]
    for above, level in zip(pages, pages[1:]):
        np.testing.assert_array_equal(level, majority_by_counting(above))


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
@pytest.mark.parametrize("pieces", [None, 64], ids=["whole-rows", "column-pieces"])
def test_written_class_map_reads_back_tiled_compressed_and_pyramidal(tmp_path, monkeypatch, pieces):
    if pieces:
        monkeypatch.setattr(tiled_writer, "MAJORITY_COLUMNS", pieces)
    ids = class_map()
    write_map(tmp_path, ids, band=77)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x_ids.tif", "x_preview.png"]
    path = tmp_path / "x_ids.tif"
    sizes = level_sizes(H, W, TILE)
    assert sizes == [(H, W), (350, 450), (175, 225)]
    with tifffile.TiffFile(path) as tif:
        pages = tif.pages
        assert [p.shape for p in pages] == sizes
        assert all(p.is_tiled and (p.tilelength, p.tilewidth) == (TILE, TILE) for p in pages)
        assert all(p.compression == tifffile.COMPRESSION.ADOBE_DEFLATE and p.dtype == np.uint8 for p in pages)
        assert [p.subfiletype for p in pages] == [0, 1, 1]  # reduced-resolution levels, in the main chain
        level = ids
        for page in pages:
            np.testing.assert_array_equal(page.asarray(), level)
            level = majority_by_counting(level)
    with rasterio.open(path) as ds:
        np.testing.assert_array_equal(ds.read(1), ids)
        assert ds.overviews(1) == [2, 4] and ds.block_shapes == [(TILE, TILE)]
        assert ds.colormap(1)[1] == (*DEEPGLOBE.colours[1], 255)  # viewers draw the class colours
    assert os.path.getsize(path) < ids.nbytes / 10


def test_class_map_carries_the_georeferencing(files, tmp_path):
    with open_large_image(files["geotiff"]) as image:
        georef = image.georef
    write_map(tmp_path, class_map(), georef=georef)
    with rasterio.open(tmp_path / "x_ids.tif") as out, rasterio.open(files["geotiff"]) as source:
        assert out.crs == source.crs and out.transform == source.transform
    with open_large_image(tmp_path / "x_ids.tif") as image:
        assert image.georef == georef


def test_class_map_carries_microns_per_pixel_to_slide_readers(tmp_path):
    import openslide

    write_map(tmp_path, class_map(), mpp=(0.25, 0.5))
    with open_large_image(tmp_path / "x_ids.tif") as image:
        assert image.mpp == pytest.approx((0.25, 0.5))
        np.testing.assert_array_equal(image.read_region(0, 0, H, W), DEEPGLOBE.colorize(class_map()))
    slide = openslide.OpenSlide(str(tmp_path / "x_ids.tif"))  # as QuPath opens it
    try:
        assert slide.level_dimensions == ((W, H), (450, 350), (225, 175))
        assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(0.5)
    finally:
        slide.close()


def test_preview_is_the_map_in_colours_at_most_2048(tmp_path):
    ids = class_map()
    write_map(tmp_path, ids)
    preview = np.asarray(Image.open(tmp_path / "x_preview.png"))
    np.testing.assert_array_equal(preview, DEEPGLOBE.colorize(ids))  # small maps: full size
    assert preview_size(100_000, 80_000) == (2048, 1638) and preview_size(10, 5000) == (4, 2048)


def test_interrupted_writing_leaves_no_output_and_resumes(tmp_path):
    ids = class_map()
    writer = ClassMapWriter(tmp_path / "x_ids.tif", ids.shape, {"input": "x"}, DEEPGLOBE.colours,
                            preview=tmp_path / "x_preview.png", tile=TILE)
    writer.write_band(ids[:100])
    writer.write_band(ids[100:250])
    writer.save_state({"done": 7, "kept": [torch.arange(3.0)]})
    writer.close()  # killed here: no finish
    assert not (tmp_path / "x_ids.tif").exists() and not (tmp_path / "x_preview.png").exists()
    data, index, state = partial_paths(tmp_path / "x_ids.tif")
    with open(data, "ab") as file:  # a band half appended when the process died
        file.write(b"half a band")
    resumed = ClassMapWriter(tmp_path / "x_ids.tif", ids.shape, {"input": "x"}, DEEPGLOBE.colours,
                             preview=tmp_path / "x_preview.png", tile=TILE)
    assert resumed.resumed and resumed.rows_done == 250
    kept = resumed.saved_state()
    assert kept["done"] == 7 and torch.equal(kept["kept"][0], torch.arange(3.0))
    resumed.close()
    write_map(tmp_path, ids, band=128)  # picks up at row 250
    with tifffile.TiffFile(tmp_path / "x_ids.tif") as tif:
        np.testing.assert_array_equal(tif.pages[0].asarray(), ids)
    assert not data.exists() and not index.exists() and not state.exists()


@pytest.mark.parametrize("rows", [100, 0])  # 0: the producer's state alone was kept
def test_partial_of_another_input_is_not_resumed_and_says_what_differs(tmp_path, rows):
    ids = class_map()
    before = {"input": "x", "amp": None, "code": "abc"}
    for identity, shape, differing in [({**before, "input": "y", "code": "abd"}, ids.shape, ["code", "input"]),
                                       ({**before, "torch": "2"}, ids.shape, ["torch"]),
                                       (before, (H, W + 1), [])]:  # the same facts, a store that does not fit them
        writer = ClassMapWriter(tmp_path / "x_ids.tif", ids.shape, before, DEEPGLOBE.colours, tile=TILE)
        if rows:
            writer.write_band(ids[:rows])
        writer.save_state({"done": 7})
        writer.close()
        fresh = ClassMapWriter(tmp_path / "x_ids.tif", shape, identity, DEEPGLOBE.colours, tile=TILE)
        assert not fresh.resumed and fresh.rows_done == 0 and fresh.saved_state() is None
        assert fresh.started_over == (rows, differing)
        fresh.close()


def test_a_store_damaged_on_disk_starts_over_and_says_so(tmp_path):
    ids = class_map()
    writer = ClassMapWriter(tmp_path / "x_ids.tif", ids.shape, {"input": "x"}, DEEPGLOBE.colours, tile=TILE)
    writer.write_band(ids[:100])
    writer.close()
    data = partial_paths(tmp_path / "x_ids.tif")[0]
    data.write_bytes(data.read_bytes()[:10])  # shorter than the band its index lists
    fresh = ClassMapWriter(tmp_path / "x_ids.tif", ids.shape, {"input": "x"}, DEEPGLOBE.colours, tile=TILE)
    assert not fresh.resumed and fresh.rows_done == 0 and fresh.started_over == (100, [])
    fresh.close()
    again = ClassMapWriter(tmp_path / "x_ids.tif", ids.shape, {"input": "x"}, DEEPGLOBE.colours, tile=TILE)
    assert again.started_over is None  # nothing kept to speak of
    again.close()


def test_a_damaged_producer_state_costs_only_the_work_it_saved(tmp_path):
    writer = ClassMapWriter(tmp_path / "x_ids.tif", (H, W), {"input": "x"}, DEEPGLOBE.colours, tile=TILE)
    assert writer.saved_state() is None
    writer.save_state({"done": 7})
    state = partial_paths(tmp_path / "x_ids.tif")[2]
    state.write_bytes(state.read_bytes()[:20])
    assert writer.saved_state() is None
    writer.close()


def test_file_identity_changes_with_the_input(tmp_path):
    path = tmp_path / "in.tif"
    path.write_bytes(b"1")
    before = file_identity(path)
    path.write_bytes(b"22")
    assert file_identity(path) != before and json.loads(json.dumps(before)) == before


def test_interrupt_while_finishing_leaves_no_file_and_the_partial(tmp_path):
    ids = class_map()
    writer = ClassMapWriter(tmp_path / "x_ids.tif", ids.shape, {"input": "x"}, DEEPGLOBE.colours,
                            preview=tmp_path / "x_preview.png", tile=TILE)
    writer.write_band(ids)

    def interrupt(done, total):
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        writer.finish(interrupt)
    writer.close()
    # No output, no temporary file: only the partial store, to finish from.
    assert sorted(p.name for p in tmp_path.iterdir()) == [".x_ids.tif.partial", ".x_ids.tif.partial.json"]
    write_map(tmp_path, ids)
    with tifffile.TiffFile(tmp_path / "x_ids.tif") as tif:
        np.testing.assert_array_equal(tif.pages[0].asarray(), ids)


class FullDisk:
    """A file whose writes fail as on a full disk; everything else goes to the real file."""

    def __init__(self, file):
        self.file = file

    def write(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name):
        return getattr(self.file, name)


def test_full_disk_while_finishing_is_one_line_and_leaves_nothing(tmp_path):
    ids = class_map()
    writer = ClassMapWriter(tmp_path / "x_ids.tif", ids.shape, {"input": "x"}, DEEPGLOBE.colours,
                            preview=tmp_path / "x_preview.png", tile=TILE)
    writer.write_band(ids)

    def full(done, total):  # raised where tifffile's writes would raise it
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(WriteError) as error:
        writer.finish(full)
    assert "cannot write (No space left on device" in one_line_naming(error, tmp_path / "x_ids.tif")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".x_ids.tif.partial", ".x_ids.tif.partial.json"]
    writer.close()


class FullOnFlush(FullDisk):
    """A file whose writes are buffered and fail when flushed, and again when closed (the
    file is closed all the same), as a buffered file's on a full disk."""

    def write(self, data):
        return len(data)

    def flush(self):
        raise OSError(errno.ENOSPC, "No space left on device")

    def close(self):
        self.file.close()
        self.flush()


def test_full_disk_while_writing_a_level_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    ids = class_map()
    writer = ClassMapWriter(tmp_path / "x_ids.tif", ids.shape, {"input": "x"}, DEEPGLOBE.colours, tile=TILE)
    writer.write_band(ids)
    assert len(level_sizes(*ids.shape, TILE)) > 1  # a level below full resolution to fail on
    real_open = open

    def opening(path, *args, **kwargs):  # the stores of the levels below fill the disk
        file = real_open(path, *args, **kwargs)
        return FullOnFlush(file) if ".level" in Path(path).name else file

    monkeypatch.setattr(band_store, "open", opening, raising=False)
    with pytest.raises(WriteError) as error:
        writer.finish()
    assert "No space left on device" in one_line_naming(error, tmp_path / "x_ids.tif")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".x_ids.tif.partial", ".x_ids.tif.partial.json"]
    writer.close()


def test_full_disk_while_writing_a_band_keeps_the_bands_before(tmp_path):
    ids = class_map()
    writer = ClassMapWriter(tmp_path / "x_ids.tif", ids.shape, {"input": "x"}, DEEPGLOBE.colours, tile=TILE)
    writer.write_band(ids[:100])
    writer.store._file = FullDisk(writer.store._file)
    with pytest.raises(WriteError) as error:
        writer.write_band(ids[100:200])
    assert "No space left on device" in one_line_naming(error, partial_paths(tmp_path / "x_ids.tif")[0])
    writer.close()
    again = ClassMapWriter(tmp_path / "x_ids.tif", ids.shape, {"input": "x"}, DEEPGLOBE.colours, tile=TILE)
    assert again.resumed and again.rows_done == 100
    again.close()


def test_bands_must_fit_the_map(tmp_path):
    writer = ClassMapWriter(tmp_path / "x_ids.tif", (10, 20), {}, DEEPGLOBE.colours, tile=TILE)
    for bad in [np.zeros((5, 21), np.uint8), np.zeros((5, 20), np.int64), np.zeros((11, 20), np.uint8)]:
        with pytest.raises(ValueError):
            writer.write_band(bad)
    with pytest.raises(ValueError, match="write them all first"):
        writer.finish()
    writer.close()
    assert not (tmp_path / "x_ids.tif").exists()  # nothing under the final name


# ------------------------------------------------------------------ layering


@pytest.mark.parametrize("module", ["utils/banded_resample.py", "utils/band_store.py", "utils/georef.py",
                                    "utils/tiled_writer.py", "dataset/large_image.py", "dataset/large_files.py",
                                    "dataset/tiff_image.py", "dataset/slide_image.py", "dataset/streamed_global.py"])
def test_new_modules_keep_the_layers(module):
    allowed = {"utils": ("utils",), "dataset": ("utils", "dataset")}[module.split("/")[0]]
    ours = {"utils", "dataset", "models", "helper", "predict", "train_deep_globe"}
    for node in ast.walk(ast.parse((ROOT / module).read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
        for name in names:
            top = name.split(".")[0]
            assert top not in ours or top in allowed, f"{module} imports {name}"


def test_world_files_are_found_where_gdal_looks(tmp_path):
    raster = tmp_path / "scene.tiff"
    assert world_file(raster) is None
    for name in ("scene.wld", "scene.TIFFW", "scene.tfw"):  # later names GDAL tries first
        (tmp_path / name).write_text("1\n0\n0\n-1\n0.5\n-0.5\n")
        assert world_file(raster) == tmp_path / name
    assert world_file(tmp_path / "scene") is None
    assert world_file_name("scene_ids.tif") == "scene_ids.tfw"
