"""A training run's log: lines on stdout and in log.txt, scalars and images in a
tensorboard event file, all in <log_path>/<task_name>/ and written by rank 0 only."""
from __future__ import annotations

import contextlib
import os
import socket
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
from tensorboardX.proto.event_pb2 import Event
from tensorboardX.proto.summary_pb2 import Summary
from tensorboardX.record_writer import RecordWriter
from tensorboardX.summary import image, scalar

from utils.errors import user_message
from utils.files import WriteError, append_line, cannot_write
from utils.signals import stop_word

EVENTS_PREFIX = "events.out.tfevents."


class EventFile:
    """A tensorboard event file written in the calling thread, created with its first
    event. tensorboardX's SummaryWriter writes from a thread of its own, where a full disk
    ends the thread with a traceback and later calls block once its queue fills; here the
    failure is a WriteError where the event was logged."""

    def __init__(self, folder: Path) -> None:
        # The pid keeps two processes of one host and second apart (tensorboard's names
        # only need to contain "tfevents").
        self.path = folder / f"{EVENTS_PREFIX}{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
        self.writer: Optional[RecordWriter] = None

    def add(self, summaries: list[Summary], step: int) -> None:
        try:
            if self.writer is None:
                self.writer = RecordWriter(str(self.path))
                self.writer.write(Event(wall_time=time.time(), file_version="brain.Event:2").SerializeToString())
            for summary in summaries:
                self.writer.write(Event(wall_time=time.time(), step=step, summary=summary).SerializeToString())
            self.writer.flush()
        except OSError as error:
            self.close()  # what the failed flush left in the buffer is dropped, not written again
            raise cannot_write(self.path, error) from None

    def close(self) -> None:
        """Close the file; a failure here (the last buffered bytes) loses at most those bytes."""
        if self.writer is not None:
            writer, self.writer = self.writer, None
            with contextlib.suppress(OSError):
                writer.close()


class RunLog:
    """Lines, scalars and image panels of one run in `folder` (nothing when not enabled).
    Lines are printed at once, and go into log.txt from `begin()` on."""

    def __init__(self, folder: Path, enabled: bool) -> None:
        self.folder, self.enabled = folder, enabled
        self.events = EventFile(folder)
        self.held: Optional[list[str]] = []  # lines of a run not yet begun

    def line(self, text: str) -> None:
        if self.enabled:
            print(text, flush=True)
            if self.held is None:
                append_line(self.folder / "log.txt", text)
            else:
                self.held.append(text)

    def begin(self) -> None:
        """The run passed its checks: the lines so far go into log.txt, later ones as they
        come. A run refused before (another run's checkpoints in the way, unreadable data)
        leaves log.txt as it was: the log of the run in its way gets no lines of another."""
        if self.enabled and self.held is not None:
            for text in self.held:
                append_line(self.folder / "log.txt", text)
        self.held = None

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.enabled:
            self.events.add([scalar(tag, value) for tag, value in values.items()], step)

    def panel(self, tag: str, picture: np.ndarray, step: int) -> None:
        """An (H, W, 3) uint8 image."""
        if self.enabled:
            self.events.add([image(tag, picture, dataformats="HWC")], step)

    def close(self) -> None:
        self.events.close()

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, kind: Optional[type[BaseException]], error: Optional[BaseException], trace: Any) -> None:
        """Close; a run that began and then ended by an exception says why as its last line in
        log.txt (the terminal has the message already): a log that ends after an epoch reads
        as a run still going, and the next run's lines would seem to continue it."""
        self.close()
        if error is not None and self.enabled and self.held is None:
            reason = stop_word(error) if isinstance(error, KeyboardInterrupt) else (
                f"{type(error).__name__}: {' '.join(user_message(error).split())}")  # one line, as the terminal's
            with contextlib.suppress(WriteError):  # the run is failing already, perhaps for a full disk
                append_line(self.folder / "log.txt", f"stopped: {reason}")
