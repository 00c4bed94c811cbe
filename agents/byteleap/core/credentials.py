"""Reading secrets (enrollment secret, DSN passwords) without leaking them.

Order: a systemd credential (``LoadCredential=NAME:...`` puts it in ``$CREDENTIALS_DIRECTORY/NAME``,
readable only by the service), then the configured file. A file that group or others may read is
refused, as is one that is too short to be a secret. Errors name the path, never the content.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Mapping
from pathlib import Path

from .files import PrivateFileError, read_private_file

MIN_SECRET_BYTES = 16
MAX_SECRET_BYTES = 4096


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
        data = read_private_file(path, MAX_SECRET_BYTES, what="secret file").strip()
    except PrivateFileError as exc:
        raise CredentialError(str(exc)) from None
    if len(data) < MIN_SECRET_BYTES:
        raise CredentialError(f"{path}: secret is shorter than {MIN_SECRET_BYTES} bytes")
    return data


def enrollment_mac(secret: bytes, channel_binding: bytes) -> bytes:
    """Proof of knowing a shared secret without sending it: ``HMAC-SHA256(secret, binding)``.

    The channel binding is unique to one secure session and unknown outside it, so the proof
    cannot be replayed into another session (see ``core.session``).
    """
    return hmac.new(secret, channel_binding, hashlib.sha256).digest()
