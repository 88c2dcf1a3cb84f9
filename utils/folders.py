"""Output folders, checked before any work is done, and not left behind empty by a run that
failed."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator, Optional, Union

from utils.errors import DataError


def output_folder(path: str | Path, flag: str) -> Path:
    """Create the folder named by a command-line flag, or say in one line why it cannot be
    used: found only when the first file is written, the problem could cost an epoch."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise DataError(f"{flag} {path}: a file is in the way of this folder; choose another path") from None
    except OSError as error:
        raise DataError(f"{flag} {path}: cannot create this folder ({error.strerror}); choose another path") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise DataError(f"{flag} {path}: this folder is not writable; choose another path") from None
    return path


@contextlib.contextmanager
def removed_if_failed(*paths: Optional[Union[str, Path]]) -> Iterator[None]:
    """Of the folders `paths` name (None: none) and their parents, those missing now that the
    block creates are removed again if it raises while they are empty: a run refused for a
    mistake, or stopped before it wrote anything, leaves no empty folders for the user to
    clean up. Folders holding anything stay."""
    # Normalised first: as given, a/../b with no folder a would be missing (through a) while b
    # exists, and b would be removed. lexists never raises: a folder this user cannot look
    # into counts as missing, and rmdir cannot remove it anyway.
    absolute = [Path(os.path.abspath(path)) for path in paths if path is not None]
    missing = {folder for path in absolute for folder in (path, *path.parents) if not os.path.lexists(folder)}
    try:
        yield
    except BaseException:
        for folder in sorted(missing, key=lambda p: len(p.parts), reverse=True):  # the deepest first
            with contextlib.suppress(OSError):  # not empty, or not made after all
                folder.rmdir()
        raise
