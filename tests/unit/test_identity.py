"""Long-term identities: worker key persistence and permissions, worker_id, sr25519 hotkeys."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from byteleap.core.identity import (
    HotkeySigner,
    IdentityError,
    IdentityKind,
    KeyFileError,
    PeerIdentity,
    Signer,
    WorkerKey,
    worker_id_of,
)

ALICE_SS58 = "5GrwvaEF5zXb26Fz9rcQpDWS57CtERHpNehXCPcNoHGKutQY"


@pytest.fixture(scope="module")
def alice() -> HotkeySigner:
    return HotkeySigner.from_uri("//Alice")


@pytest.fixture(scope="module")
def bob() -> HotkeySigner:
    return HotkeySigner.from_uri("//Bob")


# ------------------------------------------------------------------------------------------------
# WorkerKey persistence


def test_load_or_create_persists_and_reloads(tmp_path: Path) -> None:
    path = tmp_path / "state" / "worker.key"
    first = WorkerKey.load_or_create(path)
    assert path.is_file()
    second = WorkerKey.load_or_create(path)
    assert second.public_key == first.public_key
    assert second.worker_id == first.worker_id
    assert second.identity == first.identity
    # what one signs the other's identity verifies: it is the same private key
    assert first.identity.verify(b"m", second.sign(b"m"))


def test_key_file_is_0600_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o000)
    try:
        WorkerKey.load_or_create(tmp_path / "worker.key")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "worker.key").stat().st_mode) == 0o600
    # no temporary files left behind
    assert [p.name for p in tmp_path.iterdir()] == ["worker.key"]


def test_created_directory_is_private(tmp_path: Path) -> None:
    WorkerKey.load_or_create(tmp_path / "new" / "worker.key")
    assert stat.S_IMODE((tmp_path / "new").stat().st_mode) & 0o077 == 0


def test_key_file_format_is_pkcs8_pem_ed25519(tmp_path: Path) -> None:
    key = WorkerKey.load_or_create(tmp_path / "worker.key")
    data = (tmp_path / "worker.key").read_bytes()
    assert data.startswith(b"-----BEGIN PRIVATE KEY-----")
    loaded = serialization.load_pem_private_key(data, password=None)
    assert isinstance(loaded, Ed25519PrivateKey)
    raw = loaded.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    assert raw == key.public_key


def test_loads_a_key_written_by_someone_else(tmp_path: Path) -> None:
    private = Ed25519PrivateKey.generate()
    path = tmp_path / "worker.key"
    path.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)
    key = WorkerKey.load_or_create(path)
    assert key.public_key == private.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o610])
def test_refuses_key_file_accessible_by_group_or_other(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "worker.key"
    WorkerKey.load_or_create(path)
    path.chmod(mode)
    with pytest.raises(KeyFileError, match=str(path)) as excinfo:
        WorkerKey.load_or_create(path)
    assert f"{mode:04o}" in str(excinfo.value)
    assert "chmod 600" in str(excinfo.value)


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"garbage",
        b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        os.urandom(32),
    ],
)
def test_refuses_corrupted_key_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "worker.key"
    path.write_bytes(content)
    path.chmod(0o600)
    with pytest.raises(KeyFileError, match="corrupted") as excinfo:
        WorkerKey.load_or_create(path)
    assert str(path) in str(excinfo.value)
    assert path.read_bytes() == content  # never overwritten


def test_refuses_a_key_of_another_algorithm(tmp_path: Path) -> None:
    path = tmp_path / "worker.key"
    other = X25519PrivateKey.generate()
    path.write_bytes(
        other.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)
    with pytest.raises(KeyFileError, match="corrupted"):
        WorkerKey.load(path)


def test_refuses_an_encrypted_key_file(tmp_path: Path) -> None:
    path = tmp_path / "worker.key"
    path.write_bytes(
        Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"pw"),
        )
    )
    path.chmod(0o600)
    with pytest.raises(KeyFileError, match=str(path)):
        WorkerKey.load(path)


def test_refuses_a_directory_in_place_of_the_key(tmp_path: Path) -> None:
    path = tmp_path / "worker.key"
    path.mkdir(mode=0o700)
    with pytest.raises(KeyFileError, match="not a regular file"):
        WorkerKey.load_or_create(path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_reports_a_directory_it_cannot_create(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        with pytest.raises(KeyFileError, match=str(locked / "sub")):
            WorkerKey.load_or_create(locked / "sub" / "worker.key")
    finally:
        locked.chmod(0o700)


def test_reports_a_directory_it_cannot_create_under_a_file(tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_bytes(b"")
    with pytest.raises(KeyFileError, match="cannot create directory") as excinfo:
        WorkerKey.load_or_create(blocker / "worker.key")
    assert str(blocker / "worker.key") in str(excinfo.value)


def test_missing_key_file_on_plain_load(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="does not exist"):
        WorkerKey.load(tmp_path / "absent.key")


def test_concurrent_creators_agree_on_one_identity(tmp_path: Path) -> None:
    path = tmp_path / "worker.key"
    code = (
        "import sys; from byteleap.core.identity import WorkerKey; "
        "print(WorkerKey.load_or_create(sys.argv[1]).worker_id)"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    ids = {p.communicate(timeout=30)[0].strip() for p in procs}
    assert all(p.returncode == 0 for p in procs)
    assert ids == {WorkerKey.load(path).worker_id}


def test_repr_does_not_leak_key_material(tmp_path: Path) -> None:
    key = WorkerKey.generate()
    assert key.worker_id in repr(key)
    assert "PRIVATE" not in repr(key)


# ------------------------------------------------------------------------------------------------
# worker_id


def test_worker_id_is_derived_from_the_public_key_only() -> None:
    key = WorkerKey.generate()
    expected = worker_id_of(key.public_key)
    assert key.worker_id == expected
    assert len(expected) == 32
    assert expected == expected.lower()
    assert key.identity.display == expected
    # a fresh object from the public key alone yields the same id
    assert PeerIdentity(IdentityKind.ED25519, key.public_key).display == expected


def test_worker_id_known_vector() -> None:
    """hex(SHA-256(b"byteleap/worker-id/v1" || pub)[:16]), fixed: ids are stored and shown."""
    assert worker_id_of(bytes(range(32))) == "8e4ef82a5d36a5e85517fa3cbfddd5e1"


def test_worker_ids_differ_between_keys() -> None:
    assert WorkerKey.generate().worker_id != WorkerKey.generate().worker_id


@pytest.mark.parametrize("bad", [b"", b"\x00" * 31, b"\x00" * 33])
def test_worker_id_of_rejects_wrong_length(bad: bytes) -> None:
    with pytest.raises(ValueError):
        worker_id_of(bad)


# ------------------------------------------------------------------------------------------------
# PeerIdentity


def test_peer_identity_is_frozen_and_hashable() -> None:
    pub = WorkerKey.generate().public_key
    a = PeerIdentity(IdentityKind.ED25519, pub)
    b = PeerIdentity(IdentityKind.ED25519, bytes(pub))
    assert a == b
    assert len({a, b}) == 1
    assert PeerIdentity(IdentityKind.SR25519, pub) != a
    with pytest.raises(AttributeError):
        a.public_key = b"\x00" * 32  # type: ignore[misc]


@pytest.mark.parametrize("bad", [b"", b"\x01" * 31, b"\x01" * 33, "ab" * 16])
def test_peer_identity_rejects_bad_public_key(bad: object) -> None:
    with pytest.raises(ValueError):
        PeerIdentity(IdentityKind.ED25519, bad)  # type: ignore[arg-type]


def test_ed25519_sign_and_verify() -> None:
    key = WorkerKey.generate()
    sig = key.sign(b"hello")
    assert key.identity.verify(b"hello", sig)
    assert not key.identity.verify(b"hellO", sig)
    assert not WorkerKey.generate().identity.verify(b"hello", sig)


def test_workerkey_and_hotkey_satisfy_signer_protocol(alice: HotkeySigner) -> None:
    assert isinstance(WorkerKey.generate(), Signer)
    assert isinstance(alice, Signer)


@given(
    kind=st.sampled_from(list(IdentityKind)),
    public_key=st.binary(min_size=32, max_size=32),
    message=st.one_of(st.binary(max_size=64), st.text(max_size=8), st.none(), st.integers()),
    signature=st.one_of(st.binary(max_size=80), st.text(max_size=8), st.none()),
)
def test_verify_returns_false_on_garbage(
    kind: IdentityKind, public_key: bytes, message: object, signature: object
) -> None:
    identity = PeerIdentity(kind, public_key)
    assert identity.verify(message, signature) is False  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", list(IdentityKind))
@pytest.mark.parametrize("pub", [b"\x00" * 32, b"\xff" * 32, b"\x01" + b"\x00" * 31])
def test_verify_returns_false_for_invalid_points(kind: IdentityKind, pub: bytes) -> None:
    assert PeerIdentity(kind, pub).verify(b"m", b"\x00" * 64) is False
    assert PeerIdentity(kind, pub).verify(b"m", b"\xff" * 64) is False


# ------------------------------------------------------------------------------------------------
# sr25519 hotkeys


def test_hotkey_from_uri(alice: HotkeySigner) -> None:
    assert alice.ss58_address == ALICE_SS58
    assert alice.identity.kind is IdentityKind.SR25519
    assert alice.identity.display == ALICE_SS58
    assert str(alice.identity) == f"sr25519:{ALICE_SS58}"
    assert PeerIdentity.from_ss58(ALICE_SS58) == alice.identity


def test_sr25519_sign_verify_and_tamper(alice: HotkeySigner, bob: HotkeySigner) -> None:
    sig = alice.sign(b"transcript")
    assert len(sig) == 64
    assert alice.identity.verify(b"transcript", sig)
    assert not alice.identity.verify(b"transcripT", sig)
    assert not bob.identity.verify(b"transcript", sig)
    flipped = bytes([sig[0] ^ 1]) + sig[1:]
    assert not alice.identity.verify(b"transcript", flipped)
    # a public-only identity (as the peer sees it) verifies too
    public_only = PeerIdentity(IdentityKind.SR25519, alice.identity.public_key)
    assert public_only.verify(b"transcript", sig)


def test_wraps_a_keypair(alice: HotkeySigner) -> None:
    import bittensor_core

    kp = bittensor_core.Keypair.create_from_uri("//Alice", crypto_type=1)
    assert HotkeySigner(kp).identity == alice.identity


def test_refuses_a_public_only_or_ed25519_keypair() -> None:
    import bittensor_core

    with pytest.raises(IdentityError, match="cannot sign"):
        HotkeySigner(bittensor_core.Keypair(ss58_address=ALICE_SS58, crypto_type=1))
    with pytest.raises(IdentityError, match="sr25519"):
        HotkeySigner(bittensor_core.Keypair.create_from_uri("//Alice", crypto_type=0))


def test_from_ss58_rejects_garbage() -> None:
    with pytest.raises(ValueError):
        PeerIdentity.from_ss58("not-an-address")


def _write_wallet(root: Path, data: bytes, name: str = "w", hotkey: str = "h") -> Path:
    path = root / name / "hotkeys" / hotkey
    path.parent.mkdir(parents=True)
    path.write_bytes(data)
    path.chmod(0o600)
    return path


def test_from_wallet_loads_a_bittensor_hotkey(tmp_path: Path, alice: HotkeySigner) -> None:
    import bittensor_core

    kp = bittensor_core.Keypair.create_from_uri("//Alice", crypto_type=1)
    _write_wallet(tmp_path, bittensor_core.serialized_keypair_to_keyfile_data(kp))
    signer = HotkeySigner.from_wallet("w", "h", tmp_path)
    assert signer.identity == alice.identity
    assert alice.identity.verify(b"x", signer.sign(b"x"))


def test_from_wallet_missing_file(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="not found") as excinfo:
        HotkeySigner.from_wallet("nope", "default", tmp_path)
    assert str(tmp_path / "nope" / "hotkeys" / "default") in str(excinfo.value)


def test_from_wallet_encrypted_hotkey(tmp_path: Path) -> None:
    # bittensor's NaCl envelope: b"$NACL" + salt/nonce/ciphertext. Real encryption takes seconds
    # (argon2), and only the envelope matters here.
    path = _write_wallet(tmp_path, b"$NACL" + os.urandom(120))
    with pytest.raises(KeyFileError, match="encrypted") as excinfo:
        HotkeySigner.from_wallet("w", "h", tmp_path)
    assert str(path) in str(excinfo.value)


@pytest.mark.parametrize(
    "data",
    [b"garbage", b"{}", json.dumps({"ss58Address": ALICE_SS58}).encode()],
)
def test_from_wallet_unusable_hotkey(tmp_path: Path, data: bytes) -> None:
    _write_wallet(tmp_path, data)
    with pytest.raises(KeyFileError, match="hotkey file"):
        HotkeySigner.from_wallet("w", "h", tmp_path)


def test_identity_module_does_not_import_bittensor() -> None:
    code = (
        "import sys, byteleap.core.identity, byteleap.core.session; "
        "print(any(m == 'bittensor' or m.startswith(('bittensor.', 'bittensor_core')) "
        "for m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "False"
