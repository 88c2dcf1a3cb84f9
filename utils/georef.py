"""Where a raster lies on the Earth, as read from a GeoTIFF and copied into outputs.

The GeoTIFF tags are kept as stored, not rebuilt from the CRS: an output of the same
width and height as its input is then georeferenced exactly as the input is (user-defined
projections, PixelIsPoint rasters and tie-point grids included), with no CRS library
needed to write it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

# The GeoTIFF tags (OGC GeoTIFF 1.1): ModelPixelScale, ModelTiepoint, ModelTransformation,
# GeoKeyDirectory, GeoDoubleParams, GeoAsciiParams; GDAL's nodata and metadata ride along
# (42112 GDAL_METADATA, 42113 GDAL_NODATA) only when asked for, they describe the pixels.
GEOTIFF_TAGS = (33550, 33922, 34264, 34735, 34736, 34737)
GEO_KEY_DIRECTORY = 34735

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
