"""Secrets the gateway hands out (API keys, enrollment tokens) and its lease-signing key.

API keys and enrollment tokens are 256-bit random values shown once (``blr_`` renter keys,
``blv_`` validator keys, ``ble_`` enrollment tokens, then 43 base64url characters). The store
keeps only their SHA-256: a request is authenticated by looking its hash up, so no comparison of
secrets ever happens in Python and a stolen database holds nothing usable.

The lease-signing key is Ed25519 (PKCS#8 PEM, ``signing.key`` 0600 in the state directory, or the
systemd credential ``signing-key``); the gateway's id is :func:`byteleap.core.lease.gateway_id_of`
its public key.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Final, Literal

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ..core.files import PrivateFileError, read_private_file, write_new_file
from ..core.lease import LeaseRecord, SignedLeaseRecord, gateway_id_of, sign_record
from .config import SIGNING_KEY_CREDENTIAL, key_path

__all__ = [
    "KEY_PREFIXES",
    "SIGNING_KEY_FILE",
    "TOKEN_PREFIX",
    "KeyKind",
    "LeaseSigner",
    "SigningKeyError",
    "load_or_create_signing_key",
    "load_signing_key",
    "new_secret",
    "parse_bearer",
    "secret_hash",
]

KeyKind = Literal["renter", "validator"]
KEY_PREFIXES: Final[dict[KeyKind, str]] = {"renter": "blr_", "validator": "blv_"}
TOKEN_PREFIX: Final = "ble_"  # noqa: S105 - a prefix, not a secret
SIGNING_KEY_FILE: Final = "signing.key"
SECRET_BYTES: Final = 32
_BEARER: Final = re.compile(r"\ABearer ([A-Za-z0-9_-]{8,128})\Z", re.IGNORECASE)
_MAX_KEY_BYTES: Final = 4096


class SigningKeyError(Exception):
    """The signing key is missing, unsafe or not an Ed25519 key; the message names the file."""


def new_secret(prefix: str) -> str:
    """A fresh 256-bit secret with its type prefix (show it once, store :func:`secret_hash`)."""
    raw = base64.urlsafe_b64encode(secrets.token_bytes(SECRET_BYTES)).rstrip(b"=")
    return prefix + raw.decode("ascii")


def secret_hash(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8")).digest()


def parse_bearer(header: str | None) -> str | None:
    """The credential of ``Authorization: Bearer <credential>``, or None if malformed."""
    if header is None:
        return None
    match = _BEARER.match(header.strip())
    return match.group(1) if match else None


class LeaseSigner:
    """Signs lease records with the gateway's Ed25519 key."""

    __slots__ = ("_key", "gateway_id", "public_key")

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key
        self.public_key = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.gateway_id = gateway_id_of(self.public_key)

    def __repr__(self) -> str:  # never show key material
        return f"LeaseSigner(gateway_id={self.gateway_id!r})"

    def sign(self, record: LeaseRecord) -> SignedLeaseRecord:
        return sign_record(record, self._key)


def _parse(data: bytes, path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise SigningKeyError(f"signing key {path} is not an unencrypted PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningKeyError(f"signing key {path} is not an Ed25519 key")
    return key


def _signing_key_path(state_dir: Path, environ: Mapping[str, str]) -> Path:
    return key_path(state_dir, SIGNING_KEY_CREDENTIAL, SIGNING_KEY_FILE, environ)[0]


def load_signing_key(state_dir: Path, environ: Mapping[str, str] | None = None) -> LeaseSigner:
    path = _signing_key_path(state_dir, os.environ if environ is None else environ)
    try:
        data = read_private_file(path, _MAX_KEY_BYTES, what="signing key")
    except PrivateFileError as exc:
        raise SigningKeyError(str(exc)) from None
    return LeaseSigner(_parse(data, path))


def load_or_create_signing_key(
    state_dir: Path, environ: Mapping[str, str] | None = None
) -> tuple[LeaseSigner, bool]:
    """The signing key, generated first (0600, never overwritten) when there is none."""
    env = os.environ if environ is None else environ
    path = _signing_key_path(state_dir, env)
    if path.exists() or path.is_symlink():
        return load_signing_key(state_dir, env), False
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    if not write_new_file(path, pem):
        return load_signing_key(state_dir, env), False
    return LeaseSigner(key), True
