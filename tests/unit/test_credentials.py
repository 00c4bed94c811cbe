"""Secrets: systemd credentials first, safe files only, never echoed."""

from __future__ import annotations

from pathlib import Path

import pytest

from byteleap.core.credentials import CredentialError, read_secret, write_new_secret


def test_generated_secret_is_private_and_readable(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "enroll.secret"
    assert write_new_secret(path)
    assert not write_new_secret(path)  # never overwritten
    assert (path.stat().st_mode & 0o777) == 0o600
    assert len(read_secret("enrollment-secret", path, env={})) == 64


def test_systemd_credential_wins(tmp_path: Path) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "enrollment-secret").write_text("c" * 32 + "\n")
    (creds / "enrollment-secret").chmod(0o400)
    fallback = tmp_path / "file.secret"
    write_new_secret(fallback)
    got = read_secret("enrollment-secret", fallback, env={"CREDENTIALS_DIRECTORY": str(creds)})
    assert got == b"c" * 32


def test_unsafe_or_bad_files_are_refused_without_echo(tmp_path: Path) -> None:
    path = tmp_path / "s"
    path.write_text("supersecretvalue-0123456789")
    (path).chmod(0o644)
    with pytest.raises(CredentialError) as exc:
        read_secret("x", path, env={})
    assert "chmod 600" in str(exc.value)
    assert "supersecret" not in str(exc.value)
    (path).chmod(0o600)
    assert read_secret("x", path, env={}) == b"supersecretvalue-0123456789"

    short = tmp_path / "short"
    short.write_text("abc")
    (short).chmod(0o600)
    with pytest.raises(CredentialError, match="shorter"):
        read_secret("x", short, env={})
    with pytest.raises(CredentialError, match="not found"):
        read_secret("x", tmp_path / "missing", env={})
    with pytest.raises(CredentialError, match="no file configured"):
        read_secret("x", None, env={})
    link = tmp_path / "link"
    link.symlink_to(path)
    with pytest.raises(CredentialError):
        read_secret("x", link, env={})
