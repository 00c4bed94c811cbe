"""Lease network allocation and the nftables JSON of a lease (no kernel involved)."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from byteleap.worker.vm import VmError
from byteleap.worker.vm.network import (
    BASE_COMMENT,
    MAX_SLOTS,
    LeaseAddressing,
    LeaseNetwork,
    allocate_port,
    allocate_slot,
    base_commands,
    base_rule_commands,
    lease_rule_commands,
)

LEASE = "0123456789abcdef0123456789abcdef"
POOL = ipaddress.IPv4Network("10.213.0.0/16")
ISOLATED = [ipaddress.IPv4Network(n) for n in ("10.0.0.0/8", "192.168.0.0/16", "169.254.0.0/16")]


def test_slots_and_ports_take_the_lowest_free_value() -> None:
    assert allocate_slot([]) == 0
    assert allocate_slot([0, 1, 3]) == 2
    assert allocate_port(42200, 42202, [42200]) == 42201
    assert allocate_port(42200, 42202, [42201, 42200]) == 42202


def test_exhaustion_is_a_clear_error() -> None:
    with pytest.raises(VmError, match="all 256 lease networks"):
        allocate_slot(range(MAX_SLOTS))
    with pytest.raises(VmError, match="all SSH ports 42200-42201 are in use"):
        allocate_port(42200, 42201, [42200, 42201])


def test_addresses_derive_from_the_slot() -> None:
    first = LeaseAddressing(LEASE, 0, 42200, POOL)
    assert first.bridge == "blbr0"
    assert str(first.subnet) == "10.213.0.0/30"
    assert str(first.host_interface) == "10.213.0.1/30"
    assert str(first.vm_interface) == "10.213.0.2/30"
    last = LeaseAddressing(LEASE, 255, 42455, POOL)
    assert last.bridge == "blbr255" and len(last.bridge) <= 15
    assert str(last.vm_address) == "10.213.255.2" and str(last.gateway) == "10.213.255.1"
    # Different slots never share a subnet.
    subnets = {LeaseAddressing(LEASE, slot, 1, POOL).subnet for slot in range(MAX_SLOTS)}
    assert len(subnets) == MAX_SLOTS
    assert all(subnet.subnet_of(POOL) for subnet in subnets)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("nope", 0, 42200, POOL), "lease id"),
        ((LEASE, 256, 42200, POOL), "slot"),
        ((LEASE, -1, 42200, POOL), "slot"),
        ((LEASE, 0, 0, POOL), "SSH port"),
        ((LEASE, 0, 22, ipaddress.IPv4Network("10.0.0.0/8")), "/16"),
    ],
)
def test_bad_addressing(args: tuple[Any, ...], message: str) -> None:
    with pytest.raises((VmError, ValueError), match=message):
        LeaseAddressing(*args)


def _rules(commands: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [command["add"]["rule"] for command in commands]


def _by_chain(rules: list[dict[str, Any]], chain: str) -> list[dict[str, Any]]:
    return [rule for rule in rules if rule["chain"] == chain]


def _matches(rule: dict[str, Any]) -> list[dict[str, Any]]:
    return [e["match"] for e in rule["expr"] if "match" in e]


def m(left: Any, right: Any, op: str = "==") -> dict[str, Any]:
    return {"op": op, "left": left, "right": right}


def payload(protocol: str, field: str) -> dict[str, Any]:
    return {"payload": {"protocol": protocol, "field": field}}


def meta(key: str) -> dict[str, Any]:
    return {"meta": {"key": key}}


def _verdict(rule: dict[str, Any]) -> str:
    last = rule["expr"][-1]
    return next(iter(last))


def test_lease_rules_forward_ssh_and_masquerade() -> None:
    addr = LeaseAddressing(LEASE, 3, 42203, POOL)
    rules = _rules(lease_rule_commands(addr, ISOLATED))
    assert {rule["comment"] for rule in rules} == {f"lease:{LEASE}"}
    assert all((r["family"], r["table"]) == ("inet", "byteleap") for r in rules)

    (dnat,) = _by_chain(rules, "prerouting")
    assert dnat["expr"][-1] == {"dnat": {"family": "ip", "addr": "10.213.3.2", "port": 22}}
    matches = _matches(dnat)
    assert m(payload("tcp", "dport"), 42203) in matches
    # Only connections to the host's own addresses are forwarded, not transit traffic.
    assert m({"fib": {"result": "type", "flags": ["daddr"]}}, "local") in matches

    (masquerade,) = _by_chain(rules, "postrouting")
    assert _verdict(masquerade) == "masquerade"
    subnet = {"prefix": {"addr": "10.213.3.0", "len": 30}}
    assert m(payload("ip", "saddr"), subnet) in _matches(masquerade)
    assert m(meta("oifname"), "blbr3", op="!=") in _matches(masquerade)


def test_lease_rules_isolate_the_vm() -> None:
    addr = LeaseAddressing(LEASE, 3, 42203, POOL)
    rules = _rules(lease_rule_commands(addr, ISOLATED))
    forward = _by_chain(rules, "forward")
    from_vm = m(meta("iifname"), "blbr3")
    to_vm = m(meta("oifname"), "blbr3")

    (isolation,) = [r for r in forward if from_vm in _matches(r) and "set" in str(r)]
    assert _verdict(isolation) == "drop"
    daddr = next(x for x in _matches(isolation) if "payload" in x["left"])
    assert daddr["left"] == payload("ip", "daddr")
    prefixes = {(p["prefix"]["addr"], p["prefix"]["len"]) for p in daddr["right"]["set"]}
    assert prefixes == {("10.0.0.0", 8), ("192.168.0.0", 16), ("169.254.0.0", 16)}

    spoof = [r for r in forward if m(payload("ip", "saddr"), "10.213.3.2", "!=") in _matches(r)]
    assert len(spoof) == 1 and _verdict(spoof[0]) == "drop"
    assert from_vm in _matches(spoof[0])
    not_ipv4 = [r for r in forward if m(meta("nfproto"), "ipv4", "!=") in _matches(r)]
    assert len(not_ipv4) == 1 and _verdict(not_ipv4[0]) == "drop"

    inbound = [r for r in forward if to_vm in _matches(r)]
    assert [_verdict(r) for r in inbound] == ["accept", "drop"]  # only forwarded SSH gets in
    assert m({"ct": {"key": "status"}}, "dnat", "in") in _matches(inbound[0])
    assert m(payload("tcp", "dport"), 22) in _matches(inbound[0])

    (host,) = _by_chain(rules, "input")
    assert from_vm in _matches(host) and _verdict(host) == "drop"


def test_base_table_and_reply_rules() -> None:
    commands = base_commands()
    assert commands[0] == {"add": {"table": {"family": "inet", "name": "byteleap"}}}
    chains = {c["add"]["chain"]["name"]: c["add"]["chain"] for c in commands[1:]}
    assert set(chains) == {"prerouting", "postrouting", "forward", "input"}
    assert all(chain["policy"] == "accept" for chain in chains.values())
    assert chains["prerouting"]["type"] == "nat" and chains["prerouting"]["prio"] == -100
    assert chains["postrouting"]["prio"] == 100
    replies = base_rule_commands(["forward"])
    (insert,) = replies
    rule = insert["insert"]["rule"]
    assert rule["chain"] == "forward" and rule["comment"] == BASE_COMMENT
    assert rule["expr"][0]["match"]["right"] == ["established", "related"]


def test_the_pool_is_always_isolated() -> None:
    network = LeaseNetwork(POOL, [ipaddress.IPv4Network("192.168.0.0/16")])
    assert POOL in network.isolated
    rules = _rules(lease_rule_commands(LeaseAddressing(LEASE, 0, 42200, POOL), network.isolated))
    assert "10.213.0.0" in str(rules)
