"""Peak memory and time of the large-image I/O on a synthetic tiled TIFF.

    python bench/large_io_rss.py --side 8000 16000

Per side, in this one process (run it straight from a shell: Linux carries a parent's
peak RSS into a child it execs, see bench/README.md):
  1. make: write a side x side RGB TIFF, 512-pixel tiles, deflate, band by band (the
     image never exists whole);
  2. global: open it (dataset.large_files) and stream its 508 x 508 global image from the
     full-resolution level (dataset.streamed_global; the exact path, the most reading);
  3. write: read it again in bands of 512 rows, make class ids of each band (a cheap
     function of the pixels standing in for the network) and write them through
     utils.tiled_writer.ClassMapWriter, then finish the pyramidal TIFF and its preview.
Each phase reports its own peak RSS (the kernel's high-water mark, reset between phases
through /proc/self/clear_refs where allowed; else the process's peak so far, from
getrusage) and its time. The files go to a temporary folder, deleted at the end.
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

import numpy as np  # noqa: E402
import tifffile  # noqa: E402
import torch  # noqa: E402

from dataset.classes import DEEPGLOBE  # noqa: E402
from dataset.large_files import open_large_image  # noqa: E402
from dataset.streamed_global import global_image_streamed  # noqa: E402
from utils.tiled_writer import ClassMapWriter, file_identity  # noqa: E402

TILE = 512
BAND = 512


def peak_mb() -> float:
    """The peak RSS since the last reset_peak (or since the start), in MB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak() -> bool:
    """Reset the kernel's peak RSS to the current RSS (Linux 4.0+); False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def synthetic_rows(top: int, rows: int, height: int, width: int, step: int = 1) -> np.ndarray:
    """(rows, width // step, 3) uint8 of a smooth pattern with fine texture over a height x
    width image: rows top.. of the image sampled every `step` pixels (a pyramid level
    halved k times is step 2**k; the image itself never exists whole)."""
    y = np.arange(top, top + rows, dtype=np.int64)[:, None] * step
    x = np.arange(0, width, step, dtype=np.int64)[None, :]
    r = (x * 255 // width + (y * x) % 7).astype(np.uint8)
    g = (y * 255 // height + (x + y) % 5).astype(np.uint8)
    b = ((x // 97 + y // 89) % 2 * 200 + (x ^ y) % 11).astype(np.uint8)
    return np.dstack([r, g, b])


def make_tiff(path: Path, height: int, width: int, levels: int = 0) -> None:
    """A height x width RGB TIFF, 512-pixel tiles, deflate, made band by band, with `levels`
    halvings (taken by striding) as SubIFDs, the layout of vips' and OME's pyramids."""
    def tiles(step: int) -> Iterator[np.ndarray]:
        h, w = -(-height // step), -(-width // step)
        for top in range(0, h, TILE):
            band = synthetic_rows(top, min(TILE, h - top), height, width, step)
            for left in range(0, w, TILE):
                yield band[:, left:left + TILE]

    options = dict(dtype=np.uint8, tile=(TILE, TILE), compression="zlib", photometric="rgb", metadata=None,
                   maxworkers=1)
    with tifffile.TiffWriter(path, bigtiff=height * width * 3 > 2**31) as tif:
        tif.write(tiles(1), shape=(height, width, 3), subifds=levels, **options)
        for k in range(1, levels + 1):
            tif.write(tiles(2**k), shape=(-(-height // 2**k), -(-width // 2**k), 3), subfiletype=1, **options)


def class_ids(band: np.ndarray) -> np.ndarray:
    """A stand-in for the network: classes 0..6 from the pixels."""
    return ((band[..., 0] // 40 + band[..., 2] // 100) % 7).astype(np.uint8)


def timed(phases: dict, name: str, run: Callable[[], object]) -> object:
    reset = reset_peak()
    start = time.perf_counter()
    result = run()
    phases[name] = {"seconds": round(time.perf_counter() - start, 2), "peak_rss_mb": round(peak_mb()),
                    "peak_is_per_phase": reset}
    return result


def bench(side: int, folder: Path) -> dict:
    image_path, out = folder / f"synthetic_{side}.tif", folder / "out"
    phases: dict = {}
    timed(phases, "make", lambda: make_tiff(image_path, side, side))

    def global_image() -> torch.Tensor:
        with open_large_image(image_path) as image:
            return global_image_streamed(image, (508, 508))

    timed(phases, "global", global_image)

    def write() -> None:
        with open_large_image(image_path) as image:
            writer = ClassMapWriter(out / f"synthetic_{side}_ids.tif", image.size, file_identity(image_path),
                                    DEEPGLOBE.colours, preview=out / f"synthetic_{side}_preview.png")
            for top in range(writer.rows_done, side, BAND):
                writer.write_band(class_ids(image.read_region(top, 0, min(BAND, side - top), side)))
            writer.finish()
            writer.close()

    timed(phases, "write", write)
    return {"side": side, "input_mb": round(image_path.stat().st_size / 1e6),
            "output_mb": round((out / f"synthetic_{side}_ids.tif").stat().st_size / 1e6), "phases": phases,
            "peak_rss_mb": max(phase["peak_rss_mb"] for phase in phases.values())}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--side", type=int, nargs="+", default=[8000], help="image sides to run (default: 8000)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    p.add_argument("--folder", default=None, help="where to write the files (default: a temporary folder)")
    args = p.parse_args()
    if args.folder is not None:
        Path(args.folder).mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    print(json.dumps({"baseline_rss_mb": round(peak_mb()), "threads": args.threads}))
    for side in args.side:
        folder = Path(tempfile.mkdtemp(prefix="large_io_", dir=args.folder))
        try:
            print(json.dumps(bench(side, folder)), flush=True)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
