"""Rows of a uint8 map kept on disk band by band, deflated, and read back in order.

A class map compresses tens of times over (long runs of one class), so a store of a
100,000 x 80,000 slide's map takes some hundreds of MB where the raw rows would take 8 GB.
The store is a data file of deflated bands, one after another; what the bands are (their
rows and lengths) is kept by the caller (utils.tiled_writer writes it beside the data,
to resume from).
"""
from __future__ import annotations

import contextlib
import os
import zlib
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

from utils.files import cannot_write

# zlib level 1: several times faster than the default on class maps, and within a few
# percent of its size (the store is read once, to build the TIFF).
LEVEL = 1


class CorruptStore(Exception):
    """A band of the store does not inflate to its rows: the file was damaged."""


class BandStore:
    """Bands of rows of one width, appended in order to `path` and read back in order.

    Memory: none beyond the band being appended or read (and its deflated bytes).
    """

    def __init__(self, path: Path, width: int, bands: Sequence[tuple[int, int]] = (), sync: bool = False,
                 reported_as: Optional[Path] = None) -> None:
        """Open (creating) the data file; `bands` are the (rows, bytes) of the bands already
        in it, past which anything in the file (a band cut short by an interruption) is cut
        off. sync: make each band durable before append returns (for resuming after a
        crash of the machine, not only of the process). reported_as: the file that write
        errors name (default: `path`), for a store that is a step in writing another one."""
        self.path, self.width, self.sync = Path(path), int(width), sync
        self.reported_as = self.path if reported_as is None else Path(reported_as)
        self.bands: list[tuple[int, int]] = [(int(r), int(n)) for r, n in bands]
        self.end = sum(n for _, n in self.bands)
        try:
            self._file = open(self.path, "r+b" if self.path.exists() else "w+b")
            if os.fstat(self._file.fileno()).st_size < self.end:
                self._file.close()
                raise CorruptStore(f"{self.path}: shorter than the bands it should hold")
            self._file.truncate(self.end)
        except OSError as error:
            raise cannot_write(self.reported_as, error) from None

    @property
    def rows(self) -> int:
        return sum(r for r, _ in self.bands)

    def append(self, band: np.ndarray) -> None:
        """Append (h, width) uint8 rows as one band."""
        if band.ndim != 2 or band.shape[1] != self.width or band.dtype != np.uint8:
            raise ValueError(f"expected a band of shape (h, {self.width}) uint8, got {band.shape} {band.dtype}")
        data = zlib.compress(np.ascontiguousarray(band).tobytes(), LEVEL)
        try:
            self._file.seek(self.end)
            self._file.write(data)
            self._file.flush()
            if self.sync:
                os.fsync(self._file.fileno())
        except OSError as error:
            with contextlib.suppress(OSError):
                self._file.truncate(self.end)  # what was half written is no band
            raise cannot_write(self.reported_as, error) from None
        self.bands.append((band.shape[0], len(data)))
        self.end += len(data)

    def read_bands(self) -> Iterator[np.ndarray]:
        """The bands in order, each (rows, width) uint8."""
        offset = 0
        for rows, nbytes in self.bands:
            self._file.seek(offset)
            data = self._file.read(nbytes)
            offset += nbytes
            try:
                raw = zlib.decompress(data)
            except zlib.error as error:
                raise CorruptStore(f"{self.path}: a band does not inflate ({error})") from None
            if len(raw) != rows * self.width:
                raise CorruptStore(f"{self.path}: a band holds {len(raw)} bytes, not {rows} rows of {self.width}")
            yield np.frombuffer(raw, np.uint8).reshape(rows, self.width)

    def close(self) -> None:
        self._file.close()

    def remove(self) -> None:
        """Close and delete the data file, deleted also where closing fails (closing writes
        what is buffered, which a full disk refuses)."""
        try:
            self.close()
        finally:
            self.path.unlink(missing_ok=True)
