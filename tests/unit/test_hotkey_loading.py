"""load_hotkey: the one way miners and validators find their hotkey.

Order: dev URI > systemd credential ``$CREDENTIALS_DIRECTORY/hotkey`` > wallet layout. Keyfiles
are written the way btcli writes them (bittensor_core's keyfile serialisation).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from byteleap.core.identity import (
    HotkeySigner,
    IdentityError,
    KeyFileError,
    load_hotkey,
    wallet_hotkey_path,
)

ALICE = HotkeySigner.from_uri("//Alice").ss58_address
BOB = HotkeySigner.from_uri("//Bob").ss58_address


def keyfile_bytes(uri: str) -> bytes:
    import bittensor_core

    keypair = bittensor_core.Keypair.create_from_uri(uri, crypto_type=1)
    return bytes(bittensor_core.serialized_keypair_to_keyfile_data(keypair))


def write_keyfile(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.chmod(0o600)
    return path


@pytest.fixture
def wallets(tmp_path: Path) -> Path:
    root = tmp_path / "wallets"
    write_keyfile(root / "miner" / "hotkeys" / "hk", keyfile_bytes("//Alice"))
    return root


@pytest.fixture
def credentials(tmp_path: Path) -> Path:
    directory = tmp_path / "credentials"
    write_keyfile(directory / "hotkey", keyfile_bytes("//Bob"))
    return directory


def test_the_wallet_layout_is_the_default_source(wallets: Path) -> None:
    loaded = load_hotkey(wallet_name="miner", wallet_hotkey="hk", wallet_path=wallets, environ={})

    assert loaded.signer.ss58_address == ALICE
    assert loaded.source == "wallet"
    assert loaded.location == str(wallets / "miner" / "hotkeys" / "hk")
    assert loaded.describe() == f"wallet {wallets / 'miner' / 'hotkeys' / 'hk'}"


def test_a_systemd_credential_wins_over_the_wallet(wallets: Path, credentials: Path) -> None:
    loaded = load_hotkey(
        wallet_name="miner",
        wallet_hotkey="hk",
        wallet_path=wallets,
        environ={"CREDENTIALS_DIRECTORY": str(credentials)},
    )

    assert loaded.signer.ss58_address == BOB
    assert (loaded.source, loaded.location) == ("systemd credential", str(credentials / "hotkey"))


def test_a_dev_uri_wins_over_everything(wallets: Path, credentials: Path) -> None:
    loaded = load_hotkey(
        uri="//Charlie",
        wallet_name="miner",
        wallet_hotkey="hk",
        wallet_path=wallets,
        environ={"CREDENTIALS_DIRECTORY": str(credentials)},
    )

    assert loaded.signer.ss58_address == HotkeySigner.from_uri("//Charlie").ss58_address
    assert (loaded.source, loaded.location) == ("dev URI", "//Charlie")


def test_a_credentials_directory_without_a_hotkey_falls_back_to_the_wallet(
    wallets: Path, tmp_path: Path
) -> None:
    # The unit may load other credentials (enrollment-secret) but not the hotkey.
    directory = tmp_path / "other-credentials"
    directory.mkdir()
    (directory / "enrollment-secret").write_text("x" * 32)

    loaded = load_hotkey(
        wallet_name="miner",
        wallet_hotkey="hk",
        wallet_path=wallets,
        environ={"CREDENTIALS_DIRECTORY": str(directory)},
    )

    assert loaded.source == "wallet"


def test_a_missing_hotkey_names_the_file_and_both_ways_to_provide_it(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError) as caught:
        load_hotkey(wallet_name="absent", wallet_hotkey="hk", wallet_path=tmp_path, environ={})

    message = str(caught.value)
    assert str(tmp_path / "absent" / "hotkeys" / "hk") in message
    assert "not found" in message
    assert "btcli wallet new_hotkey" in message
    assert "systemd credential 'hotkey'" in message


def test_an_encrypted_credential_is_refused_by_name(tmp_path: Path) -> None:
    directory = tmp_path / "credentials"
    path = write_keyfile(directory / "hotkey", b"$NACL" + os.urandom(120))

    with pytest.raises(KeyFileError, match="encrypted") as caught:
        load_hotkey(environ={"CREDENTIALS_DIRECTORY": str(directory)})

    assert str(path) in str(caught.value)


@pytest.mark.parametrize(
    "data",
    [b"not json", b"{}", json.dumps({"ss58Address": ALICE}).encode(), b"x" * (64 * 1024 + 1)],
    ids=["garbage", "empty-object", "public-only", "oversized"],
)
def test_a_malformed_credential_is_refused_without_showing_its_content(
    tmp_path: Path, data: bytes
) -> None:
    directory = tmp_path / "credentials"
    path = write_keyfile(directory / "hotkey", data)

    with pytest.raises(KeyFileError) as caught:
        load_hotkey(environ={"CREDENTIALS_DIRECTORY": str(directory)})

    message = str(caught.value)
    assert str(path) in message
    assert "not json" not in message and ALICE not in message


def test_no_description_shows_key_material(tmp_path: Path) -> None:
    import bittensor_core

    keypair = bittensor_core.Keypair.create_from_mnemonic(
        bittensor_core.Keypair.generate_mnemonic(12), crypto_type=1
    )
    data = bytes(bittensor_core.serialized_keypair_to_keyfile_data(keypair))
    write_keyfile(tmp_path / "w" / "hotkeys" / "h", data)
    stored = json.loads(data)
    secrets = [stored["privateKey"], stored["secretSeed"], stored["secretPhrase"]]
    secrets += [s.removeprefix("0x") for s in secrets[:2]]

    loaded = load_hotkey(wallet_name="w", wallet_hotkey="h", wallet_path=tmp_path, environ={})

    assert loaded.signer.ss58_address == stored["ss58Address"]
    for text in (repr(loaded), loaded.describe(), repr(loaded.signer)):
        assert not any(secret in text for secret in secrets)


def test_a_bad_dev_uri_is_an_identity_error() -> None:
    with pytest.raises(IdentityError, match="invalid key URI"):
        load_hotkey(uri="garbage", environ={})


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "nul\x00"])
def test_wallet_names_cannot_escape_the_wallet_directory(tmp_path: Path, name: str) -> None:
    with pytest.raises(KeyFileError, match="not a plain file name"):
        wallet_hotkey_path(name, "default", tmp_path)
    with pytest.raises(KeyFileError, match="not a plain file name"):
        wallet_hotkey_path("default", name, tmp_path)
