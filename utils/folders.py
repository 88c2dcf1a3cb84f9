"""Output folders, checked before any work is done."""
from __future__ import annotations

import os
from pathlib import Path

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
