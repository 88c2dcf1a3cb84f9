"""SIGTERM (a plain `kill`, a scheduler's time limit) handled as Ctrl-C is: the command
stops where it stands, keeps what is written, and says so."""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Any, Iterator


class Terminated(KeyboardInterrupt):
    """Raised in the main thread when the process receives SIGTERM."""


STOP_SIGNALS = {signal.SIGINT: KeyboardInterrupt, signal.SIGTERM: Terminated}


def exit_status(interrupt: KeyboardInterrupt) -> int:
    """The shell's status for a process ended by the signal: 128 + its number."""
    return 128 + (signal.SIGTERM if isinstance(interrupt, Terminated) else signal.SIGINT)


def stop_word(interrupt: KeyboardInterrupt) -> str:
    """How a message names the stop: "terminated" (SIGTERM) or "interrupted" (Ctrl-C)."""
    return "terminated" if isinstance(interrupt, Terminated) else "interrupted"


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated


def terminate_as_interrupt() -> None:
    """From now on SIGTERM raises Terminated (a KeyboardInterrupt) in the main thread."""
    signal.signal(signal.SIGTERM, _raise_terminated)


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold Ctrl-C (SIGINT) and SIGTERM until the block ends, then raise the first one:
    files that belong together are written together. An interrupt inside torch.save would
    otherwise surface as a RuntimeError from its C++ writer. Only the main thread receives
    signals."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: received.append(signum)) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if received:
        raise STOP_SIGNALS[signal.Signals(received[0])]
