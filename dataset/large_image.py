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

import abc
import contextlib
from pathlib import Path
from types import TracebackType
from typing import Optional, Union

import numpy as np
import torch

from utils.errors import DataError
from utils.georef import Georef

PathLike = Union[str, Path]
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
# read_level refuses levels larger than this: read bigger ones by regions.
MAX_LEVEL_PIXELS = 64 * 1024 * 1024


class LargeImage(abc.ABC):
    """An image read by regions, in RGB uint8, from its full-resolution level or a
    reduced one. Close it (or use it as a context manager) to release the file.

    Attributes:
        path: the file.
        levels: (H, W) of each pyramid level, full resolution first, largest to smallest.
        georef: GeoTIFF georeferencing, or None.
        mpp: (y, x) microns per pixel of the full-resolution level, or None.
    """

    path: Path
    levels: list[tuple[int, int]]
    georef: Optional[Georef] = None
    mpp: Optional[tuple[float, float]] = None

    @property
    def size(self) -> tuple[int, int]:
        """(H, W) of the full-resolution level."""
        return self.levels[0]

    def read_region(self, top: int, left: int, height: int, width: int, level: int = 0) -> np.ndarray:
        """The pixels of rows [top, top + height) and columns [left, left + width) of a
        level (in that level's pixels), as (height, width, 3) uint8 RGB: grey replicated,
        palettes expanded, alpha dropped.

        Memory: the result, plus the decoded tiles under it (cached up to a bound).

        Raises:
            ValueError: a region not wholly inside the level, or an empty one.
            DataError: the file cannot be decoded there (truncated, corrupt).
        """
        self._check_region(level, top, left, height, width)
        return self._read(level, top, left, height, width)

    def read_level(self, level: int) -> np.ndarray:
        """A whole reduced level, (H, W, 3) uint8; only for levels up to MAX_LEVEL_PIXELS
        (larger ones: read_region by bands)."""
        h, w = self.levels[level]
        if h * w > MAX_LEVEL_PIXELS:
            raise ValueError(f"level {level} is {h} x {w} pixels, over the {MAX_LEVEL_PIXELS} read whole; read it "
                             "by regions")
        return self._read(level, 0, 0, h, w)

    def block_rows(self, level: int) -> int:
        """Rows of the level's storage unit (tile or strip height): reads in bands of a
        multiple of it decode each tile once. 1 where unknown."""
        return 1

    def global_levels(self) -> list[tuple[int, int]]:
        """The levels a global image may be made from, as `levels` with (0, 0) for any
        that cannot be read exactly in bounded memory (never the full-resolution one)."""
        return self.levels

    @abc.abstractmethod
    def _read(self, level: int, top: int, left: int, height: int, width: int) -> np.ndarray:
        """read_region after its checks."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the file."""

    def _check_region(self, level: int, top: int, left: int, height: int, width: int) -> None:
        if not 0 <= level < len(self.levels):
            raise ValueError(f"level {level} does not exist: the image has levels 0..{len(self.levels) - 1}")
        h, w = self.levels[level]
        if height < 1 or width < 1 or top < 0 or left < 0 or top + height > h or left + width > w:
            raise ValueError(f"region rows {top}..{top + height}, columns {left}..{left + width} is not a non-empty "
                             f"region inside level {level} of {self.path} ({h} x {w})")

    def __enter__(self) -> LargeImage:
        return self

    def __exit__(self, kind: Optional[type], error: Optional[BaseException], trace: Optional[TracebackType]) -> None:
        self.close()


class RegionView:
    """The full-resolution level of a LargeImage as a (3, H, W) uint8 tensor whose slices
    are read when taken: `view[..., top:bottom, left:right]` reads that region from the
    file onto `device`. What patch cutting (utils.patches.extract_patches) needs, and no more.
    """

    def __init__(self, image: LargeImage, device: torch.device | str = "cpu") -> None:
        self.image, self.device = image, torch.device(device)
        self.shape = torch.Size((3, *image.size))

    def __getitem__(self, key: tuple) -> torch.Tensor:
        if not (isinstance(key, tuple) and len(key) == 3 and key[0] is Ellipsis
                and all(isinstance(k, slice) and k.step in (None, 1) for k in key[1:])):
            raise TypeError(f"a region is read as view[..., rows, columns], got {key!r}")
        (top, bottom, _), (left, right, _) = (k.indices(n) for k, n in zip(key[1:], self.image.size))
        pixels = np.require(self.image.read_region(top, left, bottom - top, right - left), requirements="W")
        return torch.from_numpy(pixels).to(self.device).permute(2, 0, 1)


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
                            f"({' '.join(str(error).split()) or type(error).__name__}); install it with "
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
        from dataset.slide_image import SlideImage

        return SlideImage(path, vendor)
    if path.suffix.lower() in TIFF_SUFFIXES + TIFF_SLIDE_SUFFIXES:
        from dataset.tiff_image import TiffImage

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
    from dataset.tiff_image import describe_tiff

    with contextlib.suppress(DataError):
        facts = describe_tiff(path)
        return facts.pixels > LARGE_PIXELS or (facts.structured and facts.eight_bit and facts.upright)
    return False
