"""The interface of images too large to decode whole, read region by region
(dataset.large_files opens them; dataset.tiff_image and dataset.slide_image read them)."""
from __future__ import annotations

import abc
from pathlib import Path
from types import TracebackType
from typing import Optional

import numpy as np
import torch

from utils.georef import Georef


class LargeImage(abc.ABC):
    """An image read by regions, in RGB uint8, from its full-resolution level or a
    reduced one. Close it (or use it as a context manager) to release the file.

    Attributes:
        path: the file.
        levels: (H, W) of each pyramid level, full resolution first, largest to smallest.
        georef: GeoTIFF georeferencing, or None.
        mpp: (y, x) microns per pixel of the full-resolution level, or None.
        damaged: one-line warnings for the user about damage that reading works around: a
            reduced-resolution level left out of `levels` (a file cut short in it, say);
            the levels kept read whole.
    """

    path: Path
    levels: list[tuple[int, int]]
    georef: Optional[Georef] = None
    mpp: Optional[tuple[float, float]] = None
    damaged: tuple[str, ...] = ()

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
