"""Whole-slide images read with OpenSlide (see dataset.large_files).

OpenSlide returns RGBA where alpha marks pixels the scanner did not capture (outside
the scanned area of a MIRAX or VMS slide, for instance); those are composited over the
slide's background colour, as slide viewers show them, and alpha is dropped.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import openslide

from dataset.large_image import LargeImage
from utils.errors import DataError, one_line

# The largest reduced level read whole (block_rows), so the largest a global image comes from.
MAX_LEVEL_PIXELS = 64 * 1024 * 1024
RE_EXPORT = "the slide is truncated or corrupt; re-download or re-export it"


class SlideImage(LargeImage):
    """A slide OpenSlide reads (open it with dataset.large_files.open_large_image)."""

    def __init__(self, path: Path, vendor: str) -> None:
        self.path = Path(path)
        self.vendor = vendor
        try:
            self._slide = openslide.OpenSlide(str(self.path))
        except openslide.OpenSlideError as error:  # the unsupported-format error is one of these
            raise DataError(f"{self.path}: OpenSlide cannot open this {vendor} slide ({one_line(error)}); "
                            f"{RE_EXPORT}") from None
        props = self._slide.properties
        self.levels = [(int(h), int(w)) for w, h in self._slide.level_dimensions]
        self._downsamples = [float(d) for d in self._slide.level_downsamples]
        self._tile_rows = [int(props.get(f"openslide.level[{i}].tile-height", 1)) for i in range(len(self.levels))]
        try:
            self.mpp = (float(props["openslide.mpp-y"]), float(props["openslide.mpp-x"]))
        except (KeyError, ValueError):
            self.mpp = None
        background = props.get("openslide.background-color", "FFFFFF")
        try:
            self._background = np.array([int(background[k:k + 2], 16) for k in (0, 2, 4)], np.uint16)
        except ValueError:
            self._background = np.full(3, 255, np.uint16)

    def block_rows(self, level: int) -> int:
        # Above level 0 a band is the whole level: OpenSlide places a region by level-0
        # pixels divided by the level's downsample, rarely a whole number (4.000345), so a
        # band starting below the top could land a fraction of a row off and be resampled.
        return self._tile_rows[level] if level == 0 else self.levels[level][0]

    def global_levels(self) -> list[tuple[int, int]]:
        # Reduced levels are read whole (block_rows): only those under the read-whole bound.
        return [size if i == 0 or size[0] * size[1] <= MAX_LEVEL_PIXELS else (0, 0)
                for i, size in enumerate(self.levels)]

    def _read(self, level: int, top: int, left: int, height: int, width: int) -> np.ndarray:
        # OpenSlide places a region by its top-left corner in level-0 pixels.
        downsample = self._downsamples[level]
        location = (int(round(left * downsample)), int(round(top * downsample)))
        try:
            rgba = np.asarray(self._slide.read_region(location, level, (width, height)))
        except openslide.OpenSlideError as error:
            raise DataError(f"{self.path}: cannot read rows {top}..{top + height} of level {level} "
                            f"({one_line(error)}); {RE_EXPORT}") from None
        rgb, alpha = rgba[..., :3], rgba[..., 3:]
        if alpha.min() == 255:
            return np.ascontiguousarray(rgb)
        # Over the background: (rgb * a + bg * (255 - a)) / 255, rounded.
        a = alpha.astype(np.uint16)
        return ((rgb * a + self._background * (255 - a) + 127) // 255).astype(np.uint8)

    def close(self) -> None:
        self._slide.close()
