"""Where a raster lies on the Earth, as read from a GeoTIFF (or a world file beside a plain
TIFF) and copied into outputs.

The GeoTIFF tags are kept as stored, not rebuilt from the CRS: an output of the same
width and height as its input is then georeferenced exactly as the input is (user-defined
projections, PixelIsPoint rasters and tie-point grids included), with no CRS library
needed to write it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

# The GeoTIFF tags (OGC GeoTIFF 1.1): ModelPixelScale, ModelTiepoint, ModelTransformation,
# GeoKeyDirectory, GeoDoubleParams, GeoAsciiParams; GDAL's nodata and metadata ride along
# (42112 GDAL_METADATA, 42113 GDAL_NODATA) only when asked for, they describe the pixels.
GEOTIFF_TAGS = (33550, 33922, 34264, 34735, 34736, 34737)

# A tag as tifffile's TiffWriter.write(extratags=...) takes it: (code, TIFF data type
# number, count, value); value a tuple of numbers, or a str for ASCII (type 2).
TagValue = Union[tuple, str]
GeoTag = tuple[int, int, int, TagValue]
Affine = tuple[float, float, float, float, float, float]


@dataclass(frozen=True)
class Georef:
    """A raster's georeferencing.

    crs: the coordinate reference system as "EPSG:<code>" where it has one, else WKT;
        None when the tags define no CRS.
    transform: the affine pixel-to-map transform (a, b, c, d, e, f), x = a*col + b*row + c,
        y = d*col + e*row + f (the `affine` package's and GDAL's order, of pixel corners);
        None for rasters placed by ground control points only.
    tags: the GeoTIFF tags as stored in the input, to copy into outputs of the same size.
    """

    crs: Optional[str]
    transform: Optional[Affine]
    tags: tuple[GeoTag, ...]


def world_file(raster: Path) -> Optional[Path]:
    """The world file beside `raster` that GDAL would read for it, or None: <stem>.tfw
    (first and last letters of the suffix, then w), <stem>.tifw (suffix then w) or
    <stem>.wld, in lower or upper case. Six lines: the pixel size and rotation terms and
    the map position of the first pixel's centre."""
    suffix = raster.suffix.lstrip(".")
    if not suffix:
        return None
    for name in (f"{suffix[0]}{suffix[-1]}w", f"{suffix}w", "wld"):
        for case in (name.lower(), name.upper()):
            candidate = raster.with_suffix(f".{case}")
            if candidate.is_file():
                return candidate
    return None


def world_file_name(raster_name: str) -> str:
    """The name of the world file GDAL reads for a .tif called `raster_name`."""
    return f"{Path(raster_name).stem}.tfw"
