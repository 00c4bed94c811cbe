"""Base image verification, overlays (qemu-img) and the seed ISO (genisoimage), for real."""

from __future__ import annotations

import hashlib
import ipaddress
import json
import subprocess
from pathlib import Path

import pytest
import yaml

from byteleap.worker.vm import VmError
from byteleap.worker.vm.disks import (
    GIB,
    BaseImage,
    VerifiedBase,
    create_overlay,
    make_lease_dir,
    remove_lease_dir,
)
from byteleap.worker.vm.seed import SeedSpec, validate_ssh_public_key, write_seed_iso
from tests.support.libvirt_fixtures import ed25519_key, make_base_image

LEASE = "0123456789abcdef0123456789abcdef"


def base_image(tmp_path: Path, digest: str | None = None) -> BaseImage:
    path = tmp_path / "base.qcow2"
    real = make_base_image(path) if not path.exists() else None
    return BaseImage(
        path,
        digest or real or "",
        verdict_file=tmp_path / "state" / "verdict.json",
        tool_timeout_s=30,
    )


def test_verified_once_then_trusted_until_the_file_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = base_image(tmp_path)
    verified = image.verify()
    assert verified.virtual_size == 64 * 1024 * 1024
    verdict = tmp_path / "state" / "verdict.json"
    assert verdict.stat().st_mode & 0o777 == 0o600

    # A new process (fresh object) trusts the stored verdict without hashing again.
    again = BaseImage(image.path, image.sha256, verdict_file=verdict, tool_timeout_s=30)
    hashed: list[int] = []
    original = BaseImage._hash

    def counting(self: BaseImage) -> str:
        hashed.append(1)
        return original(self)

    monkeypatch.setattr(BaseImage, "_hash", counting)
    assert again.verify() == verified
    assert hashed == []

    # Tampering changes size/mtime: hashed again, and refused.
    with image.path.open("ab") as f:
        f.write(b"tampered")
    with pytest.raises(VmError, match="refusing to boot it"):
        again.verify()
    assert hashed == [1]


def test_wrong_hash_is_refused(tmp_path: Path) -> None:
    make_base_image(tmp_path / "base.qcow2")
    image = base_image(tmp_path, digest="00" * 32)
    with pytest.raises(VmError, match=r"has SHA-256 [0-9a-f]{64}, not the configured"):
        image.verify()
    assert not (tmp_path / "state" / "verdict.json").exists()


def test_missing_raw_and_chained_images_are_refused(tmp_path: Path) -> None:
    missing = BaseImage(
        tmp_path / "nope.qcow2", "00" * 32, verdict_file=tmp_path / "v", tool_timeout_s=30
    )
    with pytest.raises(VmError, match="does not exist"):
        missing.verify()

    raw = tmp_path / "raw.img"
    raw.write_bytes(b"\0" * 65536)
    digest = hashlib.sha256(raw.read_bytes()).hexdigest()
    with pytest.raises(VmError, match="qemu-img"):
        BaseImage(raw, digest, verdict_file=tmp_path / "v", tool_timeout_s=30).verify()

    # A "base" that itself has a backing file could pull any readable file into the guest.
    make_base_image(tmp_path / "real.qcow2")
    chained = tmp_path / "chained.qcow2"
    subprocess.run(
        [
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "qcow2",
            "-b",
            str(tmp_path / "real.qcow2"),
            str(chained),
        ],
        check=True,
    )
    digest = hashlib.sha256(chained.read_bytes()).hexdigest()
    with pytest.raises(VmError, match="has a backing file of its own"):
        BaseImage(chained, digest, verdict_file=tmp_path / "v", tool_timeout_s=30).verify()


def test_overlay_is_backed_by_the_base(tmp_path: Path) -> None:
    verified = base_image(tmp_path).verify()
    lease_dir = make_lease_dir(tmp_path / "vms", LEASE)
    assert lease_dir.stat().st_mode & 0o777 == 0o711
    overlay = lease_dir / "disk.qcow2"
    create_overlay(verified, overlay, 2, tool_timeout_s=30)
    info = json.loads(
        subprocess.run(
            ["qemu-img", "info", "--output=json", str(overlay)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    )
    assert info["format"] == "qcow2"
    assert info["virtual-size"] == 2 * GIB
    assert info["backing-filename"] == str(verified.path.absolute())
    assert info["backing-filename-format"] == "qcow2"
    with pytest.raises(VmError, match="already exists"):
        create_overlay(verified, overlay, 2, tool_timeout_s=30)
    with pytest.raises(VmError, match="already exists"):
        make_lease_dir(tmp_path / "vms", LEASE)
    remove_lease_dir(lease_dir)
    assert not lease_dir.exists()
    remove_lease_dir(lease_dir)  # idempotent


def test_overlay_sizes_are_validated(tmp_path: Path) -> None:
    big_base = VerifiedBase(tmp_path / "base.qcow2", 3 * GIB)
    with pytest.raises(VmError, match="smaller than the base image"):
        create_overlay(big_base, tmp_path / "o.qcow2", 2, tool_timeout_s=30)
    for size in (0, 65537):
        with pytest.raises(VmError, match=r"within 1\.\.65536"):
            create_overlay(big_base, tmp_path / "o.qcow2", size, tool_timeout_s=30)
    assert not (tmp_path / "o.qcow2").exists()


def test_remove_lease_dir_does_not_follow_folders(tmp_path: Path) -> None:
    lease_dir = make_lease_dir(tmp_path / "vms", LEASE)
    (lease_dir / "nested").mkdir()
    with pytest.raises(VmError, match="unexpected folder nested"):
        remove_lease_dir(lease_dir)


def _iso_file(iso: Path, name: str) -> str:
    return subprocess.run(
        ["isoinfo", "-J", "-i", str(iso), "-x", f"/{name}"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout


def test_seed_iso_is_a_nocloud_volume(tmp_path: Path) -> None:
    key = validate_ssh_public_key(ed25519_key())
    spec = SeedSpec(
        lease_id=LEASE,
        ssh_public_key=key,
        mac="52:54:00:12:34:56",
        vm_interface=ipaddress.IPv4Interface("10.213.0.2/30"),
        gateway=ipaddress.IPv4Address("10.213.0.1"),
        dns_servers=("1.1.1.1",),
    )
    iso = tmp_path / "seed.iso"
    write_seed_iso(spec, iso, tool_timeout_s=30)
    assert iso.stat().st_mode & 0o777 == 0o600
    header = subprocess.run(
        ["isoinfo", "-d", "-i", str(iso)], check=True, capture_output=True, text=True
    ).stdout
    assert "Volume id: cidata" in header
    user_data = yaml.safe_load(_iso_file(iso, "user-data"))
    assert user_data["users"][0]["ssh_authorized_keys"] == [key]
    assert yaml.safe_load(_iso_file(iso, "meta-data"))["instance-id"] == LEASE
    assert yaml.safe_load(_iso_file(iso, "network-config"))["version"] == 2
    with pytest.raises(VmError, match="already exists"):
        write_seed_iso(spec, iso, tool_timeout_s=30)
