"""All-or-nothing file writes.

Every file the package writes goes through `atomic_write` (or `atomic_output` for writers that
need a path): the bytes go to a temporary file in the destination's directory, which is
flushed, fsynced and renamed over the destination, then the directory is fsynced. A reader
therefore sees the previous file or the complete new one, never a mix, even on a full disk or
after `kill -9`. A killed writer leaves its temporary file behind; `remove_stale_temps` (called
when a command starts) deletes those whose writer process is gone.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import tempfile
from collections.abc import Iterator

TEMP_SUFFIX = ".atomic-tmp"
_TEMP_NAME = re.compile(r"^\..+\.pid(\d+)\.[^.]+" + re.escape(TEMP_SUFFIX) + "$")


def fsync_directory(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # platforms without directory file descriptors
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _temp_in(directory: str, basename: str) -> tuple[int, str]:
    prefix = f".{basename}.pid{os.getpid()}."
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=prefix, suffix=TEMP_SUFFIX)
    # mkstemp creates 0600; give the file the permissions a plain open() would (umask).
    with contextlib.suppress(OSError):
        os.fchmod(fd, 0o666 & ~_umask())
    return fd, tmp


def _discard(tmp: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path next to `path`; when the block finishes, the file written there
    is fsynced and renamed over `path`. On any exception it is removed and `path` untouched."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(errno.EISDIR, "a directory, not a file path", path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = _temp_in(directory, os.path.basename(path))
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _discard(tmp)
        raise
    fsync_directory(directory)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", encoding: str | None = None):
    """Open a temporary file next to `path` for writing (`mode` "wb" or "w"); on success it
    replaces `path` atomically, on any exception it is removed and `path` is untouched."""
    if mode not in ("wb", "w"):
        raise ValueError(f"mode: expected 'wb' or 'w', got {mode!r}")
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(errno.EISDIR, "a directory, not a file path", path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = _temp_in(directory, os.path.basename(path))
    try:
        if mode == "w":
            f = os.fdopen(fd, "w", encoding=encoding or "utf-8", newline="")
        else:
            f = os.fdopen(fd, "wb")
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _discard(tmp)
        raise
    fsync_directory(directory)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_write(path, "wb") as f:
        f.write(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_write(path, "w") as f:
        f.write(text)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def remove_stale_temps(directory: str | os.PathLike, recursive: bool = False) -> list[str]:
    """Delete the temporary files that killed writers left in `directory` (those whose process
    no longer runs); return their paths."""
    directory = os.fspath(directory)
    removed = []
    if not os.path.isdir(directory):
        return removed
    walker = os.walk(directory) if recursive else [(directory, [], os.listdir(directory))]
    for root, _, files in walker:
        for name in files:
            match = _TEMP_NAME.match(name)
            if match is None or _alive(int(match.group(1))):
                continue
            full = os.path.join(root, name)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(full)
                removed.append(full)
    return removed
