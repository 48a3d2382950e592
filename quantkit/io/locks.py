"""Outputs held by one command at a time: two commands raced on one output never both write it.

``hold`` takes an output for this process (an exclusive lock on a hidden ``.NAME.lock`` beside it) until
``release_outputs``; ``lock_dir`` locks a resumable work directory for the run using it. Both refuse at
once, in one line, when another process holds the lock; a lock dies with its process (a SIGKILLed run
leaves nothing held), and a holder removes its lock file when it lets go.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from quantkit.errors import QuantkitError

# Outputs this process holds: resolved path -> (descriptor of the locked file, its path)
_HELD: dict[Path, tuple[int, Path]] = {}


def _busy(label: str) -> QuantkitError:
    what = "another quantkit command is writing it"
    return QuantkitError(f"{label}: {what} (wait for it to end, or choose another path)")


def _lock(path: Path, label: str) -> int:
    """An exclusive lock on ``path`` (created if missing), refused at once if another process holds it. A
    holder removes the file when it lets go, so a lock won on a file that is no longer at ``path`` is retried."""
    while True:
        fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise _busy(label) from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def hold(target: Path, label: str) -> None:
    """Take ``target`` for this process until ``release_outputs`` (a lock on ``.NAME.lock`` beside it; where
    its directory does not exist yet, the writers' own guards below stand alone)."""
    if target in _HELD or not target.parent.is_dir():
        return
    lock = target.parent / f".{target.name}.lock"
    _HELD[target] = (_lock(lock, label), lock)


def release_outputs() -> None:
    """Let go of every output this process holds (the command has ended)."""
    for fd, lock in _HELD.values():
        lock.unlink(missing_ok=True)
        os.close(fd)
    _HELD.clear()


def lock_dir(path: Path, label: str) -> int:
    """An exclusive lock on the directory ``path`` for this run: a descriptor to close. Refused at once while
    another run holds it, or when ``path`` was just renamed away (its holder finished)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        raise _busy(label) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.stat(path).st_ino != os.fstat(fd).st_ino:
            raise FileNotFoundError
    except (BlockingIOError, FileNotFoundError):
        os.close(fd)
        raise _busy(label) from None
    return fd
