"""The one exception type for mistakes in user data, and how command lines report it."""
from __future__ import annotations

import functools
import sys
from typing import Callable, Optional, Sequence

USAGE_ERROR = 2  # exit status for bad input, as argparse uses for bad flags


class DataError(ValueError):
    """A problem with the user's files. The message is one line that names the file and
    says how to fix it, so a command line can print it without a traceback."""


def reports_data_errors(main: Callable[[Optional[Sequence[str]]], int]) -> Callable[[Optional[Sequence[str]]], int]:
    """Wrap a `main(argv) -> int` so that a DataError becomes one line on stderr and exit
    status USAGE_ERROR instead of a traceback."""

    @functools.wraps(main)
    def wrapped(argv: Optional[Sequence[str]] = None) -> int:
        try:
            return main(argv)
        except DataError as error:
            print(f"error: {error}", file=sys.stderr)
            return USAGE_ERROR

    return wrapped
