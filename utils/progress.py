"""Progress: a bar on a terminal (tqdm), a line now and then in logs and pipes, where a bar
would write a carriage return per update into the file."""
from __future__ import annotations

import sys
import time
from typing import Any, Callable, Optional, TextIO

from tqdm import tqdm

EVERY = 60.0  # seconds between lines where no bar is drawn


class ProgressLines:
    """Counts work as tqdm does (update(n), set_postfix, the unit as tqdm shows it) and
    prints, at most once every `every` seconds, a line with the count, the time taken and
    the time left at the rate so far. For work of hours on a cluster, whose log would
    otherwise stay silent until the end."""

    def __init__(self, total: Optional[int], desc: str, unit: str, initial: int = 0, every: float = EVERY,
                 clock: Callable[[], float] = time.monotonic, file: Optional[TextIO] = None) -> None:
        self.total, self.desc, self.unit, self.every, self.clock = total, desc, unit, every, clock
        self.n = self.initial = initial
        self.start = self.last = clock()
        self.file = file
        self.postfix = ""

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self.clock()
        if now - self.last < self.every:
            return
        self.last = now
        elapsed = now - self.start
        count, left = f"{self.n} {self.unit}", ""
        if self.total is not None:
            count = f"{self.n}/{self.total} {self.unit} ({100 * self.n // max(1, self.total)} %)"
            rate = (self.n - self.initial) / elapsed if elapsed > 0 else 0.0
            if rate > 0 and self.n < self.total:
                left = f", about {_minutes((self.total - self.n) / rate)} left"
        print(f"{self.desc}: {count} after {_minutes(elapsed)}{left}{self.postfix}", file=self.file or sys.stderr,
              flush=True)

    def set_postfix(self, **values: Any) -> None:
        """Values shown at the end of the next line, as tqdm shows them after its bar."""
        self.postfix = "".join(f", {key}={value}" for key, value in values.items())

    def __enter__(self) -> ProgressLines:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


def progress(total: Optional[int], desc: str, unit: str, *, initial: int = 0, inner: bool = False,
             bar: bool = True, shown: bool = True, terminal: Optional[bool] = None) -> tqdm | ProgressLines:
    """On a terminal (default: whether stderr is one) a bar, none where not `bar` (work of one
    step, say), below the outer one where `inner`; elsewhere ProgressLines, every EVERY
    seconds, inner work's too. Nothing where not `shown` (on ranks other than the first)."""
    if not shown:
        return tqdm(total=total, disable=True)
    if sys.stderr.isatty() if terminal is None else terminal:
        return tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=not inner, position=int(inner),
                    dynamic_ncols=True, disable=not bar)
    return ProgressLines(total, desc, unit, initial=initial, every=EVERY)


def _minutes(seconds: float) -> str:
    minutes = round(seconds / 60)
    return f"{minutes // 60} h {minutes % 60} min" if minutes >= 60 else f"{minutes} min"
