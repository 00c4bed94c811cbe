"""The cloud-init NoCloud seed of a leased VM: who may log in, and its network.

The guest gets exactly one account, ``renter``, reachable only with the renter's SSH key:

* ``lock_passwd: true`` and no ``chpasswd`` anywhere: no password exists, default or otherwise;
* ``ssh_pwauth: false``: sshd refuses passwords even if one were set later;
* ``disable_root: true``: root cannot log in over SSH;
* no ``default`` entry in ``users``: the image's stock account (``debian``, ``ubuntu``) is not
  created, so the renter's key is the only one in the guest;
* ``renter`` has passwordless sudo (the VM is the renter's machine for the lease);
* the QEMU guest agent is installed and enabled, so the host can see the guest is up.

The key is validated first (:func:`validate_ssh_public_key`): one line, no ``authorized_keys``
options, a type from a short list, RSA at least 3072 bits. It is re-serialised from the parsed
key, so what reaches the guest is exactly the key that was checked (the comment is dropped).

The network is static (network-config v2): the VM's address in the lease's /30, the host end as
its gateway, the configured resolvers. The files are written to an ISO with volume id ``cidata``
by ``genisoimage`` (argv, no shell) and attached to the VM as a read-only cdrom.
"""

from __future__ import annotations

import ipaddress
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import yaml
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_ssh_public_key,
)

from . import VmError, run_tool

__all__ = [
    "ALLOWED_KEY_TYPES",
    "MIN_RSA_BITS",
    "RENTER_USER",
    "InvalidSshKeyError",
    "SeedSpec",
    "render_seed",
    "validate_ssh_public_key",
    "write_seed_iso",
]

RENTER_USER: Final = "renter"
MIN_RSA_BITS: Final = 3072
MAX_KEY_CHARS: Final = 16384
_ECDSA_CURVES: Final[dict[str, type[ec.EllipticCurve]]] = {
    "ecdsa-sha2-nistp256": ec.SECP256R1,
    "ecdsa-sha2-nistp384": ec.SECP384R1,
    "ecdsa-sha2-nistp521": ec.SECP521R1,
}
ALLOWED_KEY_TYPES: Final = frozenset({"ssh-ed25519", "ssh-rsa", *_ECDSA_CURVES})
_BASE64: Final = re.compile(r"[A-Za-z0-9+/]+={0,2}")
_CONTROL: Final = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
SEED_FILES: Final = ("meta-data", "user-data", "network-config")


class InvalidSshKeyError(VmError):
    """The renter's SSH public key is not acceptable; the message says why (never the key)."""


def validate_ssh_public_key(text: str) -> str:
    """The key as ``<type> <base64>`` if acceptable; :class:`InvalidSshKeyError` otherwise."""
    if not isinstance(text, str):
        raise InvalidSshKeyError("the SSH public key must be a string")
    if len(text) > MAX_KEY_CHARS:
        raise InvalidSshKeyError(f"the SSH public key is longer than {MAX_KEY_CHARS} characters")
    line = text.strip(" \t")
    if line.endswith("\n"):  # as `cat id_ed25519.pub` gives it
        line = line[:-1].rstrip(" \t")
    if "\n" in line or "\r" in line:
        raise InvalidSshKeyError("the SSH public key must be a single line")
    if _CONTROL.search(line):
        raise InvalidSshKeyError("the SSH public key contains control characters")
    fields = line.split()
    if not fields:
        raise InvalidSshKeyError("the SSH public key is empty")
    key_type = fields[0]
    if key_type not in ALLOWED_KEY_TYPES:
        if any(field in ALLOWED_KEY_TYPES for field in fields[1:]) or "=" in key_type:
            raise InvalidSshKeyError(
                "authorized_keys options (command=, from=, ...) are not allowed before the key"
            )
        raise InvalidSshKeyError(
            f"unsupported SSH key type {key_type[:40]!r}; use one of "
            + ", ".join(sorted(ALLOWED_KEY_TYPES))
        )
    if len(fields) < 2 or not _BASE64.fullmatch(fields[1]):
        raise InvalidSshKeyError(f"the {key_type} key has no base64 key data")
    try:
        key = load_ssh_public_key(f"{key_type} {fields[1]}".encode("ascii"))
    except (ValueError, TypeError) as exc:
        raise InvalidSshKeyError(f"the {key_type} key does not parse: {exc}") from None
    if key_type == "ssh-ed25519":
        if not isinstance(key, ed25519.Ed25519PublicKey):
            raise InvalidSshKeyError("the key data is not an Ed25519 key")
    elif key_type == "ssh-rsa":
        if not isinstance(key, rsa.RSAPublicKey):
            raise InvalidSshKeyError("the key data is not an RSA key")
        if key.key_size < MIN_RSA_BITS:
            raise InvalidSshKeyError(
                f"RSA keys need at least {MIN_RSA_BITS} bits, this one has {key.key_size}"
            )
    else:
        curve = _ECDSA_CURVES[key_type]
        if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, curve):
            raise InvalidSshKeyError(f"the key data is not a {key_type} key")
    return key.public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH).decode("ascii")


@dataclass(frozen=True, kw_only=True)
class SeedSpec:
    """What the seed says: the lease, the renter's key, and the VM's static network."""

    lease_id: str
    ssh_public_key: str
    mac: str
    vm_interface: ipaddress.IPv4Interface
    gateway: ipaddress.IPv4Address
    dns_servers: Sequence[str]

    def __post_init__(self) -> None:
        if validate_ssh_public_key(self.ssh_public_key) != self.ssh_public_key:
            raise InvalidSshKeyError("pass the key through validate_ssh_public_key first")
        if self.gateway not in self.vm_interface.network:
            raise VmError(f"gateway {self.gateway} is outside {self.vm_interface.network}")


def _yaml(document: object) -> str:
    return yaml.safe_dump(document, sort_keys=False, default_flow_style=False)


def render_seed(spec: SeedSpec) -> dict[str, str]:
    """The seed files by name: ``meta-data``, ``user-data``, ``network-config``."""
    meta_data = {
        "instance-id": spec.lease_id,
        "local-hostname": f"lease-{spec.lease_id[:12]}",
    }
    user_data = {
        "users": [
            {
                "name": RENTER_USER,
                "gecos": "ByteLeap renter",
                "shell": "/bin/bash",
                "lock_passwd": True,
                "sudo": "ALL=(ALL) NOPASSWD:ALL",
                "ssh_authorized_keys": [spec.ssh_public_key],
            }
        ],
        "ssh_pwauth": False,
        "disable_root": True,
        "packages": ["qemu-guest-agent"],
        "runcmd": [["systemctl", "enable", "--now", "qemu-guest-agent"]],
    }
    network_config = {
        "version": 2,
        "ethernets": {
            "lease0": {
                "match": {"macaddress": spec.mac},
                "addresses": [str(spec.vm_interface)],
                "routes": [{"to": "0.0.0.0/0", "via": str(spec.gateway)}],
                "nameservers": {"addresses": list(spec.dns_servers)},
            }
        },
    }
    return {
        "meta-data": _yaml(meta_data),
        "user-data": "#cloud-config\n" + _yaml(user_data),
        "network-config": _yaml(network_config),
    }


def write_seed_iso(spec: SeedSpec, iso_path: Path, *, tool_timeout_s: float) -> None:
    """The NoCloud ISO (volume id ``cidata``) for ``spec`` at ``iso_path`` (mode 0600)."""
    if iso_path.exists() or iso_path.is_symlink():
        raise VmError(f"seed {iso_path} already exists")
    files = render_seed(spec)
    with tempfile.TemporaryDirectory(prefix="byteleap-seed-") as tmp:
        paths = []
        for name in SEED_FILES:
            path = Path(tmp) / name
            path.write_text(files[name], encoding="utf-8")
            paths.append(str(path))
        run_tool(
            [
                "genisoimage",
                "-quiet",
                "-output",
                str(iso_path),
                "-volid",
                "cidata",
                "-joliet",
                "-rock",
                "-input-charset",
                "utf-8",
                *paths,
            ],
            what=f"writing seed {iso_path}",
            timeout_s=tool_timeout_s,
        )
    try:
        iso_path.chmod(0o600)
    except OSError as exc:
        raise VmError(f"cannot restrict {iso_path}: {exc.strerror}") from None
