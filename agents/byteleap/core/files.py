"""Private files (keys, secrets, pins): created atomically with mode 0600, read only when safe.

Every key-like file the agents keep goes through these two functions, so they all share the same
guarantees: no clobbering, data and directory fsynced, symlinks refused, group/other access
refused on read, and a size bound.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from pathlib import Path


class PrivateFileError(Exception):
    """A private file is missing, unsafe or unreadable; the message names the path."""


def write_new_file(path: Path, data: bytes) -> bool:
    """Atomically create ``path`` with ``data`` and mode 0600; False if it already existed.

    The data goes to an ``O_EXCL`` temporary file in the same directory, is fsynced, then
    hard-linked into place: unlike ``rename`` a link never replaces a file another process
    created first, so concurrent creators all end up with the same content.
    """
    directory = path.parent
    tmp = _temporary(path)
    try:
        write_exclusive(tmp, data)
        try:
            os.link(tmp, path)
            created = True
        except FileExistsError:
            created = False
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    _fsync_directory(directory)
    return created


def replace_private_file(path: Path, data: bytes) -> None:
    """Write ``path`` atomically with mode 0600, replacing any previous version.

    A reader (or a crash) sees either the old content or the new one, never a mix: the data goes
    to a fsynced temporary file in the same directory that is renamed over ``path``.
    """
    tmp = _temporary(path)
    try:
        write_exclusive(tmp, data)
        tmp.replace(path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    _fsync_directory(path.parent)


def write_exclusive(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Create ``path`` (never an existing file, never through a symlink) with exactly ``mode``
    and ``data``, fsynced."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, mode)
    try:
        os.fchmod(fd, mode)  # exact, whatever the umask
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _temporary(path: Path) -> Path:
    return path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"


def _fsync_directory(directory: Path) -> None:
    try:
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:  # pragma: no cover - e.g. directory not readable; the data fsync still held
        return
    try:
        os.fsync(dfd)
    except OSError:  # pragma: no cover - some filesystems refuse fsync on directories
        pass
    finally:
        os.close(dfd)


def read_private_file(path: Path, max_bytes: int, *, what: str) -> bytes:
    """The content of a regular, non-symlink file that only its owner may access.

    ``what`` names the file in errors ("worker key file", "secret file"); a file larger than
    ``max_bytes`` is refused, never silently truncated.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise PrivateFileError(f"{what} {path} does not exist") from None
    except OSError as exc:
        raise PrivateFileError(f"cannot open {what} {path}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise PrivateFileError(f"{what} {path} is not a regular file")
        mode = stat.S_IMODE(info.st_mode)
        if mode & 0o077:
            raise PrivateFileError(
                f"{what} {path} has mode {mode:04o}: it must not be accessible by group or "
                f"other (fix with: chmod 600 {path})"
            )
        data = b""
        while len(data) <= max_bytes:
            chunk = os.read(fd, max_bytes + 1 - len(data))
            if not chunk:
                break
            data += chunk
    except OSError as exc:
        raise PrivateFileError(f"cannot read {what} {path}: {exc.strerror}") from None
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        raise PrivateFileError(f"{what} {path} is larger than {max_bytes} bytes")
    return data
