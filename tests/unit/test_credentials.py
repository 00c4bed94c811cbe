"""Secrets: systemd credentials first, safe files only, never echoed; the enrollment proof."""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest

from byteleap.core.credentials import CredentialError, enrollment_mac, read_secret
from byteleap.core.files import write_new_file


def _secret_file(path: Path, data: bytes | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert write_new_file(path, data or secrets.token_hex(32).encode() + b"\n")
    return path


def test_private_secret_file_is_read_stripped(tmp_path: Path) -> None:
    path = _secret_file(tmp_path / "sub" / "enroll.secret")
    assert not write_new_file(path, b"other")  # never overwritten
    assert (path.stat().st_mode & 0o777) == 0o600
    assert len(read_secret("enrollment-secret", path, env={})) == 64


def test_systemd_credential_wins(tmp_path: Path) -> None:
    creds = tmp_path / "creds"
    _secret_file(creds / "enrollment-secret", b"c" * 32 + b"\n")
    fallback = _secret_file(tmp_path / "file.secret")
    got = read_secret("enrollment-secret", fallback, env={"CREDENTIALS_DIRECTORY": str(creds)})
    assert got == b"c" * 32
    # The configured file is the fallback when the credential directory lacks the name.
    other = read_secret("other-name", fallback, env={"CREDENTIALS_DIRECTORY": str(creds)})
    assert other == fallback.read_bytes().strip()


def test_unsafe_or_bad_files_are_refused_without_echo(tmp_path: Path) -> None:
    path = tmp_path / "s"
    path.write_text("supersecretvalue-0123456789")
    path.chmod(0o644)
    with pytest.raises(CredentialError) as exc:
        read_secret("x", path, env={})
    assert "chmod 600" in str(exc.value)
    assert "supersecret" not in str(exc.value)
    path.chmod(0o600)
    assert read_secret("x", path, env={}) == b"supersecretvalue-0123456789"

    with pytest.raises(CredentialError, match="shorter"):
        read_secret("x", _secret_file(tmp_path / "short", b"abc"), env={})
    with pytest.raises(CredentialError, match="larger than"):
        read_secret("x", _secret_file(tmp_path / "huge", b"a" * 5000), env={})
    with pytest.raises(CredentialError, match="does not exist"):
        read_secret("x", tmp_path / "missing", env={})
    with pytest.raises(CredentialError, match="no file configured"):
        read_secret("x", None, env={})
    link = tmp_path / "link"
    link.symlink_to(path)
    with pytest.raises(CredentialError):
        read_secret("x", link, env={})


def test_enrollment_mac_known_value() -> None:
    """HMAC-SHA256(secret, channel binding), pinned to a value computed independently."""
    mac = enrollment_mac(b"s" * 32, bytes(range(32)))
    assert mac.hex() == "812941a4b8f411bd1d8b92df3e4c4aab8a0c04da59cb46c243188e134360d68b"
    assert enrollment_mac(b"s" * 32, bytes(32)) != mac
