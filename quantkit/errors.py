"""The error taxonomy: what the user caused becomes one line (exit 2), a bug keeps its traceback.

``QuantkitError`` is raised for bad input; ``user_message`` also turns the operating system's refusals
(permission, disk full, read-only file system, name too long, out of memory) into the same one-line form.
"""

from __future__ import annotations

import errno
import os
import re


class QuantkitError(Exception):
    """A problem with the user's input (file, config, option), stated in one line."""


class Terminated(BaseException):
    """Raised by the SIGTERM handler so that every ``finally`` (removal of partial output) still runs."""


EXIT_USAGE, EXIT_BUG, EXIT_SIGINT, EXIT_SIGTERM = 2, 1, 130, 143

# errno -> (problem, what to do)
_OS_HINTS = {
    errno.EACCES: ("permission denied", "check its permissions or choose another location"),
    errno.EPERM: ("operation not permitted", "check its permissions or choose another location"),
    errno.ENOSPC: ("no space left on device", "free some space or choose another location"),
    errno.EDQUOT: ("disk quota exceeded", "free some space or choose another location"),
    errno.EROFS: ("read-only file system", "choose a writable location"),
    errno.ENAMETOOLONG: ("file name too long", "use a shorter name"),
    errno.ENOTDIR: ("a part of the path is not a directory", "check the path"),
    errno.EISDIR: ("is a directory", "name a file"),
    errno.ENOENT: ("no such file or directory", "check the path"),
    errno.EEXIST: ("already exists", "choose a new path"),
    errno.ENOTEMPTY: ("directory not empty", "choose a new path"),
    errno.ENOMEM: ("out of memory", "use smaller sizes or a machine with more memory"),
    errno.EFBIG: ("file too large for this file system", "choose another location"),
    errno.EIO: ("input/output error", "check the disk"),
}
_MEMORY_HINT = "out of memory (use smaller --nsamples/--seqlen/--ctx/--batch-size, or a machine with more memory)"


def _os_line(code: int | None, where: str, detail: str) -> str:
    problem, todo = _OS_HINTS.get(code, (detail or "operating system error", "check the path and the disk"))
    return f"{where}: {problem} ({todo})"


def user_message(exc: BaseException) -> str | None:
    """The one-line message (without the ``quantkit: error:`` prefix) for a failure the user caused, or None
    for a bug."""
    if isinstance(exc, QuantkitError):
        return " ".join(str(exc).split("\n"))
    if isinstance(exc, MemoryError):
        return _MEMORY_HINT
    if isinstance(exc, OSError):
        where = exc.filename if exc.filename is not None else "quantkit"
        return _os_line(exc.errno, str(where), exc.strerror or str(exc))
    text = str(exc)
    if isinstance(exc, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text.lower()):
        return _MEMORY_HINT
    code = _rust_os_error(exc)  # the Rust writer reports I/O errors as text
    if code is not None:
        return _os_line(code, "safetensors writer", text.splitlines()[0])
    return None


def with_path(exc: BaseException, path: object) -> OSError | None:
    """``exc`` as an OSError naming ``path`` when it is an I/O failure that names no file (a full disk seen by
    ``write``, or the safetensors writer's text report of one); None otherwise."""
    if isinstance(exc, OSError) and exc.filename is None and exc.errno is not None:
        return OSError(exc.errno, exc.strerror, str(path))
    if isinstance(exc, OSError) and exc.errno is None and _SHORT_WRITE.search(str(exc)):
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))  # numpy's tofile on a full disk
    code = _rust_os_error(exc)
    return None if code is None else OSError(code, os.strerror(code), str(path))


_SHORT_WRITE = re.compile(r"\d+ requested and \d+ written")
_RUST_OS_ERROR = re.compile(r"os error (\d+)|code: (\d+)")


def _rust_os_error(exc: BaseException) -> int | None:
    """The errno inside the text of an I/O error from the safetensors (Rust) writer."""
    if type(exc).__name__ != "SafetensorError":
        return None
    m = _RUST_OS_ERROR.search(str(exc))
    return None if m is None else int(m.group(1) or m.group(2))
