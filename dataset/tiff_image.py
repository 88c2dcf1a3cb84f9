"""TIFF and GeoTIFF images read tile by tile with tifffile (see dataset.large_files).

tifffile parses the file's tables and decodes one tile (or strip) at a time by its index;
the tiles under a region are read, decoded, cut and joined here. Checks that need only
the tables (compression, pixel format, a file cut short) run when the file is opened, so
a bad file fails before hours of work, not in the middle.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, Optional
from xml.etree import ElementTree

import numpy as np
import tifffile
from tifffile import COMPRESSION, PHOTOMETRIC, PLANARCONFIG, TIFF

from dataset.large_image import LargeImage
from utils.errors import DataError, one_line, opening
from utils.georef import GEOTIFF_TAGS, Georef

# Decoded tiles kept for neighbouring regions (patches overlap, and a band's tiles serve
# every patch in it): a bound, not a size to fill.
TILE_CACHE_BYTES = 64 << 20
# The largest tile or strip decoded at once: a TIFF stored as one huge strip would need
# the whole image in memory to read any part of it.
MAX_SEGMENT_BYTES = 256 << 20
RESOLUTION_CENTIMETER = 3
ORIENTATION = 274  # the TIFF tag
REDUCED_IMAGE = 1  # NewSubfileType bit: a reduced-resolution copy of another image
# OME-XML's length units, in microns (its default unit); both spellings of "micro".
OME_MICRONS = {"pm": 1e-6, "\u00c5": 1e-4, "nm": 1e-3, "\u00b5m": 1.0, "\u03bcm": 1.0, "um": 1.0, "mm": 1e3,
               "cm": 1e4, "m": 1e6, "in": 25400.0}
REPAIR = "re-download or re-export it"
SAVE_TILED = ("re-save it as a tiled TIFF (e.g. vips tiffsave IN OUT --tile --pyramid --compression deflate, "
              "or gdal_translate -co TILED=YES -co COMPRESS=DEFLATE IN OUT)")


class TiffFacts(NamedTuple):
    """What decides the way a TIFF goes (dataset.large_files.is_large_image_file)."""

    pixels: int  # of the full-resolution image
    structured: bool  # tiled, pyramidal or georeferenced
    eight_bit: bool  # 8-bit unsigned samples
    upright: bool  # no Orientation tag, or 1 (the region reader reads tiles as stored)


class _HeldWhileParsing(logging.Filter):
    """Holds back tifffile's warnings in the threads that are parsing a file's tables, for
    the parser to report in its own words.

    tifffile logs what it finds wrong there (a page past the file's end, a corrupt tag
    list), and leaves out what it cannot read, before this module's checks name the
    problem in one line. Per thread, not by the logger's level, as readers open files side
    by side."""

    def __init__(self) -> None:
        super().__init__()
        self._held: dict[int, list[str]] = {}
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        with self._lock:
            held = self._held.get(record.thread) if record.levelno >= logging.WARNING else None
        if held is None:
            return True
        held.append(re.sub(r"^<[^>]*>\s*", "", record.getMessage()))  # less tifffile's "<TiffFile 'x.tif'>"
        return False

    @contextlib.contextmanager
    def parsing(self) -> Iterator[list[str]]:
        """The warnings tifffile logs in this thread meanwhile, held back (not nested)."""
        thread, held = threading.get_ident(), []
        with self._lock:
            self._held[thread] = held
        try:
            yield held
        finally:
            with self._lock:
                del self._held[thread]


_HELD = _HeldWhileParsing()
tifffile.logger().addFilter(_HELD)


def _unreadable(path: Path, error: Exception) -> DataError:
    return DataError(f"{path}: not a TIFF file tifffile can read ({one_line(error)}); check the file, or {SAVE_TILED}")


def _open(path: Path) -> tifffile.TiffFile:
    with opening(path, "a TIFF file", "no such file; check the path"):
        try:
            return tifffile.TiffFile(path)
        except (FileNotFoundError, IsADirectoryError, PermissionError):
            raise
        except Exception as error:  # tifffile's many ways of saying "not a TIFF it can parse"
            raise _unreadable(path, error) from None


def _level_pages(path: Path, tif: tifffile.TiffFile) -> list[tifffile.TiffPage]:
    """The pages of the first image's pyramid, full resolution first (tifffile gathers
    SubIFD and reduced-resolution pyramids alike)."""
    try:
        series = tif.series  # parsed here, on first use
    except Exception as error:  # as in _open: tables cut short, or worse
        raise _unreadable(path, error) from None
    if not series:
        raise DataError(f"{path}: holds no image; check the file")
    pages = [level.keyframe for level in series[0].levels]
    if not pages or pages[0] is None:
        raise DataError(f"{path}: holds no image; check the file")
    return pages


def describe_tiff(path: Path) -> TiffFacts:
    """TiffFacts of the file's first image, from its tables only. DataError if it
    cannot be parsed."""
    with _HELD.parsing(), _open(path) as tif:
        pages = _level_pages(path, tif)
        base = pages[0]
        return TiffFacts(
            pixels=int(base.imagelength) * int(base.imagewidth),
            structured=bool(base.is_tiled) or len(pages) > 1 or any(code in base.tags for code in GEOTIFF_TAGS),
            eight_bit=base.bitspersample == 8 and base.sampleformat == 1,
            upright=base.tags.valueof(ORIENTATION, 1) == 1,
        )


@dataclass
class _Level:
    """How one page's pixels are stored and turned to RGB."""

    page: tifffile.TiffPage
    decode: Callable
    height: int
    width: int
    seg_h: int  # rows of a tile, or of a strip
    seg_w: int
    per_row: int  # tiles across
    per_plane: int  # tiles in one plane (planar configuration "separate" stores a plane per sample)
    channels: tuple[int, ...]  # the samples read: (0,) grey or palette, (0, 1, 2) colour
    separate: bool
    to_rgb: Callable[[np.ndarray], np.ndarray]


def _rgb_rule(path: Path, page: tifffile.TiffPage) -> tuple[tuple[int, ...], Callable[[np.ndarray], np.ndarray]]:
    """The samples to read and how to make (h, w, 3) RGB of them, as Pillow's convert("RGB")
    does for the formats both read; DataError for pixels that are not 8-bit RGB or grey."""
    photometric, samples = int(page.photometric), int(page.samplesperpixel)
    if page.bitspersample != 8 or page.sampleformat != 1:
        kind = {1: "unsigned", 2: "signed", 3: "floating-point"}.get(int(page.sampleformat), "")
        raise DataError(f"{path}: pixels are {page.bitspersample}-bit {kind} samples, but large images are read as "
                        "8-bit RGB or grey; convert it (e.g. gdal_translate -ot Byte -scale, or vips cast uchar) and "
                        f"{SAVE_TILED.split(' (')[0]}")
    grey = (PHOTOMETRIC.MINISBLACK, PHOTOMETRIC.MINISWHITE)
    if photometric in grey and samples < 3:
        invert = photometric == PHOTOMETRIC.MINISWHITE
        return (0,), lambda a: np.repeat(255 - a if invert else a, 3, axis=-1)
    # Colour: RGB (alpha or other extra samples dropped), YCbCr that the JPEG decoder turns
    # to RGB, and GDAL's band-interleaved 3-band rasters, which it marks MinIsBlack.
    jpeg = page.compression in (COMPRESSION.JPEG, COMPRESSION.OJPEG)
    if samples >= 3 and (photometric in (PHOTOMETRIC.RGB, PHOTOMETRIC.MINISBLACK)
                         or photometric == PHOTOMETRIC.YCBCR and jpeg):
        return (0, 1, 2), lambda a: a
    if photometric == PHOTOMETRIC.PALETTE and samples == 1 and page.colormap is not None:
        # Pillow keeps the high byte of TIFF's 16-bit palette entries.
        lut = (np.asarray(page.colormap, dtype=np.uint16) >> 8).astype(np.uint8).T.copy()  # (256, 3)
        return (0,), lambda a: lut[a[..., 0]]
    name = PHOTOMETRIC(photometric).name if photometric in set(PHOTOMETRIC) else str(photometric)
    raise DataError(f"{path}: pixels are {name} with {samples} sample(s) per pixel, which is not RGB or grey; convert "
                    f"it to 8-bit RGB and {SAVE_TILED.split(' (')[0]}")


class _Damaged(DataError):
    """A page's tiles are not all in the file: cut short, or listed wrongly."""

    def __init__(self, path: Path, problem: str) -> None:
        super().__init__(f"{path}: {problem}; {REPAIR}")
        self.problem = problem


def _level(path: Path, page: tifffile.TiffPage, file_size: int) -> _Level:
    """_Level of a page; DataError for what this reader cannot read in it (_Damaged where
    the file is damaged there)."""
    compression = int(page.compression)
    if compression != 1 and compression not in TIFF.DECOMPRESSORS:
        name = COMPRESSION(compression).name if compression in set(COMPRESSION) else "an unknown method"
        raise DataError(f"{path}: compressed with {name} (TIFF compression {compression}), which this installation "
                        f"cannot decode (imagecodecs has no codec for it); {SAVE_TILED}")
    if page.imagedepth != 1:
        raise DataError(f"{path}: is a volume ({page.imagedepth} slices deep), not a 2-D image; save one slice")
    orientation = page.tags.valueof(ORIENTATION, 1)
    if orientation != 1:
        # Viewers turn such an image as the tag says; reading tiles as stored would not.
        raise DataError(f"{path}: has TIFF orientation {orientation} (stored turned or flipped), which the tile "
                        f"reader does not apply; {SAVE_TILED.replace('re-save it', 're-save it upright')}")
    channels, to_rgb = _rgb_rule(path, page)
    height, width = int(page.imagelength), int(page.imagewidth)
    if page.is_tiled:
        seg_h, seg_w = int(page.tilelength), int(page.tilewidth)
    else:
        seg_h, seg_w = min(int(page.rowsperstrip) or height, height), width
    separate = page.planarconfig == PLANARCONFIG.SEPARATE
    if seg_h * seg_w * (1 if separate else page.samplesperpixel) > MAX_SEGMENT_BYTES:
        raise DataError(f"{path}: stored in pieces of {seg_h} x {seg_w} pixels, too large to decode one at a time; "
                        f"{SAVE_TILED}")
    per_row = -(-width // seg_w)
    per_plane = -(-height // seg_h) * per_row
    expected = per_plane * (page.samplesperpixel if separate else 1)
    if len(page.dataoffsets) != expected or len(page.databytecounts) != expected:
        raise _Damaged(path, f"lists {len(page.dataoffsets)} tiles where a {height} x {width} image needs "
                             f"{expected} (the file is corrupt)")
    ends = [o + n for o, n in zip(page.dataoffsets, page.databytecounts) if n]
    if ends and max(ends) > file_size:
        raise _Damaged(path, f"is truncated (its tiles reach byte {max(ends)}, the file ends at byte {file_size})")
    return _Level(page, page.decode, height, width, seg_h, seg_w, per_row, per_plane, channels, separate, to_rgb)


class TiffImage(LargeImage):
    """A TIFF or GeoTIFF read tile by tile (open it with dataset.large_files.open_large_image).

    Reduced-resolution levels this reader cannot use (another pixel format or
    compression than the full-resolution one can have, or damage: see `damaged`) are left
    out of `levels`.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        with _HELD.parsing() as logged:
            self._tif = _open(self.path)
            try:
                self._setup()
            except BaseException:
                self._tif.close()
                raise
        if logged:  # what it could not parse (a level's table, say) tifffile left out; or a harmless oddity
            self.damaged += (f"{self.path}: tifffile reports, reading its tables: {'; '.join(dict.fromkeys(logged))}",)
        self._cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._cached_bytes = 0
        self._lock = threading.Lock()  # the file position and the cache, for reads from several threads

    def _setup(self) -> None:
        pages = _level_pages(self.path, self._tif)
        if pages[0].subfiletype & REDUCED_IMAGE:
            raise DataError(f"{self.path}: has no full-resolution level (its largest image is marked as a reduced-"
                            "resolution copy); export the image with its full-resolution level")
        size = os.fstat(self._tif.filehandle.fileno()).st_size
        self._levels = [_level(self.path, pages[0], size)]
        damaged = []
        for page in pages[1:]:
            try:
                self._levels.append(_level(self.path, page, size))
            except _Damaged as error:
                damaged.append(f"{self.path}: its {page.imagelength} x {page.imagewidth} level {error.problem}, and is "
                               f"left out; {REPAIR}")
            except DataError:
                pass  # another pixel format or compression: a level to do without
        self.damaged = tuple(damaged)
        self.levels = [(lv.height, lv.width) for lv in self._levels]
        self.georef = self._georef(pages[0])
        self.mpp = None if self.georef is not None else _ome_mpp(self._tif.ome_metadata) or _mpp(pages[0])

    def _georef(self, page: tifffile.TiffPage) -> Optional[Georef]:
        """The GeoTIFF tags as stored, and the CRS and transform GDAL (rasterio) reads from them."""
        tags = tuple((code, int(page.tags[code].dtype), int(page.tags[code].count), page.tags[code].value)
                     for code in GEOTIFF_TAGS if code in page.tags)
        if not tags:
            return None
        import rasterio  # GDAL: loaded only for GeoTIFFs
        from rasterio.errors import NotGeoreferencedWarning, RasterioError

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", NotGeoreferencedWarning)
                with rasterio.open(self.path) as ds:
                    crs = ds.crs.to_string() if ds.crs else None
                    transform = None if ds.transform.is_identity else tuple(float(v) for v in ds.transform[:6])
        except RasterioError as error:
            raise DataError(f"{self.path}: its GeoTIFF georeferencing cannot be read ({one_line(error)}); fix the "
                            "file's GeoTIFF tags (e.g. gdal_translate with -a_srs and -a_ullr)") from None
        return Georef(crs, transform, tags)  # type: ignore[arg-type]

    def block_rows(self, level: int) -> int:
        return self._levels[level].seg_h

    def _segment(self, level: int, index: int) -> np.ndarray:
        """Tile (or strip) `index` of a level decoded, (h, w, samples), from the cache if there."""
        key = (level, index)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        lv = self._levels[level]
        offset, count = lv.page.dataoffsets[index], lv.page.databytecounts[index]
        if count == 0:  # a sparse tile (GDAL leaves empty blocks unwritten): zeros
            samples = 1 if lv.separate else int(lv.page.samplesperpixel)
            return np.zeros((lv.seg_h, lv.seg_w, samples), np.uint8)
        with self._lock:
            fh = self._tif.filehandle
            fh.seek(offset)
            data = fh.read(count)
        if len(data) < count:
            raise DataError(f"{self.path}: is truncated (tile {index} of level {level} is cut short); re-download or "
                            "re-export it")
        try:
            segment = lv.decode(data, index, jpegtables=lv.page.jpegtables)[0]
        except MemoryError:
            raise
        except Exception as error:  # the codecs' many error types: the tile's bytes are bad
            raise DataError(f"{self.path}: cannot decode tile {index} of level {level} ({one_line(error)}); the file is "
                            "truncated or corrupt, re-download or re-export it") from None
        if segment is None or segment.ndim != 4:
            raise DataError(f"{self.path}: cannot decode tile {index} of level {level}; the file is corrupt, re-export it")
        segment = segment[0]
        with self._lock:
            self._cache[key] = segment
            self._cached_bytes += segment.nbytes
            while self._cached_bytes > TILE_CACHE_BYTES and len(self._cache) > 1:
                self._cached_bytes -= self._cache.popitem(last=False)[1].nbytes
        return segment

    def _read(self, level: int, top: int, left: int, height: int, width: int) -> np.ndarray:
        lv = self._levels[level]
        out = np.empty((height, width, len(lv.channels)), np.uint8)
        for row in range(top // lv.seg_h, (top + height - 1) // lv.seg_h + 1):
            y0, y1 = max(top, row * lv.seg_h), min(top + height, (row + 1) * lv.seg_h)
            for col in range(left // lv.seg_w, (left + width - 1) // lv.seg_w + 1):
                x0, x1 = max(left, col * lv.seg_w), min(left + width, (col + 1) * lv.seg_w)
                target = out[y0 - top:y1 - top, x0 - left:x1 - left]
                source = (slice(y0 - row * lv.seg_h, y1 - row * lv.seg_h), slice(x0 - col * lv.seg_w, x1 - col * lv.seg_w))
                index = row * lv.per_row + col
                if lv.separate:
                    for k, channel in enumerate(lv.channels):
                        target[..., k] = self._segment(level, channel * lv.per_plane + index)[source][..., 0]
                else:
                    target[...] = self._segment(level, index)[source][..., list(lv.channels)]
        return lv.to_rgb(out)

    def close(self) -> None:
        self._tif.close()
        self._cache.clear()


def _ome_mpp(xml: Optional[str]) -> Optional[tuple[float, float]]:
    """(y, x) microns per pixel of the first image of an OME-TIFF (QuPath and bfconvert
    write them there, not always in the resolution tags), or None. The first Pixels
    element is the file's first series, the one read, except in multi-file OME sets."""
    if not xml:
        return None
    try:
        pixels = next(e for e in ElementTree.fromstring(xml).iter() if e.tag.rpartition("}")[2] == "Pixels")

        def microns(axis: str) -> float:
            unit = pixels.attrib.get(f"PhysicalSize{axis}Unit", "\u00b5m")
            return float(pixels.attrib[f"PhysicalSize{axis}"]) * OME_MICRONS[unit]

        y, x = microns("Y"), microns("X")
    except (ElementTree.ParseError, StopIteration, KeyError, ValueError):
        return None
    return (y, x) if 0 < y < math.inf and 0 < x < math.inf else None


def _mpp(page: tifffile.TiffPage) -> Optional[tuple[float, float]]:
    """(y, x) microns per pixel from the resolution tags, when they are per centimetre
    (what microscopy software writes; a resolution per inch is usually a print DPI)."""
    if page.resolutionunit != RESOLUTION_CENTIMETER:
        return None
    try:
        (xn, xd), (yn, yd) = page.tags["XResolution"].value, page.tags["YResolution"].value
        return 1e4 * yd / yn, 1e4 * xd / xn
    except (KeyError, ValueError, TypeError, ZeroDivisionError):
        return None
