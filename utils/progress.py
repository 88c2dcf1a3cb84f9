"""Progress in logs and pipes, where tqdm draws no bar: a line now and then."""
from __future__ import annotations

import sys
import time
from typing import Any, Callable, Optional, TextIO


class ProgressLines:
    """Counts work as tqdm does (update(n), the unit as tqdm shows it) and prints, at most
    once every `every` seconds, a line with the count, the time taken and the time left at
    the rate so far. For work of hours on a cluster, whose log would otherwise stay silent
    until the end."""

    def __init__(self, total: int, desc: str, unit: str, initial: int = 0, every: float = 60.0,
                 clock: Callable[[], float] = time.monotonic, file: Optional[TextIO] = None) -> None:
        self.total, self.desc, self.unit, self.every, self.clock = total, desc, unit, every, clock
        self.n = self.initial = initial
        self.start = self.last = clock()
        self.file = file

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self.clock()
        if now - self.last < self.every:
            return
        self.last = now
        elapsed = now - self.start
        rate = (self.n - self.initial) / elapsed if elapsed > 0 else 0.0
        left = f", about {_minutes((self.total - self.n) / rate)} left" if rate > 0 else ""
        print(f"{self.desc}: {self.n}/{self.total} {self.unit} ({100 * self.n // max(1, self.total)} %) after "
              f"{_minutes(elapsed)}{left}", file=self.file or sys.stderr, flush=True)

    def __enter__(self) -> ProgressLines:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


def _minutes(seconds: float) -> str:
    minutes = round(seconds / 60)
    return f"{minutes // 60} h {minutes % 60} min" if minutes >= 60 else f"{minutes} min"
