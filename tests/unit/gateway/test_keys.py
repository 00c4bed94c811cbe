"""API keys, enrollment tokens and the lease-signing key."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from byteleap.core.lease import gateway_id_of
from byteleap.gateway.keys import (
    KEY_PREFIXES,
    SIGNING_KEY_FILE,
    TOKEN_PREFIX,
    SigningKeyError,
    load_or_create_signing_key,
    load_signing_key,
    new_secret,
    parse_bearer,
    secret_hash,
)


def test_secrets_are_256_bit_prefixed_and_hashed() -> None:
    keys = {new_secret(KEY_PREFIXES["renter"]) for _ in range(100)}
    assert len(keys) == 100
    for key in keys:
        assert key.startswith("blr_") and len(key) == 4 + 43
        assert parse_bearer(f"Bearer {key}") == key
    token = new_secret(TOKEN_PREFIX)
    assert secret_hash(token) == hashlib.sha256(token.encode()).digest()


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "Bearer",
        "Basic dXNlcjpwYXNz",
        "Bearer short",
        "Bearer a b",
        "Bearer " + "a" * 200,
        "Bearer blr_abc\u00e9defghij",
        "Bearer blr_abc\ndefgh",
    ],
)
def test_malformed_bearer_headers_are_refused(header: str | None) -> None:
    assert parse_bearer(header) is None


def test_the_scheme_is_case_insensitive() -> None:
    assert parse_bearer("bearer blr_abcdefgh") == "blr_abcdefgh"


def test_the_signing_key_is_created_once_and_names_the_gateway(tmp_path: Path) -> None:
    signer, created = load_or_create_signing_key(tmp_path, environ={})
    assert created and (tmp_path / SIGNING_KEY_FILE).stat().st_mode & 0o777 == 0o600
    again, created = load_or_create_signing_key(tmp_path, environ={})
    assert not created and again.gateway_id == signer.gateway_id
    assert signer.gateway_id == gateway_id_of(signer.public_key)
    assert "PRIVATE" not in repr(signer) and signer.gateway_id in repr(signer)


def test_unsafe_or_foreign_signing_keys_are_refused(tmp_path: Path) -> None:
    load_or_create_signing_key(tmp_path, environ={})
    path = tmp_path / SIGNING_KEY_FILE
    path.chmod(0o640)
    with pytest.raises(SigningKeyError, match="mode 0640"):
        load_signing_key(tmp_path, environ={})
    path.unlink()
    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    path.write_bytes(pem)
    path.chmod(0o600)
    with pytest.raises(SigningKeyError, match="not an Ed25519 key"):
        load_signing_key(tmp_path, environ={})
    path.write_bytes(b"garbage")
    with pytest.raises(SigningKeyError, match="not an unencrypted PEM"):
        load_signing_key(tmp_path, environ={})


def test_the_signing_key_credential_wins(tmp_path: Path) -> None:
    creds, state = tmp_path / "creds", tmp_path / "state"
    creds.mkdir()
    state.mkdir()
    from_creds, _ = load_or_create_signing_key(creds, environ={})
    (creds / SIGNING_KEY_FILE).rename(creds / "signing-key")
    env = {"CREDENTIALS_DIRECTORY": str(creds)}
    signer, created = load_or_create_signing_key(state, environ=env)
    assert not created and signer.gateway_id == from_creds.gateway_id
    assert not (state / SIGNING_KEY_FILE).exists()
