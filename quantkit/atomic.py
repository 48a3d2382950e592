"""Write artifacts under a temporary name and rename them into place only when complete.

An interrupted run leaves at most a hidden ``.NAME.partial-XXXX`` file or directory, never something that
looks like a finished artifact.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_file(dest: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; on success it replaces ``dest``, on error it is removed."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.partial-", dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, dest)
    finally:
        tmp_path.unlink(missing_ok=True)


@contextmanager
def atomic_dir(dest: str | Path) -> Iterator[Path]:
    """Yield a temporary directory beside ``dest``; on success it replaces ``dest`` (an existing directory
    there is removed first), on error it is deleted."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
    try:
        yield tmp
        if dest.is_dir():
            shutil.rmtree(dest)
        elif dest.exists():
            dest.unlink()
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


RESUME_KEY = "resume-key"


@contextmanager
def resumable_dir(dest: str | Path, key: str) -> Iterator[Path]:
    """Like ``atomic_dir``, but the temporary directory has a fixed name, ``.NAME.partial``, so that work
    written into it survives a hard kill (SIGKILL, power loss) and the same command can pick it up again.

    ``key`` identifies the command (options and input); it is stored in the directory. An existing
    ``.NAME.partial`` with the same key is reused as it is; one with another key is work of a different
    command and is started afresh; a directory of that name without a key was not made here and is refused.
    On success the key file is removed and the directory replaces ``dest``; on any exception (including
    KeyboardInterrupt) it is deleted. Only a process that dies without unwinding leaves it behind."""
    from .errors import QuantkitError

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.partial"
    key_file = tmp / RESUME_KEY
    if tmp.exists() and not key_file.is_file():
        raise QuantkitError(f"{tmp}: exists and is not quantkit's work in progress; remove it or choose another output")
    if tmp.exists() and key_file.read_text() != key:
        shutil.rmtree(tmp)
    if not tmp.exists():
        staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
        (staging / RESUME_KEY).write_text(key)
        os.replace(staging, tmp)
    try:
        yield tmp
        key_file.unlink()
        if dest.is_dir():
            shutil.rmtree(dest)
        elif dest.exists():
            dest.unlink()
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
