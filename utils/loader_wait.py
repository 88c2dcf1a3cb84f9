"""How long a loop waited for its data loader."""
from __future__ import annotations

import time
from typing import Any, Iterator


class LoaderWait:
    """A loader (iterable; sized, for a progress bar's total) whose iteration records the
    seconds the loop waited for its batches: in all (`total`), and for the first one
    (`first`: starting the loader, its workers included, and loading a first batch). Time
    the loop spends on a batch between two requests is not counted. Each iteration starts
    the counts afresh."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader
        self.total = 0.0
        self.first = 0.0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        self.total = self.first = 0.0
        start = time.perf_counter()
        batches = iter(self.loader)
        first = True
        for batch in batches:
            waited = time.perf_counter() - start
            self.total += waited
            if first:
                self.first, first = waited, False
            yield batch
            start = time.perf_counter()
