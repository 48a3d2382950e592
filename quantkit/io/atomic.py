"""Write artifacts under a temporary name and rename them into place only when complete.

An interrupted run leaves at most a hidden ``.NAME.partial-XXXX`` file or directory, never something that
looks like a finished artifact. ``check_output`` decides, before any work, whether an output location may be
written at all: nothing the user did not name as output is ever removed or replaced.

Commands raced on one output: ``check_output`` also takes the output for the command (an exclusive lock on
a hidden ``.NAME.lock`` beside it, held until ``release_outputs``), so a second command on the same output is
refused at once. Underneath, without ``--overwrite`` a finished file or directory is published only where
nothing is (a link / a rename that cannot replace), and a resumable ``.NAME.partial`` directory is locked by
the run using it: whatever the timing, one run wins and the other ends with a one-line error.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

from quantkit.errors import QuantkitError, with_path
from quantkit.io.locks import hold, lock_dir

ARTIFACT_MARKER = "quantkit.json"  # every directory quantkit writes holds this file
# Whether the atomic writers may replace an existing file / artifact at their destination when they finish.
# A library call may (its caller named the path); a command may only with --overwrite, which check_output
# records here, so an output that appears meanwhile (a concurrent run) is not silently replaced.
_REPLACE = ContextVar("quantkit_replace_existing", default=True)
_TMP_SUFFIX_LEN = 24  # ".NAME.partial-XXXXXXXX": the hidden name is this much longer than NAME


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _chmod_umask(path: Path, is_dir: bool) -> None:
    """mkstemp / mkdtemp create private (0600 / 0700) paths; artifacts get the mode any tool would give."""
    os.chmod(path, (0o777 if is_dir else 0o666) & ~_umask())


def _chmod_tree_umask(root: Path) -> None:
    """Some writers (safetensors' among them) create private files; give every file the umask's mode."""
    for p in root.rglob("*"):
        if not p.is_symlink():
            _chmod_umask(p, is_dir=p.is_dir())


def is_artifact(path: Path) -> bool:
    """Whether ``path`` is a directory quantkit wrote (the only kind it will ever remove)."""
    return path.is_dir() and (path / ARTIFACT_MARKER).is_file()


def _nonempty_dir(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def _existing_ancestor(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _check_replaceable(out: Path, kind: str, overwrite: bool, label: str) -> None:
    """An existing ``out`` may be replaced only with ``overwrite``, and a directory only if it is an artifact."""
    if kind == "file" and out.is_dir():
        raise QuantkitError(f"{label}: is a directory (name a .gguf file to write)")
    if not (out.exists() or out.is_symlink()) or (out.is_dir() and not _nonempty_dir(out)):
        return
    if not overwrite:
        what = "non-empty directory" if out.is_dir() else "file"
        raise QuantkitError(f"{label}: an existing {what} is in the way (choose a new path, or pass --overwrite)")
    if out.is_dir() and not is_artifact(out):
        raise QuantkitError(
            f"{label}: existing directory is not a quantkit output (no {ARTIFACT_MARKER}); "
            "quantkit never removes it, even with --overwrite (remove it yourself or choose a new path)"
        )


def check_location(out: Path, label: str, need_bytes: int) -> None:
    """Parent is a writable directory on a file system with room for ``need_bytes``; the name is not too long."""
    for part in out.parts[1:]:
        if len(os.fsencode(part)) + _TMP_SUFFIX_LEN > 255:
            raise QuantkitError(f"{label}: file name too long (use a name under {255 - _TMP_SUFFIX_LEN} bytes)")
    base = _existing_ancestor(out.parent)
    if not base.is_dir():
        raise QuantkitError(f"{label}: {base} is not a directory (choose a path inside a directory)")
    st = os.statvfs(base)
    if st.f_flag & os.ST_RDONLY:
        raise QuantkitError(f"{label}: {base} is on a read-only file system (choose a writable location)")
    try:  # a real write: permission bits alone say nothing for root, or on /proc and the like
        fd, probe = tempfile.mkstemp(prefix=".quantkit-probe-", dir=base)
    except OSError as e:
        raise QuantkitError(f"{label}: cannot write in {base}: {e.strerror} (choose a writable location)") from None
    os.close(fd)
    os.unlink(probe)
    free = st.f_bavail * st.f_frsize
    if need_bytes > free:
        raise QuantkitError(
            f"{label}: needs about {need_bytes / 2**20:.1f} MiB but {base} has {free / 2**20:.1f} MiB free "
            "(free some space or choose another location)"
        )


def check_output(
    out: str | Path,
    inputs: Iterable[str | Path | None],
    *,
    kind: str,
    overwrite: bool = False,
    need_bytes: int = 0,
    label: str | None = None,
) -> Path:
    """Refuse an output location that could destroy anything; call before any work. ``kind``: "dir" | "file".

    Refused: an empty path; the current directory or one of its ancestors; an input, a path inside an input
    or containing one; an existing file or non-empty directory unless ``overwrite``; even with ``overwrite``,
    a directory without quantkit's marker; a parent that is not a writable directory; too little free space
    for ``need_bytes``. Records ``overwrite`` for the atomic writers of this context. Returns the path."""
    if not str(out):
        raise QuantkitError("-o/--output: empty path (name the output location)")
    out = Path(out)
    label = label or str(out)
    target = out.resolve()
    for inp in inputs:
        if inp is None or not str(inp):
            continue
        src = Path(inp).resolve()
        if target == src:
            raise QuantkitError(f"{label}: is also an input (choose a different output path)")
        if src in target.parents:
            raise QuantkitError(f"{label}: lies inside the input {inp} (choose a path outside it)")
        if target in src.parents:
            raise QuantkitError(f"{label}: contains the input {inp} (choose a path that does not contain it)")
    cwd = Path.cwd().resolve()
    if target == cwd or target in cwd.parents:
        raise QuantkitError(f"{label}: is the current directory or contains it (name a new path for the output)")
    _check_replaceable(out, kind, overwrite, label)
    check_location(target, label, need_bytes)
    hold(target, label)
    _REPLACE.set(overwrite)
    return out


def _mkdir_parents(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)


_NAMING = ContextVar("quantkit_naming_errors", default=False)


@contextmanager
def _naming_errors(dest: Path) -> Iterator[None]:
    """OS errors of the writers (disk full, ...) re-raised as one-line errors that name ``dest``. Nested
    (a shard written inside an artifact directory), the outermost output is the one named."""
    if _NAMING.get():
        yield
        return
    token = _NAMING.set(True)
    try:
        yield
    except Exception as e:
        named = with_path(e, dest)
        if named is None:
            raise
        raise named from e
    finally:
        _NAMING.reset(token)


@contextmanager
def atomic_file(dest: str | Path, overwrite: bool | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; on success it replaces ``dest``, on error it is removed.
    Without ``overwrite`` (default: see ``_REPLACE``) an existing ``dest`` is left alone: an error."""
    dest = Path(dest)
    overwrite = _REPLACE.get() if overwrite is None else overwrite
    _mkdir_parents(dest.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.partial-", dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        _chmod_umask(tmp_path, is_dir=False)
        with _naming_errors(dest):
            yield tmp_path
        if dest.is_dir():
            raise QuantkitError(f"{dest}: is a directory (name a file to write)")
        if overwrite:
            os.replace(tmp_path, dest)
        else:  # a link, unlike a rename, never replaces what is there: the check and the publishing are one
            try:
                os.link(tmp_path, dest)
            except FileExistsError:
                raise _appeared(dest) from None
            except OSError as e:  # a file system without hard links: check, then rename
                if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV):
                    raise
                if dest.exists() or dest.is_symlink():
                    raise _appeared(dest) from None
                os.replace(tmp_path, dest)
    finally:
        tmp_path.unlink(missing_ok=True)


def _appeared(dest: Path) -> QuantkitError:
    return QuantkitError(f"{dest}: appeared while writing; left alone (pass --overwrite to replace it)")


def _swap_into_place(tmp: Path, dest: Path, overwrite: bool) -> None:
    """Give the finished directory ``tmp`` the umask's modes and put it at ``dest``. Whatever is there is
    replaced only if it is an empty directory, or with ``overwrite`` a file or a quantkit artifact; the old
    artifact is renamed aside first, removed only once the new one is in place, and put back on failure."""
    _chmod_tree_umask(tmp)
    _check_replaceable(dest, "dir", overwrite, str(dest))
    old: Path | None = None
    if dest.is_dir() and not dest.is_symlink() and not _nonempty_dir(dest):
        dest.rmdir()
    elif dest.exists() or dest.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
        os.replace(dest, old / dest.name)
    try:
        os.replace(tmp, dest)  # never onto a non-empty directory: one that appeared meanwhile stays
    except OSError as e:
        if old is not None:
            os.replace(old / dest.name, dest)  # put the previous artifact back
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            raise _appeared(dest) from None
        raise
    except BaseException:
        if old is not None:
            os.replace(old / dest.name, dest)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_dir(dest: str | Path, overwrite: bool | None = None) -> Iterator[Path]:
    """Yield a temporary directory beside ``dest``; on success it takes ``dest``'s place (``_swap_into_place``),
    on error it is deleted. ``overwrite`` defaults to what ``check_output`` recorded (true for a library call)."""
    dest = Path(dest)
    overwrite = _REPLACE.get() if overwrite is None else overwrite
    _mkdir_parents(dest.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
    try:
        _chmod_umask(tmp, is_dir=True)
        with _naming_errors(dest):
            yield tmp
        _swap_into_place(tmp, dest, overwrite)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


RESUME_KEY = "resume-key"


@contextmanager
def resumable_dir(dest: str | Path, key: str, overwrite: bool | None = None) -> Iterator[Path]:
    """Like ``atomic_dir``, but the temporary directory has a fixed name, ``.NAME.partial``, so that work
    written into it survives a hard kill (SIGKILL, power loss) and the same command can pick it up again.

    ``key`` identifies the command (options and input); it is stored in the directory. An existing
    ``.NAME.partial`` with the same key is reused as it is; one with another key is work of a different
    command and is started afresh; a directory of that name without a key was not made here and is refused.
    On success the key file is removed and the directory takes ``dest``'s place as in ``atomic_dir``; on any
    exception (including KeyboardInterrupt and SIGTERM) it is deleted. Only a process that dies without
    unwinding leaves it behind. The run using the directory holds a lock on it: a second run of any command
    on the same output is refused while the first is alive (the lock dies with its process)."""
    dest = Path(dest)
    overwrite = _REPLACE.get() if overwrite is None else overwrite
    _mkdir_parents(dest.parent)
    tmp = dest.parent / f".{dest.name}.partial"
    key_file = tmp / RESUME_KEY
    if tmp.exists() and not key_file.is_file():
        raise QuantkitError(f"{tmp}: exists and is not quantkit's work in progress (remove it or choose another path)")
    if not tmp.exists():
        staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
        _chmod_umask(staging, is_dir=True)
        (staging / RESUME_KEY).write_text(key)
        try:
            os.replace(staging, tmp)
        except OSError as e:  # another run made it first: lock (and so refuse) theirs
            shutil.rmtree(staging, ignore_errors=True)
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
    fd = lock_dir(tmp, str(dest))
    if key_file.read_text() != key:  # work of another command: start afresh
        for p in tmp.iterdir():
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        key_file.write_text(key)
    try:
        with _naming_errors(dest):
            yield tmp
        key_file.unlink()
        _swap_into_place(tmp, dest, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        os.close(fd)
