"""A class-id map too large to hold, written band by band as a tiled, compressed,
pyramidal TIFF (GeoTIFF where the input was one), with a colour preview beside it.

    writer = ClassMapWriter(folder / "x_ids.tif", (H, W), file_identity(input_path),
                            colours=table.colours, preview=folder / "x_preview.png", georef=..., mpp=...)
    for band in bands_from(writer.rows_done):     # a rerun starts where the last one stopped
        writer.write_band(band)                   # (h, W) uint8, rows in order
    writer.finish()                               # the TIFF and the PNG appear, together
    writer.close()

The finished bands go to a partial store beside the output (`.x_ids.tif.partial`, its
bands deflated, and `.x_ids.tif.partial.json` saying what they are and what input they
belong to), appended and synced band by band: an interruption at any moment leaves the
bands written so far, and a writer made again for the same input and size resumes after
them. The producer may keep state of its own there too (`.x_ids.tif.partial.pt`: work
done before the first band, such as stage 3's pass over every patch). finish() builds the
TIFF from the store under a temporary name and renames it into place (utils.files), then
deletes the store: nothing ever lies half written under the final names.

The TIFF: uint8 class ids in 512 x 512 tiles, deflate-compressed, with a palette of the
class colours (viewers show colours, readers get ids), and reduced-resolution levels, each
half the last (each pixel the majority class of a 2 x 2 block, majority_2x2), down to one
tile, in the main IFD chain marked reduced-resolution (NewSubfileType 1), where GDAL
(QGIS) finds overviews and OpenSlide and QuPath find pyramid levels. The input's GeoTIFF
tags are copied as stored (the map has the input's size, so its pixels lie where the
input's do); microns per pixel go in the resolution tags, per centimetre.
"""
from __future__ import annotations

import contextlib
import itertools
import json
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import tifffile
import torch
from PIL import Image

from utils.band_store import BandStore, CorruptStore
from utils.errors import DataError
from utils.files import cannot_write, replacing_together, temporary_name, writing
from utils.georef import Georef
from utils.resample import pil_nearest_indices

TILE = 512
PREVIEW_SIDE = 2048  # longest side of the preview PNG
PARTIAL_FORMAT = "lungseg class-map partial 1"
# Tiles tifffile deflates at once, in threads: its default (512 MiB of tiles) would hold
# dozens of tile rows of a wide map.
WORKERS = 2
BUFFER_BYTES = 16 << 20
RESOLUTION_CENTIMETER = 3
REDUCED_IMAGE = 1  # NewSubfileType of a pyramid level
MAJORITY_COLUMNS = 8192  # columns of a tile row reduced at a time (even)


def file_identity(path: str | Path) -> dict:
    """What identifies an input file for resuming: its path, size and modification time.
    A caller adds what else the map depends on (weights, settings) to the dict."""
    path = Path(path)
    stat = path.stat()
    return {"path": str(path.resolve()), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def partial_paths(path: Path) -> tuple[Path, Path, Path]:
    """The partial store of an output: (data, index, the producer's state)."""
    return (path.with_name(f".{path.name}.partial"), path.with_name(f".{path.name}.partial.json"),
            path.with_name(f".{path.name}.partial.pt"))


def level_sizes(height: int, width: int, tile: int = TILE) -> list[tuple[int, int]]:
    """(H, W) of the pyramid: full size, then each level half the last (rounded up), down
    to the first that fits in one tile."""
    sizes = [(height, width)]
    while max(sizes[-1]) > tile:
        h, w = sizes[-1]
        sizes.append((-(-h // 2), -(-w // 2)))
    return sizes


def majority_2x2(block: np.ndarray) -> np.ndarray:
    """Each 2 x 2 block of an (h, w) class map replaced by its most frequent class,
    (ceil(h / 2), ceil(w / 2)); a tie goes to the first of the tied classes in reading order
    (top left, top right, bottom left, bottom right), so a 2-2 tie or four different
    classes keep the top-left pixel, as sampling every other pixel would. A last odd row or
    column stands in for its missing neighbours.

    Why not every other pixel: a level pixel should show the class that covers most of its
    block, not whichever class sits on the sampled pixel.
    """
    if block.shape[0] % 2 or block.shape[1] % 2:
        block = np.pad(block, ((0, block.shape[0] % 2), (0, block.shape[1] % 2)), mode="edge")
    corners = [block[0::2, 0::2], block[0::2, 1::2], block[1::2, 0::2], block[1::2, 1::2]]
    votes = [sum((c == other).astype(np.uint8) for other in corners) for c in corners]
    # np.argmax takes the first of equal counts: the tie rule above.
    best = np.argmax(np.stack(votes), axis=0)
    return np.choose(best, corners)


def preview_size(height: int, width: int, side: int = PREVIEW_SIDE) -> tuple[int, int]:
    """(H, W) of the preview: the map's aspect, the longest side at most `side`."""
    scale = min(1.0, side / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


class ClassMapWriter:
    """Writes one class map band by band; see the module docstring.

    Memory (W: the map's width, bytes of uint8 ids): writing a band holds the band
    (band height x W) and its deflated bytes. finish holds one band of the store as
    inflated (band height x W), one tile row of the level being written (512 x W; its 2 x 2
    majorities go, deflated, to a temporary store for the level below, made piece by piece
    of MAJORITY_COLUMNS with about 17 MiB of temporaries), the tiles tifffile deflates at
    once (BUFFER_BYTES), and the preview (at most 2048 x 2048, and x 3 as colours); nothing
    grows with the map's height.
    """

    def __init__(self, path: str | Path, shape: Sequence[int], identity: dict, colours: Sequence[Sequence[int]],
                 preview: Optional[str | Path] = None, georef: Optional[Georef] = None,
                 mpp: Optional[Sequence[float]] = None, tile: int = TILE) -> None:
        """Open the partial store of `path`, resuming it when it was left by a writer of the
        same shape and identity, else starting a new one (a stale store is deleted).

        Args:
            path: the TIFF to write (e.g. <stem>_ids.tif).
            shape: (H, W) of the map, the input's.
            identity: JSON-able facts the map depends on (file_identity(input) and more).
            colours: RGB of each class id, for the palette and the preview.
            preview: the PNG to write beside the TIFF, or None.
            georef: the input's georeferencing, copied into the TIFF.
            mpp: (y, x) microns per pixel of the input.
            tile: the tile side, a multiple of 16.
        """
        self.path = Path(path)
        self.preview = None if preview is None else Path(preview)
        self.height, self.width = int(shape[0]), int(shape[1])
        if self.height < 1 or self.width < 1 or tile < 16 or tile % 16:
            raise ValueError(f"need a positive shape and a tile side that is a multiple of 16, got {shape}, {tile}")
        if not 1 <= len(colours) <= 256:
            raise ValueError(f"need 1 to 256 class colours, got {len(colours)}")
        self.colours = np.zeros((256, 3), np.uint8)
        self.colours[: len(colours)] = np.asarray(colours, dtype=np.uint8)
        self.georef, self.tile = georef, int(tile)
        self.mpp = None if mpp is None else (float(mpp[0]), float(mpp[1]))
        # Round-tripped, so that a tuple and the list JSON gives back compare equal.
        self.identity = json.loads(json.dumps(identity))
        self.data_path, self.index_path, self.state_path = partial_paths(self.path)
        self.resumed = False
        # Where an earlier writer's work was deleted, not resumed: the rows it had written
        # (0 where it kept only its producer's state) and the keys of `identity` that differ
        # (none: its store was damaged on disk).
        self.started_over: Optional[tuple[int, list[str]]] = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise cannot_write(self.path, error) from None
        self.store = self._open_store()

    # ------------------------------------------------------------------ the partial store

    def _index(self, bands: Sequence[tuple[int, int]]) -> dict:
        return {"format": PARTIAL_FORMAT, "shape": [self.height, self.width], "identity": self.identity,
                "bands": [list(b) for b in bands]}

    def _open_store(self) -> BandStore:
        """The store left by an earlier writer of this map, or a new one (see started_over)."""
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError, AttributeError, CorruptStore):
            index = json.loads(self.index_path.read_text())
            bands = [(int(r), int(n)) for r, n in index["bands"]]
            rows, theirs = sum(r for r, _ in bands), dict(index["identity"])
            if rows or self.state_path.exists():
                # Set before the store is opened: one that fails to open was damaged on disk.
                self.started_over = (rows, sorted(key for key in theirs.keys() | self.identity.keys()
                                                  if theirs.get(key) != self.identity.get(key)))
            if index == self._index(bands) and rows <= self.height:
                store = BandStore(self.data_path, self.width, bands, sync=True)
                self.resumed, self.started_over = True, None
                return store
        self._remove_partial()
        store = BandStore(self.data_path, self.width, sync=True)
        self._save_index(store)
        return store

    def _save_index(self, store: BandStore) -> None:
        with writing(self.index_path) as file:
            file.write(json.dumps(self._index(store.bands)).encode())

    def _remove_partial(self) -> None:
        # The index first: data without it is no store.
        for path in (self.index_path, self.data_path, self.state_path):
            path.unlink(missing_ok=True)

    def saved_state(self) -> Optional[dict[str, Any]]:
        """What the map's producer saved with save_state to resume from (it belongs to the
        store, so to the same identity), or None: nothing saved, or unreadable. Its tensors
        are mapped from the file, read only where used: a caller after a number in it reads
        none of them."""
        with contextlib.suppress(Exception):  # a damaged file only costs the work it saved
            state = torch.load(self.state_path, map_location="cpu", weights_only=True, mmap=True)
            return state if isinstance(state, dict) else None
        return None

    def save_state(self, state: dict[str, Any]) -> None:
        """Replace the producer's state (tensors, numbers) by `state`, whole or not at all."""
        with writing(self.state_path) as file:
            torch.save(state, file)

    @property
    def rows_done(self) -> int:
        """Rows written so far, by this writer and the one it resumes."""
        return self.store.rows

    def write_band(self, band: np.ndarray) -> None:
        """Append the next rows of the map, (h, W) uint8, h >= 1; they are on disk when
        this returns.

        Raises:
            WriteError: the disk is full or the folder not writable (the store keeps the
                bands before this one).
        """
        band = np.asarray(band)
        if band.ndim != 2 or band.shape[1] != self.width or band.shape[0] < 1 or band.dtype != np.uint8:
            raise ValueError(f"expected a band of shape (h, {self.width}) uint8, got {band.shape} {band.dtype}")
        if self.rows_done + band.shape[0] > self.height:
            raise ValueError(f"{band.shape[0]} more rows would pass the map's {self.height} ({self.rows_done} written)")
        self.store.append(band)
        self._save_index(self.store)

    # ------------------------------------------------------------------ the TIFF

    def finish(self, progress: Optional[Callable[[int, int], None]] = None) -> Path:
        """Write the TIFF (and the preview) from the store, rename them into place
        together, and delete the store. progress(done, total) is called after each tile
        row of every level.

        Raises:
            WriteError: the disk filled or the folder is not writable; no file is left
                under the final names, and the store is kept for another try.
            DataError: the store was damaged on disk; it is deleted, run again.
        """
        if self.rows_done != self.height:
            raise ValueError(f"the map has {self.rows_done} of its {self.height} rows; write them all first")
        names = [self.path] + ([self.preview] if self.preview is not None else [])
        try:
            with replacing_together(names) as temporaries:
                self._write_tiff(temporaries[0], temporaries[1] if self.preview is not None else None, progress)
        except CorruptStore as error:
            self.close()
            self._remove_partial()
            raise DataError(f"{error}; the bands kept for resuming were damaged on disk and are deleted: run again") from None
        self.close()
        self._remove_partial()
        return self.path

    def _write_tiff(self, path: Path, preview: Optional[Path], progress: Optional[Callable[[int, int], None]]) -> None:
        sizes = level_sizes(self.height, self.width, self.tile)
        steps = _Steps(sum(-(-h // self.tile) for h, _ in sizes), progress)
        # As if compression did nothing: past 4 GiB a classic TIFF's offsets overflow.
        bigtiff = sum(h * w for h, w in sizes) >= 2**32 - 2**25
        source, stores = self.store, []
        try:
            with tifffile.TiffWriter(path, bigtiff=bigtiff) as tif:
                for k, (height, width) in enumerate(sizes):
                    # The next level is made while this one is written, from its rows.
                    below = None
                    if k + 1 < len(sizes):
                        name = self.path.with_name(f"{self.path.name}.level{k + 1}")
                        below = BandStore(temporary_name(name), sizes[k + 1][1], reported_as=self.path)
                        stores.append(below)
                    rows = self._tile_rows(source.read_bands(), height)
                    if k == 0 and preview is not None:
                        rows = self._previewing(rows, preview)
                    tiles = self._tiles(rows, width, below, steps)
                    # tifffile takes the tiles it needs and closes what it was given; an
                    # islice in between keeps `tiles` open, to run the rest here (the last
                    # row's bookkeeping, the preview, the check that no rows are left).
                    count = -(-height // self.tile) * -(-width // self.tile)
                    tif.write(itertools.islice(tiles, count), shape=(height, width), dtype=np.uint8,
                              **self._page_tags(k, height, width))
                    for _ in tiles:
                        raise CorruptStore(f"{self.data_path}: holds more rows than level {k}'s {height}")
                    source = below  # type: ignore[assignment]
        finally:
            for store in stores:
                with contextlib.suppress(OSError):
                    store.remove()

    def _tiles(self, rows: Iterator[tuple[int, np.ndarray]], width: int, below: Optional[BandStore],
               steps: _Steps) -> Iterator[np.ndarray]:
        """The tiles of a level, row by row (tifffile pads those at the edges), each
        tile row's 2 x 2 majorities appended to the level below."""
        for top, block in rows:
            if below is not None:
                # top is a multiple of the tile, so even; column pieces of an even width
                # bound the votes' temporary arrays on a wide map.
                below.append(np.concatenate([majority_2x2(block[:, left:left + MAJORITY_COLUMNS])
                                             for left in range(0, width, MAJORITY_COLUMNS)], axis=1))
            for left in range(0, width, self.tile):
                yield block[:, left:left + self.tile]
            steps.advance()

    def _page_tags(self, level: int, height: int, width: int) -> dict:
        """tifffile's write() arguments of a level's page."""
        tags: dict = dict(tile=(self.tile, self.tile), compression="zlib", photometric="palette",
                          colormap=self.colours.T.astype(np.uint16) * 257, subfiletype=REDUCED_IMAGE if level else 0,
                          metadata=None, software="LUNGseg", maxworkers=WORKERS, buffersize=BUFFER_BYTES)
        if self.mpp is not None:
            # Pixels per centimetre of this level: the full level's, times its share of the pixels.
            tags["resolution"] = (1e4 / self.mpp[1] * width / self.width, 1e4 / self.mpp[0] * height / self.height)
            tags["resolutionunit"] = RESOLUTION_CENTIMETER
        if level == 0 and self.georef is not None:
            tags["extratags"] = [(code, dtype, count, value, True) for code, dtype, count, value in self.georef.tags]
        return tags

    def _tile_rows(self, bands: Iterator[np.ndarray], height: int) -> Iterator[tuple[int, np.ndarray]]:
        """The rows of `bands` regrouped by tile rows: (top, rows) with rows tile high
        (the last one shorter)."""
        pending: list[np.ndarray] = []
        have = top = 0
        for band in bands:
            pending.append(band)
            have += band.shape[0]
            while have >= self.tile or (have and top + have == height):
                block = pending[0] if len(pending) == 1 else np.concatenate(pending)
                take = min(self.tile, have)
                yield top, block[:take]
                pending = [block[take:]] if take < have else []
                have -= take
                top += take
        if top != height:
            raise CorruptStore(f"{self.data_path}: holds {top} rows of a level of {height}")

    def _previewing(self, rows: Iterator[tuple[int, np.ndarray]], path: Path) -> Iterator[tuple[int, np.ndarray]]:
        """`rows` passed on unchanged; once they are all through, the preview (the map
        resized with Pillow's NEAREST rule, in the class colours) is written to `path`."""
        ph, pw = preview_size(self.height, self.width)
        pick_rows = pil_nearest_indices(ph, self.height).numpy()
        pick_cols = pil_nearest_indices(pw, self.width).numpy()
        small = np.zeros((ph, pw), np.uint8)
        for top, block in rows:
            inside = (pick_rows >= top) & (pick_rows < top + block.shape[0])
            small[inside] = block[pick_rows[inside] - top][:, pick_cols]
            yield top, block
        with open(path, "xb") as file:
            Image.fromarray(self.colours[small]).save(file, format="PNG")

    def close(self) -> None:
        """Close the store's file (the store stays, for a later writer to resume)."""
        self.store.close()

    def __enter__(self) -> ClassMapWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Steps:
    """Tile rows written out of a total, reported to a progress callback."""

    def __init__(self, total: int, progress: Optional[Callable[[int, int], None]]) -> None:
        self.done, self.total, self.progress = 0, total, progress

    def advance(self) -> None:
        self.done += 1
        if self.progress is not None:
            self.progress(self.done, self.total)
