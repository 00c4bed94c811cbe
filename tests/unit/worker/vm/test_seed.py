"""The renter's SSH key and the cloud-init seed: one key, no password anywhere, root disabled."""

from __future__ import annotations

import base64
import ipaddress
import struct

import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric import ec

from byteleap.worker.vm.seed import (
    RENTER_USER,
    InvalidSshKeyError,
    SeedSpec,
    render_seed,
    validate_ssh_public_key,
)
from tests.support.libvirt_fixtures import ecdsa_key, ed25519_key, rsa_key

LEASE = "0123456789abcdef0123456789abcdef"


@pytest.fixture(scope="module")
def rsa3072() -> str:
    return rsa_key(3072)


@pytest.fixture(scope="module")
def rsa2048() -> str:
    return rsa_key(2048)


def seed_spec(key: str) -> SeedSpec:
    return SeedSpec(
        lease_id=LEASE,
        ssh_public_key=validate_ssh_public_key(key),
        mac="52:54:00:12:34:56",
        vm_interface=ipaddress.IPv4Interface("10.213.3.2/30"),
        gateway=ipaddress.IPv4Address("10.213.3.1"),
        dns_servers=("1.1.1.1", "9.9.9.9"),
    )


# --------------------------------------------------------------------------------------------
# Keys


def test_accepted_key_types_are_normalised(rsa3072: str) -> None:
    for key in (
        ed25519_key(),
        rsa3072,
        ecdsa_key(ec.SECP256R1()),
        ecdsa_key(ec.SECP384R1()),
        ecdsa_key(ec.SECP521R1()),
    ):
        normalised = validate_ssh_public_key(key + "\n")
        assert normalised.split()[:2] == key.split()[:2]
        assert len(normalised.split()) == 2  # the comment is dropped


def test_comment_is_dropped_and_surrounding_blanks_tolerated() -> None:
    key = ed25519_key("alice@example $(reboot)")
    normalised = validate_ssh_public_key("  " + key + "  \n")
    assert "alice" not in normalised and "reboot" not in normalised


def test_short_rsa_is_refused(rsa2048: str) -> None:
    with pytest.raises(InvalidSshKeyError, match="at least 3072 bits, this one has 2048"):
        validate_ssh_public_key(rsa2048)


def _blob(*parts: bytes) -> str:
    return base64.b64encode(b"".join(struct.pack(">I", len(p)) + p for p in parts)).decode()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: "ssh-dss " + _blob(b"ssh-dss", b"p", b"q", b"g", b"y"), "type 'ssh-dss'"),
        (
            lambda: "sk-ssh-ed25519@openssh.com " + _blob(b"sk-ssh-ed25519@openssh.com"),
            "unsupported",
        ),
        (lambda: "ssh-ed25519-cert-v01@openssh.com AAAA", "unsupported"),
        (lambda: 'command="/bin/sh" ' + ed25519_key(), "options"),
        (lambda: "no-pty,no-agent-forwarding " + ed25519_key(), "options"),
        (lambda: 'from="10.0.0.1" ' + ed25519_key(), "options"),
        (lambda: ed25519_key() + "\n" + ed25519_key(), "single line"),
        (lambda: ed25519_key() + "\r", "single line"),
        (lambda: ed25519_key().replace(" ", "\x00", 1), "unsupported|control"),
        (lambda: "ssh-ed25519", "no base64"),
        (lambda: "ssh-ed25519 not*base64", "no base64"),
        (lambda: "ssh-ed25519 " + _blob(b"ssh-ed25519", b"short"), "does not parse"),
        (lambda: "", "empty"),
        (lambda: "   \n", "empty"),
        (lambda: "ssh-ed25519 " + "A" * 20000, "longer than"),
    ],
)
def test_bad_keys_are_refused_with_a_reason(make: object, message: str) -> None:
    assert callable(make)
    with pytest.raises(InvalidSshKeyError, match=message):
        validate_ssh_public_key(make())


def test_blob_of_another_type_is_refused() -> None:
    # An Ed25519 blob announced as ssh-rsa, and an RSA blob announced as ssh-ed25519.
    ed_blob = ed25519_key().split()[1]
    with pytest.raises(InvalidSshKeyError):
        validate_ssh_public_key("ssh-rsa " + ed_blob)
    p256_blob = ecdsa_key(ec.SECP256R1()).split()[1]
    with pytest.raises(InvalidSshKeyError):
        validate_ssh_public_key("ecdsa-sha2-nistp384 " + p256_blob)


def test_non_string_key() -> None:
    with pytest.raises(InvalidSshKeyError, match="string"):
        validate_ssh_public_key(b"ssh-ed25519 AAAA")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# Seed


def test_user_data_grants_only_the_renter_key() -> None:
    key = ed25519_key()
    files = render_seed(seed_spec(key))
    assert files["user-data"].startswith("#cloud-config\n")
    user_data = yaml.safe_load(files["user-data"])
    (user,) = user_data["users"]  # no "default": the image's stock account is not created
    assert user["name"] == RENTER_USER
    assert user["ssh_authorized_keys"] == [validate_ssh_public_key(key)]
    assert user["lock_passwd"] is True
    assert user["sudo"] == "ALL=(ALL) NOPASSWD:ALL"
    assert user_data["ssh_pwauth"] is False
    assert user_data["disable_root"] is True
    assert "qemu-guest-agent" in user_data["packages"]
    assert ["systemctl", "enable", "--now", "qemu-guest-agent"] in user_data["runcmd"]


def test_no_password_anywhere_in_the_seed() -> None:
    files = render_seed(seed_spec(ed25519_key()))
    user_data = yaml.safe_load(files["user-data"])
    assert "chpasswd" not in user_data and "password" not in user_data
    for key in ("passwd", "hashed_passwd", "plain_text_passwd"):
        assert key not in user_data["users"][0]
    for name, text in files.items():
        lowered = text.lower()
        # The only mentions of a password lock it or waive it for sudo.
        for allowed in ("lock_passwd: true", "nopasswd:all"):
            lowered = lowered.replace(allowed, "")
        assert "passw" not in lowered, name
        assert "root" not in lowered.replace("disable_root: true", ""), name


def test_meta_data_and_network_config() -> None:
    files = render_seed(seed_spec(ed25519_key()))
    meta = yaml.safe_load(files["meta-data"])
    assert meta["instance-id"] == LEASE
    network = yaml.safe_load(files["network-config"])
    assert network["version"] == 2
    (nic,) = network["ethernets"].values()
    assert nic["match"] == {"macaddress": "52:54:00:12:34:56"}
    assert nic["addresses"] == ["10.213.3.2/30"]
    assert nic["routes"] == [{"to": "0.0.0.0/0", "via": "10.213.3.1"}]
    assert nic["nameservers"] == {"addresses": ["1.1.1.1", "9.9.9.9"]}
    assert "dhcp4" not in nic


def test_seed_spec_refuses_unvalidated_keys() -> None:
    with pytest.raises(InvalidSshKeyError):
        SeedSpec(
            lease_id=LEASE,
            ssh_public_key=ed25519_key("with comment"),
            mac="52:54:00:12:34:56",
            vm_interface=ipaddress.IPv4Interface("10.213.3.2/30"),
            gateway=ipaddress.IPv4Address("10.213.3.1"),
            dns_servers=("1.1.1.1",),
        )
