"""Writing files so that a failure or a kill at any moment leaves the old file or the new
one, never half of one; one-line reasons when a write fails; and a run's exclusive hold on
the names it writes.

Every file is first written under a temporary name beside its final one,
`.<name>.<random>.tmp`, and renamed over it once complete. A process killed with SIGKILL
leaves that temporary file behind; `remove_temporaries` finds such files by name.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import os
import secrets
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import BinaryIO, Iterator, Optional, Sequence

TMP_SUFFIX = ".tmp"

# Advice per errno: what the user can do about the folder.
_FULL = "free some space there, or write elsewhere"
_ADVICE = {
    errno.ENOSPC: _FULL,
    errno.EDQUOT: _FULL,
    errno.EFBIG: "the file system (or the process's file-size limit, ulimit -f) does not allow files this large; write elsewhere",
    errno.EACCES: "make the folder and file writable, or write elsewhere",
    errno.EPERM: "make the folder and file writable, or write elsewhere",
    errno.EROFS: "the file system is read-only; write elsewhere",
}


class WriteError(Exception):
    """A file could not be written; the message is one line naming it and what to do."""


class InUseError(Exception):
    """Another process holds a run's lock; the message names it."""


def os_error_in(error: BaseException) -> Optional[OSError]:
    """The OSError that caused `error`, if any: torch's C++ writer raises a RuntimeError
    whose context is the OSError of the Python file it wrote to."""
    seen: set[int] = set()
    current: Optional[BaseException] = error
    while current is not None and id(current) not in seen:
        if isinstance(current, OSError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def cannot_write(path: str | Path, error: OSError) -> WriteError:
    """The one-line WriteError for an OSError met while writing `path`."""
    reason = error.strerror or str(error)
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        with contextlib.suppress(OSError):
            reason += f", {shutil.disk_usage(Path(path).parent).free / 1e6:.0f} MB free"
    advice = _ADVICE.get(error.errno, "check the folder, or write elsewhere")
    return WriteError(f"{path}: cannot write ({reason}); {advice}")


def temporary_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}{TMP_SUFFIX}")


@contextlib.contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """A free temporary name beside `path`, renamed over `path` when the block ends and
    removed if it raises (replacing_together of one file). An OSError (disk full,
    permission, ...) becomes a WriteError."""
    with replacing_together([path]) as (tmp,):
        yield tmp


@contextlib.contextmanager
def writing(path: str | Path) -> Iterator[BinaryIO]:
    """A binary file that replaces `path` (see `replacing`) once the block ends, synced to
    disk first so that a crash of the machine cannot leave a renamed but empty file."""
    with replacing(path) as tmp, open(tmp, "xb") as file:
        yield file
        file.flush()
        os.fsync(file.fileno())


@contextlib.contextmanager
def replacing_together(paths: Sequence[str | Path]) -> Iterator[list[Path]]:
    """Temporary names for files that belong together (an image's outputs, weights and
    their facts), written in order by the block; it must write the first, and a later one
    it leaves unwritten is removed. Once the block ends, the old files but the first are
    removed and the new ones renamed in order: a kill at any moment leaves only old files,
    or only new ones, some possibly missing, never a mix."""
    paths = [Path(p) for p in paths]
    temporaries = [temporary_name(p) for p in paths]
    try:
        for folder in dict.fromkeys(p.parent for p in paths):
            folder.mkdir(parents=True, exist_ok=True)
        yield temporaries
        for path in paths[1:]:
            path.unlink(missing_ok=True)
        for tmp, path in zip(temporaries, paths):
            if path == paths[0] or tmp.exists():
                os.replace(tmp, path)
    except BaseException as error:
        # The file being written when the error came is the last one begun.
        begun = [path for tmp, path in zip(temporaries, paths) if tmp.exists()]
        for tmp in temporaries:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
        cause = os_error_in(error) if isinstance(error, Exception) else None
        if cause is not None and not isinstance(error, WriteError):
            raise cannot_write((begun or paths[:1])[-1], cause) from None
        raise


def write_new(path: str | Path, data: bytes) -> Path:
    """Write `data` whole under `path`, or, where a file of that name exists, under the
    first free `<stem>-2<suffix>`, `<stem>-3<suffix>`, ...: never over another file.
    Returns the name written."""
    path = Path(path)
    tmp = temporary_name(path)
    try:
        with open(tmp, "xb") as file:
            file.write(data)
        for n in itertools.count(1):
            name = path if n == 1 else path.with_name(f"{path.stem}-{n}{path.suffix}")
            try:
                os.link(tmp, name)  # a link, unlike a rename, never replaces a file
                return name
            except FileExistsError:
                continue
            except OSError:  # no hard links here: claim the name, then fill it by renaming
                try:
                    os.close(os.open(name, os.O_CREAT | os.O_EXCL))
                except FileExistsError:
                    continue
                os.replace(tmp, name)
                return name
    except OSError as error:
        raise cannot_write(path, error) from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def append_line(path: str | Path, text: str) -> None:
    """Append a line to a log file (an append is never half a file: no temporary needed)."""
    try:
        with open(path, "a") as file:
            file.write(text + "\n")
    except OSError as error:
        raise cannot_write(path, error) from None


def remove_temporaries(folder: str | Path, names: Sequence[str]) -> list[str]:
    """Remove the temporary files that interrupted writes of `names` left in `folder`, and
    describe them ("<path> (N MB)"). Only a process that holds the folder's run lock may
    call this: another writer's temporary files look the same."""
    removed = []
    for name in names:
        for tmp in Path(folder).glob(f".{_glob_escape(name)}.*{TMP_SUFFIX}"):
            with contextlib.suppress(OSError):
                size = tmp.stat().st_size
                tmp.unlink()
                removed.append(f"{tmp} ({size / 1e6:.0f} MB)")
    return removed


def _glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


class RunLock:
    """An exclusive lock on a name (`<path>.lock`), held until release or the process ends.

    The kernel releases an flock when its process dies, however it dies, so the lock file
    of a killed run is free and is taken over; the file holds the holder's pid, host, start
    time and command line for the message a second run gets.
    """

    def __init__(self, path: str | Path, what: str, instead: str) -> None:
        self.path = Path(f"{path}.lock")
        # For the message: the locked thing in the user's words, and what else to do.
        self.what, self.instead = what, instead
        self.fd: Optional[int] = None
        self.took_over: Optional[str] = None  # the previous holder, if its file was left behind

    def acquire(self) -> RunLock:
        while self.fd is None:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as error:
                raise cannot_write(self.path, error) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read(fd)
                os.close(fd)
                raise InUseError(f"{self.what} is in use by {holder or 'another process'} (lock file {self.path}); "
                                 f"wait for it to end, or {self.instead}") from None
            # A releasing holder removes the file while it still holds it: a lock taken
            # on a removed file is no lock, so try again on the file now at the path.
            if not _same_file(fd, self.path):
                os.close(fd)
                continue
            self.took_over = _read(fd) or None
            self.fd = fd
            holder = f"process {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}: "
            # The lock is the flock; the holder line only names it, and a full disk (perhaps
            # full of a killed run's temporary files, removed next) must not stop the run.
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
                os.pwrite(fd, (holder + " ".join([sys.executable, *sys.argv])).encode(), 0)
        return self

    def release(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                self.path.unlink()
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read(fd: int) -> str:
    return os.pread(fd, 4096, 0).decode(errors="replace").strip()


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False
