"""The ``vm:`` settings: required image pin, sane network pool, errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from byteleap.core.config import ConfigError, load_config
from byteleap.worker.vm.config import DEFAULT_ISOLATED_RANGES, VmSettings

SHA = "ab" * 32
PIN = f"base_image: /b\nbase_image_sha256: {SHA}\n"


def load(tmp_path: Path, text: str) -> VmSettings:
    path = tmp_path / "vm.yaml"
    path.write_text(text)
    return load_config(path, VmSettings, env_prefix="TEST_VM", environ={})


def test_minimal_settings_and_defaults(tmp_path: Path) -> None:
    settings = load(tmp_path, f"base_image: /srv/images/base.qcow2\nbase_image_sha256: {SHA}\n")
    assert settings.domain_type == "kvm"
    assert settings.libvirt_uri == "qemu:///system"
    assert settings.vnc_localhost is False
    assert settings.firmware == "efi"
    assert str(settings.pool_network()) == "10.213.0.0/16"
    assert settings.ssh_port_count == 256
    assert tuple(settings.isolated_ranges) == DEFAULT_ISOLATED_RANGES


@pytest.mark.parametrize(
    ("extra", "key", "problem"),
    [
        ("", "base_image", "required"),
        ("base_image: /b.qcow2\n", "base_image_sha256", "required"),
        (f"base_image: relative.qcow2\nbase_image_sha256: {SHA}\n", "base_image", "match"),
        ("base_image: /b.qcow2\nbase_image_sha256: xyz\n", "base_image_sha256", "match"),
        (PIN + "subnet_pool: 10.1.0.0/24\n", "", "/16"),
        (PIN + "subnet_pool: 192.168.0.0/16\n", "", "10.0"),
        (PIN + "subnet_pool: nope\n", "", "IPv4 network"),
        (
            PIN + "ssh_port_first: 5000\nssh_port_last: 4000\n",
            "",
            "ssh_port_first",
        ),
        (PIN + "dns_servers: [dns.google]\n", "", "IPv4"),
        (PIN + "isolated_ranges: [10.0.0.1/8]\n", "", "IPv4"),
        (PIN + "domain_type: xen\n", "domain_type", "one of"),
        (PIN + "machine: pc-i440fx\n", "machine", "match"),
        (PIN + "vnc: true\n", "vnc", "unknown key"),
    ],
)
def test_bad_settings_name_the_problem(tmp_path: Path, extra: str, key: str, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, extra or "{}\n")
    assert problem in str(caught.value)
    if key:
        assert caught.value.key_path == key
