"""Reading secrets (enrollment secret, DSN passwords) without leaking them.

Order: a systemd credential (``LoadCredential=NAME:...`` puts it in ``$CREDENTIALS_DIRECTORY/NAME``,
readable only by the service), then the configured file. A file that group or others may read is
refused, as is one that is too short to be a secret. Errors name the path, never the content.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
from collections.abc import Mapping
from pathlib import Path

MIN_SECRET_BYTES = 16


class CredentialError(Exception):
    """A secret is missing, unsafe or malformed; the message names where it was looked for."""


def credential_path(name: str, fallback: str | Path | None, env: Mapping[str, str]) -> Path:
    directory = env.get("CREDENTIALS_DIRECTORY")
    if directory:
        candidate = Path(directory) / name
        if candidate.exists():
            return candidate
    if fallback is None:
        where = f"$CREDENTIALS_DIRECTORY/{name}" if directory else f"credential {name!r}"
        raise CredentialError(f"{where}: not found and no file configured")
    return Path(fallback)


def read_secret(
    name: str, fallback: str | Path | None, *, env: Mapping[str, str] | None = None
) -> bytes:
    """The secret's bytes (surrounding whitespace stripped)."""
    path = credential_path(name, fallback, os.environ if env is None else env)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise CredentialError(f"{path}: secret file not found") from None
    except OSError as exc:
        raise CredentialError(f"{path}: cannot open secret file: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise CredentialError(f"{path}: not a regular file")
        if info.st_mode & 0o077:
            raise CredentialError(
                f"{path}: readable by group or others (mode {stat.S_IMODE(info.st_mode):04o}); "
                f"run 'chmod 600 {path}'"
            )
        data = os.read(fd, 65536).strip()
    finally:
        os.close(fd)
    if len(data) < MIN_SECRET_BYTES:
        raise CredentialError(f"{path}: secret is shorter than {MIN_SECRET_BYTES} bytes")
    return data


def write_new_secret(path: str | Path, *, nbytes: int = 32) -> bool:
    """Create a random hex secret with mode 0600 unless the file exists; True if created."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        return False
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, secrets.token_hex(nbytes).encode() + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    return True


def enrollment_mac(secret: bytes, channel_binding: bytes) -> bytes:
    """Proof of knowing a shared secret without sending it: ``HMAC-SHA256(secret, binding)``.

    The channel binding is unique to one secure session and unknown outside it, so the proof
    cannot be replayed into another session (see ``core.session``).
    """
    return hmac.new(secret, channel_binding, hashlib.sha256).digest()
