"""The loop around the network when a folder of images is segmented: the next images are
read ahead and the last outputs written on threads while the network works on the current
one, with at most as many images in flight as threads, so memory stays bounded."""
from __future__ import annotations

import dataclasses
import sys
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator, Sequence, Union

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from dataset.classes import ClassTable
from dataset.io import read_image, save_png
from utils.cores import usable_cores
from utils.errors import DataError
from utils.files import replacing_together


def output_names(stem: str) -> tuple[str, str]:
    return f"{stem}_ids.png", f"{stem}_mask.png"


def write_prediction(ids: Tensor, table: ClassTable, output: Path, stem: str) -> None:
    """<stem>_ids.png with the class ids and <stem>_mask.png in the table's colours,
    replaced together: never one file of this run beside one of an earlier run."""
    ids = ids.cpu()
    with replacing_together([output / name for name in output_names(stem)]) as (ids_file, mask_file):
        save_png(ids_file, ids.numpy().astype(np.uint8))
        save_png(mask_file, table.colorize(ids))


def read_ahead(
    pool: ThreadPoolExecutor, paths: Sequence[Path], read: Callable[[Path], Tensor] = read_image, depth: int = 1
) -> Iterator[tuple[Path, Union[Tensor, DataError]]]:
    """(path, image) in order, the next `depth` images being read on `pool` while the
    caller works on the current one, and no more. A file that cannot be read comes with
    its DataError instead of an image."""
    pending: deque[tuple[Path, Future]] = deque()

    def oldest() -> tuple[Path, Union[Tensor, DataError]]:
        path, reading = pending.popleft()
        try:
            return path, reading.result()
        except DataError as error:
            return path, error

    for path in paths:
        pending.append((path, pool.submit(read, path)))
        if len(pending) > depth:
            yield oldest()
    while pending:
        yield oldest()


MAX_READERS, MAX_WRITERS = 4, 8


@dataclasses.dataclass(frozen=True)
class HostThreads:
    """Threads around the network: `read` read the next images, `write` write outputs,
    each with at most that many images in flight, so memory stays bounded."""

    read: int
    write: int


def host_threads(device: torch.device) -> HostThreads:
    """On the CPU the network needs every core and takes seconds per image: one thread each
    way hides decoding and encoding behind it. On a GPU they set the pace: a core decodes
    a 2448 x 2448 JPEG in about 0.09 s and encodes both PNGs in about 0.2 s
    (bench/predict_folder.py --host_only, bench/README.md), so 30 images/s take about 3
    readers and 6 writers. Pillow releases the GIL while it codes: two writers on two cores
    outran one writer's limit. More would only hold more images in memory."""
    if device.type == "cpu":
        return HostThreads(read=1, write=1)
    spare = max(2, usable_cores() - 1)  # the cores this process may use, less one to drive the GPU
    read = min(MAX_READERS, max(1, spare // 4))
    return HostThreads(read=read, write=min(MAX_WRITERS, max(1, spare - read)))


def segment_files(images: Sequence[Path], segment: Callable[[Path, Tensor], Tensor], table: ClassTable,
                  output: Path, threads: HostThreads, alone: bool) -> list[DataError]:
    """segment_all's loop: images are read ahead and outputs written on `threads` while
    `segment` (path, image) -> class ids runs in this thread. Returns the errors of the
    images that could not be read; alone: raise the error instead."""
    skipped = []
    with ThreadPoolExecutor(threads.read, thread_name_prefix="read") as reader, \
            ThreadPoolExecutor(threads.write, thread_name_prefix="write") as writer:
        writes: deque[Future] = deque()
        # disable=None: a bar only on a terminal, not in logs and pipes.
        bar = tqdm(read_ahead(reader, images, depth=threads.read), total=len(images), desc="predict", unit="image",
                   dynamic_ncols=True, disable=None)
        for k, (path, image) in enumerate(bar):
            if isinstance(image, DataError):
                if alone:
                    raise image
                skipped.append(image)
                bar.write(f"skipped: {image}", file=sys.stderr)
                continue
            start = time.perf_counter()
            ids = segment(path, image)
            if bar.disable:  # no bars in a log or a pipe: a line per image instead
                print(f"{path.name}: {time.perf_counter() - start:.1f} s ({k + 1}/{len(images)})", file=sys.stderr)
            # Outputs finished are on disk, or their error is raised here, as soon as it is known.
            while writes and (writes[0].done() or len(writes) == threads.write):
                writes.popleft().result()
            writes.append(writer.submit(write_prediction, ids, table, output, path.stem))
        for write in writes:
            write.result()
    return skipped
