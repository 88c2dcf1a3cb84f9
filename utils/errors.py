"""The one exception type for mistakes in user data, and how command lines report the
user's mistakes: one line on stderr and exit status 2, never a traceback."""
from __future__ import annotations

import argparse
import contextlib
import difflib
import functools
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, NoReturn, Optional, Sequence, Union

from utils.files import WriteError

USAGE_ERROR = 2  # exit status for bad input, as argparse uses for bad flags
INTERRUPTED = 130  # 128 + SIGINT: the shell's status for a program stopped by Ctrl-C
# Set by a launcher of several processes (train_deep_globe.py --nproc_per_node): each
# process leaves its one-line message in this folder, and the launcher prints it once.
MESSAGES_ENV = "LUNGSEG_MESSAGES"

Main = Callable[[Optional[Sequence[str]]], int]


class DataError(ValueError):
    """A problem with the user's files. The message is one line that names the file and
    says how to fix it, so a command line can print it without a traceback."""


@contextlib.contextmanager
def opening(path: Union[str, Path], kind: str, if_missing: str) -> Iterator[None]:
    """Turn the ways opening `path` can fail into DataErrors naming it. kind: what the file
    should be, with its article ("an image file"); if_missing: the message for no file."""
    try:
        yield
    except FileNotFoundError:
        raise DataError(f"{path}: {if_missing}") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder, not {kind}; pass the file itself") from None
    except PermissionError:
        raise DataError(f"{path}: permission denied; make the file readable") from None


def one_line(error: BaseException) -> str:
    """An exception's message on one line (its type's name where it has none), to quote
    a library's error inside ours."""
    return " ".join(str(error).split()) or type(error).__name__


def user_message(error: BaseException) -> str:
    """The one-line message of a user mistake. Errors re-raised from DataLoader workers
    carry the worker's traceback, whose last line is the original message."""
    text = str(error).strip() or type(error).__name__
    if "Original Traceback" in text:
        text = text.splitlines()[-1].split(": ", 1)[-1]
    return text


def reports_errors(*types: type[BaseException]) -> Callable[[Main], Main]:
    """Wrap a `main(argv) -> int` so that the given user-mistake exceptions become one line
    on stderr and exit status USAGE_ERROR."""

    def decorate(main: Main) -> Main:
        @functools.wraps(main)
        def wrapped(argv: Optional[Sequence[str]] = None) -> int:
            try:
                return main(argv)
            except types as error:
                report(f"error: {user_message(error)}")
                return USAGE_ERROR

        return wrapped

    return decorate


def report(line: str) -> None:
    """Print a one-line message on stderr; under a launcher, leave it for the launcher,
    which prints the processes' messages once instead of once per process."""
    folder = os.environ.get(MESSAGES_ENV)
    if folder is None:
        print(line, file=sys.stderr)
        return
    (Path(folder) / f"rank{os.environ.get('RANK', '0')}").write_text(line)


class OneLineParser(argparse.ArgumentParser):
    """argparse's parser, reporting a mistake in the flags as one line that says where the
    flags are listed, not after argparse's usage block (a screen of flags for the trainer).
    Flags are taken whole: an abbreviation that names one flag today (--eval for
    --evaluation) would name another, or none, once a flag is added."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def parse_args(self, args: Optional[Sequence[str]] = None, namespace: Any = None) -> Any:  # type: ignore[override]
        self._words = list(sys.argv[1:] if args is None else args)
        return super().parse_args(args, namespace)

    def error(self, message: str) -> NoReturn:
        report(f"{self.prog}: error: {message}{self._suggestions()} (--help lists every flag)")
        sys.exit(USAGE_ERROR)

    def _suggestions(self) -> str:
        """The flags that unknown ones were probably meant to be, whatever argparse noticed
        first (a mistyped required flag reads as a missing one): the trainer spells flags
        with underscores (the authors' names), the data tools with hyphens."""
        known = [flag for action in self._actions for flag in action.option_strings if flag.startswith("--")]
        meant = []
        for word in getattr(self, "_words", []):
            flag = str(word).split("=", 1)[0]
            if flag.startswith("--") and flag not in known:
                swapped = "--" + flag[2:].translate(str.maketrans("-_", "_-"))
                meant += [swapped] if swapped in known else difflib.get_close_matches(flag, known, n=1, cutoff=0.8)
        return f"; did you mean {', '.join(dict.fromkeys(meant))}?" if meant else ""


def reports_data_errors(main: Main) -> Main:
    """The data tools' main: bad files in and files that cannot be written out are one line
    (reports_errors), and so is Ctrl-C, which leaves what they wrote marked incomplete
    (dataset.prepare_common.claimed_destination)."""
    reporting = reports_errors(DataError, WriteError)(main)

    @functools.wraps(main)
    def wrapped(argv: Optional[Sequence[str]] = None) -> int:
        try:
            return reporting(argv)
        except KeyboardInterrupt:
            report("interrupted: a data folder it was writing, if any, is marked incomplete (training refuses it); "
                   "the same command starts it over")
            return INTERRUPTED

    return wrapped
