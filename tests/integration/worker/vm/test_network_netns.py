"""The real lease network (netlink + nftables) inside throw-away network namespaces.

Besides reading the rules back, packets go through them: "VMs" are namespaces on the lease
bridges, a "client" namespace sits on the host's uplink, and TCP connections show what the
rules allow (forwarded SSH in, masqueraded traffic out) and what they stop (lease to lease,
lease to host).
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from byteleap.worker.vm import VmError
from byteleap.worker.vm.config import DEFAULT_ISOLATED_RANGES
from byteleap.worker.vm.manager import LeaseVmManager, LeaseVmSpec
from byteleap.worker.vm.network import BASE_COMMENT, LeaseAddressing, LeaseNetwork
from tests.support.libvirt_fixtures import (
    GPU_PLAIN,
    FakeGpuBinder,
    LibvirtHost,
    ed25519_key,
    vm_settings,
    write_node_fixture,
)

pytestmark = pytest.mark.system

POOL = ipaddress.IPv4Network("10.213.0.0/16")
ISOLATED = [ipaddress.IPv4Network(n) for n in DEFAULT_ISOLATED_RANGES]
LEASE_A = "aa" * 16
LEASE_B = "bb" * 16
RULES_PER_LEASE = 8


def _require_netns() -> None:
    if os.geteuid() != 0:
        pytest.skip("network namespaces, bridges and nftables need root")
    for tool in ("ip", "nft", "sysctl"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=check, capture_output=True, text=True, timeout=30)


def new_netns(prefix: str) -> str:
    name = f"{prefix}-{secrets.token_hex(3)}"
    sh("ip", "netns", "add", name)
    sh("ip", "-n", name, "link", "set", "lo", "up")
    return name


@pytest.fixture
def host_ns() -> Iterator[str]:
    _require_netns()
    names = [new_netns("blhost")]
    sh("ip", "netns", "exec", names[0], "sysctl", "-qw", "net.ipv4.ip_forward=1")
    yield names[0]
    for name in names:
        sh("ip", "netns", "del", name, check=False)


@pytest.fixture
def extra_ns() -> Iterator[list[str]]:
    """More namespaces (VMs, clients); deleted after the test."""
    names: list[str] = []
    yield names
    for name in names:
        sh("ip", "netns", "del", name, check=False)


def ruleset(ns: str) -> list[dict[str, Any]]:
    listing = sh("ip", "netns", "exec", ns, "nft", "-j", "list", "ruleset").stdout
    return [item["rule"] for item in json.loads(listing)["nftables"] if "rule" in item]


def comments(ns: str) -> list[str]:
    return [rule.get("comment", "") for rule in ruleset(ns)]


def addresses(ns: str, ifname: str) -> list[str]:
    out = sh("ip", "-n", ns, "-j", "addr", "show", "dev", ifname, check=False)
    if out.returncode != 0:
        return []
    (link,) = json.loads(out.stdout)
    assert "UP" in link["flags"]
    return [f"{a['local']}/{a['prefixlen']}" for a in link["addr_info"] if a["family"] == "inet"]


def lease(lease_id: str, slot: int, port: int) -> LeaseAddressing:
    return LeaseAddressing(lease_id, slot, port, POOL)


def test_setup_creates_bridge_address_and_rules(host_ns: str) -> None:
    network = LeaseNetwork(POOL, ISOLATED, netns=host_ns)
    network.setup(lease(LEASE_A, 0, 42200))
    network.setup(lease(LEASE_B, 1, 42201))

    assert addresses(host_ns, "blbr0") == ["10.213.0.1/30"]
    assert addresses(host_ns, "blbr1") == ["10.213.1.1/30"]
    found = comments(host_ns)
    assert found.count(f"lease:{LEASE_A}") == RULES_PER_LEASE
    assert found.count(f"lease:{LEASE_B}") == RULES_PER_LEASE
    assert found.count(BASE_COMMENT) == 2  # forward and input, once

    text = sh("ip", "netns", "exec", host_ns, "nft", "list", "table", "inet", "byteleap").stdout
    assert "tcp dport 42200 dnat ip to 10.213.0.2:22" in text
    assert "tcp dport 42201 dnat ip to 10.213.1.2:22" in text
    assert 'ip saddr 10.213.0.0/30 oifname != "blbr0" masquerade' in text
    assert 'iifname "blbr0" ip saddr != 10.213.0.2 drop' in text
    assert 'iifname "blbr0" ip daddr { 10.0.0.0/8, 100.64.0.0/10, 169.254.0.0/16,' in text
    assert 'oifname "blbr0" drop' in text

    inventory = network.inventory()
    assert inventory.rule_lease_ids == {LEASE_A, LEASE_B}
    assert inventory.bridge_slots == {0, 1}


def test_setup_is_idempotent_and_repairs(host_ns: str) -> None:
    network = LeaseNetwork(POOL, ISOLATED, netns=host_ns)
    addr = lease(LEASE_A, 0, 42200)
    network.setup(addr)
    sh("ip", "-n", host_ns, "addr", "add", "10.99.0.1/24", "dev", "blbr0")  # a stray address
    first = [r for r in ruleset(host_ns) if r.get("comment") == f"lease:{LEASE_A}"]
    network.setup(addr)
    network.setup(addr)
    again = [r for r in ruleset(host_ns) if r.get("comment") == f"lease:{LEASE_A}"]
    strip = [{k: v for k, v in r.items() if k != "handle"} for r in first]
    assert [{k: v for k, v in r.items() if k != "handle"} for r in again] == strip
    assert comments(host_ns).count(BASE_COMMENT) == 2
    assert addresses(host_ns, "blbr0") == ["10.213.0.1/30"]


def test_teardown_removes_only_that_lease(host_ns: str) -> None:
    network = LeaseNetwork(POOL, ISOLATED, netns=host_ns)
    network.setup(lease(LEASE_A, 0, 42200))
    network.setup(lease(LEASE_B, 1, 42201))
    network.teardown(LEASE_A, 0)
    assert f"lease:{LEASE_A}" not in comments(host_ns)
    assert comments(host_ns).count(f"lease:{LEASE_B}") == RULES_PER_LEASE
    assert addresses(host_ns, "blbr0") == []
    assert addresses(host_ns, "blbr1") == ["10.213.1.1/30"]
    network.teardown(LEASE_A, 0)  # again: nothing left to do, no error
    network.teardown(None, 9)
    assert network.inventory().rule_lease_ids == {LEASE_B}


def test_teardown_on_a_clean_host_is_a_no_op(host_ns: str) -> None:
    network = LeaseNetwork(POOL, ISOLATED, netns=host_ns)
    network.teardown(LEASE_A, 0)
    assert network.inventory().rule_lease_ids == frozenset()


def test_forwarding_off_is_refused(host_ns: str) -> None:
    sh("ip", "netns", "exec", host_ns, "sysctl", "-qw", "net.ipv4.ip_forward=0")
    network = LeaseNetwork(POOL, ISOLATED, netns=host_ns)
    with pytest.raises(VmError, match=r"net.ipv4.ip_forward is 0 in network namespace"):
        network.setup(lease(LEASE_A, 0, 42200))


def test_a_foreign_link_named_like_a_bridge_is_not_touched(host_ns: str) -> None:
    sh("ip", "-n", host_ns, "link", "add", "blbr0", "type", "veth", "peer", "name", "other")
    network = LeaseNetwork(POOL, ISOLATED, netns=host_ns)
    with pytest.raises(VmError, match=r"blbr0 exists .* but is a veth"):
        network.setup(lease(LEASE_A, 0, 42200))
    with pytest.raises(VmError, match="is a veth, not our bridge"):
        network.teardown(None, 0)


# --------------------------------------------------------------------------------------------
# Packets

SERVER = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen()
print("ready", flush=True)
while True:
    conn, peer = s.accept()
    conn.sendall(f"{sys.argv[2]} sees {peer[0]}".encode())
    conn.close()
"""

CLIENT = """
import socket, sys
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1.0) as c:
        print(c.recv(200).decode())
except OSError as exc:
    print("blocked", type(exc).__name__)
"""


class Servers:
    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[str]] = []

    def start(self, ns: str, port: int, name: str) -> None:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-c", SERVER, str(port), name],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        self.procs.append(proc)

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
            proc.wait(timeout=5)


def connect(ns: str, address: str, port: int) -> str:
    return sh("ip", "netns", "exec", ns, sys.executable, "-c", CLIENT, address, str(port)).stdout


def plug_vm(host: str, vm: str, addr: LeaseAddressing) -> None:
    """A namespace standing in for the VM: one veth end on the lease bridge."""
    tap = f"tap{addr.slot}"
    sh("ip", "-n", vm, "link", "add", "eth0", "type", "veth", "peer", "name", tap, "netns", host)
    sh("ip", "-n", host, "link", "set", tap, "master", addr.bridge, "up")
    sh("ip", "-n", vm, "addr", "add", str(addr.vm_interface), "dev", "eth0")
    sh("ip", "-n", vm, "link", "set", "eth0", "up")
    sh("ip", "-n", vm, "route", "add", "default", "via", str(addr.gateway))


@pytest.mark.slow
def test_packets_follow_the_rules(host_ns: str, extra_ns: list[str]) -> None:
    vm_a, vm_b, client = new_netns("blvma"), new_netns("blvmb"), new_netns("blcli")
    extra_ns.extend([vm_a, vm_b, client])
    network = LeaseNetwork(POOL, ISOLATED, netns=host_ns)
    a, b = lease(LEASE_A, 0, 42200), lease(LEASE_B, 1, 42201)
    network.setup(a)
    network.setup(b)
    plug_vm(host_ns, vm_a, a)
    plug_vm(host_ns, vm_b, b)
    # The host's uplink, with a client out on the "internet" (TEST-NET-1).
    sh(
        "ip",
        "-n",
        client,
        "link",
        "add",
        "eth0",
        "type",
        "veth",
        "peer",
        "name",
        "uplink",
        "netns",
        host_ns,
    )
    sh("ip", "-n", host_ns, "addr", "add", "192.0.2.1/24", "dev", "uplink")
    sh("ip", "-n", host_ns, "link", "set", "uplink", "up")
    sh("ip", "-n", client, "addr", "add", "192.0.2.2/24", "dev", "eth0")
    sh("ip", "-n", client, "link", "set", "eth0", "up")
    sh("ip", "-n", client, "route", "add", "default", "via", "192.0.2.1")
    time.sleep(0.2)  # veth carrier

    servers = Servers()
    try:
        servers.start(vm_a, 22, "vm-a")
        servers.start(vm_b, 22, "vm-b")
        servers.start(host_ns, 9999, "host")
        servers.start(client, 8080, "client")

        # The renter reaches each VM's sshd through the host's port for that lease.
        assert connect(client, "192.0.2.1", 42200).strip() == "vm-a sees 192.0.2.2"
        assert connect(client, "192.0.2.1", 42201).strip() == "vm-b sees 192.0.2.2"
        # The VM reaches the internet, masqueraded behind the host's address.
        assert connect(vm_a, "192.0.2.2", 8080).strip() == "client sees 192.0.2.1"
        # But not another lease, not the host, not another port of another VM.
        assert connect(vm_a, "10.213.1.2", 22).startswith("blocked")
        assert connect(vm_a, "10.213.0.1", 9999).startswith("blocked")
        assert connect(vm_a, "192.0.2.1", 9999).startswith("blocked")
        assert connect(client, "10.213.0.2", 22).startswith("blocked")  # no direct route in
        # The host's service itself works (the blocks above are the rules, not a dead server).
        assert connect(client, "192.0.2.1", 9999).strip() == "host sees 192.0.2.2"

        network.teardown(LEASE_A, 0)
        assert connect(client, "192.0.2.1", 42200).startswith("blocked")
        assert connect(client, "192.0.2.1", 42201).strip() == "vm-b sees 192.0.2.2"
    finally:
        servers.stop()


# --------------------------------------------------------------------------------------------
# Manager + real network


def test_manager_lifecycle_and_recovery_with_the_real_network(host_ns: str, tmp_path: Path) -> None:
    import asyncio

    host = LibvirtHost(write_node_fixture(tmp_path / "node.xml"))
    settings = vm_settings(tmp_path)
    network = LeaseNetwork(POOL, ISOLATED, netns=host_ns)

    def manager() -> LeaseVmManager:
        return LeaseVmManager(
            host.uri,
            settings,
            FakeGpuBinder(),
            state_dir=tmp_path / "st",
            network=network,
            open_connection=host.open,
        )

    async def scenario() -> None:
        first = manager()
        info = await first.start(
            LeaseVmSpec(
                lease_id=LEASE_A, gpus=(GPU_PLAIN,), ssh_public_key=ed25519_key(), disk_gib=1
            )
        )
        assert addresses(host_ns, info.bridge) == ["10.213.0.1/30"]
        assert comments(host_ns).count(f"lease:{LEASE_A}") == RULES_PER_LEASE
        # Crash leftovers without state: rules and a bridge of a lease nobody knows.
        # (netlink calls run in a thread, as the manager runs them: never on the loop)
        await asyncio.to_thread(network.setup, lease(LEASE_B, 5, 42299))
        report = await manager().recover(active_lease_ids=[LEASE_A])
        assert report.kept == (LEASE_A,) and report.removed == (LEASE_B,)
        assert f"lease:{LEASE_B}" not in comments(host_ns)
        assert addresses(host_ns, "blbr5") == []
        assert await first.stop(LEASE_A)
        assert not [c for c in comments(host_ns) if c.startswith("lease:")]
        assert (await asyncio.to_thread(network.inventory)).bridge_slots == frozenset()

    try:
        asyncio.run(scenario())
    finally:
        host.drop()
