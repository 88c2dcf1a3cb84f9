"""Images too large to decode whole: tiled and pyramidal TIFF, GeoTIFF and whole-slide
images, read region by region.

    with open_large_image("slide.svs") as image:
        patch = image.read_region(top, left, 508, 508)   # (508, 508, 3) uint8 RGB

Two readers stand behind LargeImage:
  * tifffile (dataset.tiff_image) for TIFF and GeoTIFF: it decodes any one tile or strip
    by its index, so a region costs the tiles under it, and every way a tile can fail is
    ours to name; GeoTIFF georeferencing is read by rasterio (GDAL), which knows every CRS
    encoding, and the tags themselves are kept to copy into outputs (utils.georef).
  * OpenSlide (dataset.slide_image) for the slide formats it recognises by their vendor
    (Aperio SVS, Hamamatsu NDPI/VMS, Leica SCN, MIRAX, Philips, Ventana, ...): it knows
    each vendor's level layout, microns per pixel and background, which a plain TIFF reader
    would have to guess. Plain tiled TIFFs OpenSlide calls "generic-tiff" go to tifffile.

Every failure caused by the file is a DataError naming it and saying what to do.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Optional

from dataset.io import PathLike
from dataset.large_image import LargeImage
from dataset.tiff_image import TiffImage, describe_tiff
from utils.errors import DataError, one_line

# Suffixes of the TIFF family (BigTIFF's .btf/.tf8/.tf2 included).
TIFF_SUFFIXES = (".tif", ".tiff", ".btf", ".tf8", ".tf2")
# Whole-slide formats: TIFF-based ones (which tifffile reads where OpenSlide does not
# recognise the file), and others only OpenSlide reads.
TIFF_SLIDE_SUFFIXES = (".svs", ".ndpi", ".scn", ".bif", ".qptiff")
SLIDE_SUFFIXES = TIFF_SLIDE_SUFFIXES + (".mrxs", ".vms", ".vmu", ".svslide")
LARGE_IMAGE_SUFFIXES = TIFF_SUFFIXES + SLIDE_SUFFIXES
# A TIFF with more pixels than this goes the region-by-region way even when stored in
# strips: decoding it whole (3 bytes a pixel, and the tensors made of it) would pass a
# few GB, and predict.py's in-memory path was measured up to 8000 x 8000.
LARGE_PIXELS = 10_000 * 10_000


def _slide_format(path: Path) -> Optional[str]:
    """OpenSlide's name for the file's vendor format, or None (not a slide; or OpenSlide is
    not installed and the file is a TIFF, which tifffile reads).

    Raises:
        DataError: a slide suffix while OpenSlide cannot be loaded.
    """
    try:
        import openslide  # a native library: loaded only for files that may be slides
    except (ImportError, OSError) as error:
        if path.suffix.lower() in SLIDE_SUFFIXES:
            raise DataError(f"{path}: reading {path.suffix} slides needs OpenSlide, which did not load "
                            f"({one_line(error)}); install it with "
                            "pip install -r requirements.txt (openslide-python and openslide-bin)") from None
        return None
    try:
        return openslide.OpenSlide.detect_format(str(path))
    except Exception:  # what detection cannot open, the TIFF reader names
        return None


def open_large_image(path: PathLike) -> LargeImage:
    """Open a TIFF, GeoTIFF or whole-slide image for reading by regions (see the module
    docstring for which reader takes which file).

    Memory: the file's tile tables (a few bytes per tile) and a cache of decoded tiles
    (dataset.tiff_image.TILE_CACHE_BYTES); OpenSlide keeps its own cache.

    Raises:
        DataError: a file missing, unreadable, of no format read here, without a
            full-resolution level, of pixels that are not 8-bit RGB or grey, or compressed
            in a way this installation cannot decode.
    """
    path = Path(path)
    if not path.is_file():
        problem = "is a folder, not an image" if path.is_dir() else "no such file"
        raise DataError(f"{path}: {problem}; check the path")
    vendor = _slide_format(path)
    if vendor not in (None, "generic-tiff"):
        from dataset.slide_image import SlideImage  # imports OpenSlide, which _slide_format found

        return SlideImage(path, vendor)
    if path.suffix.lower() in TIFF_SUFFIXES + TIFF_SLIDE_SUFFIXES:
        return TiffImage(path)
    raise DataError(f"{path}: not a format read region by region (TIFF, GeoTIFF, or a slide OpenSlide reads); "
                    "convert it to a tiled TIFF (e.g. vips tiffsave --tile --pyramid) or check the file")


def is_large_image_file(path: PathLike) -> bool:
    """Whether `path` goes the region-by-region way (open_large_image, a tiled class map
    out) rather than predict.py's in-memory one (Pillow, PNGs out).

    The rule: slide suffixes always; TIFF suffixes when the file is tiled, pyramidal or a
    GeoTIFF, of 8-bit samples and stored upright, or when it has more than LARGE_PIXELS
    pixels whatever else (the region reader then refuses what it cannot read, with a
    reason). A small TIFF in strips, a small 16-bit one (X-rays) or a small one stored
    turned stays on the in-memory path, which reads 16-bit grey and applies the
    Orientation tag; so do PNG and JPEG, and a TIFF tifffile cannot parse (the in-memory
    path names its problem).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in SLIDE_SUFFIXES:
        return True
    if suffix not in TIFF_SUFFIXES:
        return False
    with contextlib.suppress(DataError):
        facts = describe_tiff(path)
        return facts.pixels > LARGE_PIXELS or (facts.structured and facts.eight_bit and facts.upright)
    return False
