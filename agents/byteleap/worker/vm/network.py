"""Per-lease networking: a bridge, a /30, an SSH port forward and isolation rules.

Lease slot ``n`` (0..255) owns:

* the bridge ``blbr<n>`` with the host end ``10.<a>.<n>.1/30`` (``10.<a>.0.0/16`` is
  ``vm.subnet_pool``); the VM is ``10.<a>.<n>.2`` and its NIC is the only port of the bridge;
* in the nftables table ``inet byteleap``, rules commented ``lease:<lease_id>``:

  - prerouting (dstnat): ``tcp dport <ssh_port>`` to one of the host's own addresses is
    forwarded to ``<vm>:22``;
  - postrouting (srcnat): the VM's traffic leaving by any other interface is masqueraded;
  - forward: the VM may only use its own address (no spoofing), no IPv6, and may not open
    connections to ``vm.isolated_ranges`` (the host's private networks, link-local metadata
    services, and every other lease: they are all inside the pool); nothing reaches the VM
    except the forwarded SSH port; replies (``ct state established,related``) pass;
  - input: the VM cannot reach the host itself except with replies.

Links and addresses go through netlink (pyroute2); rules go through ``nft -j -f -`` with a JSON
batch on stdin, one atomic transaction per change. Every operation is idempotent: setting up a
lease again replaces its rules and keeps its bridge, tearing down what is gone does nothing, so
both can simply be re-run after a crash. ``netns`` runs all of it inside a named network
namespace (tests do; production uses the host's).

Base chains accept by default: the table only ever drops traffic of lease bridges, so the host's
other forwarding is untouched. Prerequisite: ``net.ipv4.ip_forward=1`` (checked at setup).
"""

from __future__ import annotations

import ipaddress
import json
import re
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol

from . import VmError, run_tool
from .domain import validate_lease_id

__all__ = [
    "BASE_COMMENT",
    "BRIDGE_PREFIX",
    "MAX_SLOTS",
    "TABLE",
    "LeaseAddressing",
    "LeaseNetwork",
    "LeaseNetworkPort",
    "NetworkInventory",
    "allocate_port",
    "allocate_slot",
    "base_commands",
    "lease_comment",
    "lease_rule_commands",
]

TABLE: Final = "byteleap"
FAMILY: Final = "inet"
BRIDGE_PREFIX: Final = "blbr"
MAX_SLOTS: Final = 256
BASE_COMMENT: Final = "byteleap:base"
_LEASE_COMMENT: Final = re.compile(r"lease:([0-9a-f]{32})")
_BRIDGE_NAME: Final = re.compile(r"blbr(0|[1-9][0-9]{0,2})")
_VM_SSH_PORT: Final = 22
_EEXIST: Final = 17
_ENODEV: Final = 19
_CHAINS: Final = (
    # name, type, hook, priority (dstnat -100, filter 0, srcnat 100)
    ("prerouting", "nat", "prerouting", -100),
    ("postrouting", "nat", "postrouting", 100),
    ("forward", "filter", "forward", 0),
    ("input", "filter", "input", 0),
)
_BASE_CHAINS: Final = ("forward", "input")  # where replies are accepted before lease rules


def allocate_slot(used: Iterable[int]) -> int:
    """The lowest free lease slot (0..255); :class:`VmError` when all are taken."""
    taken = set(used)
    for slot in range(MAX_SLOTS):
        if slot not in taken:
            return slot
    raise VmError(f"all {MAX_SLOTS} lease networks of this host are in use")


def allocate_port(first: int, last: int, used: Iterable[int]) -> int:
    """The lowest free SSH port in ``first..last``; :class:`VmError` when all are taken."""
    taken = set(used)
    for port in range(first, last + 1):
        if port not in taken:
            return port
    raise VmError(f"all SSH ports {first}-{last} are in use (vm.ssh_port_first/last)")


def lease_comment(lease_id: str) -> str:
    return f"lease:{validate_lease_id(lease_id)}"


@dataclass(frozen=True)
class LeaseAddressing:
    """A lease's slot, SSH port and the addresses derived from them."""

    lease_id: str
    slot: int
    ssh_port: int
    pool: ipaddress.IPv4Network

    def __post_init__(self) -> None:
        validate_lease_id(self.lease_id)
        if not 0 <= self.slot < MAX_SLOTS:
            raise VmError(f"lease slot must be within 0..{MAX_SLOTS - 1}, got {self.slot}")
        if not 1 <= self.ssh_port <= 65535:
            raise VmError(f"SSH port must be within 1..65535, got {self.ssh_port}")
        if self.pool.prefixlen != 16:
            raise VmError(f"the lease pool must be a /16, got {self.pool}")

    @property
    def bridge(self) -> str:
        return f"{BRIDGE_PREFIX}{self.slot}"

    @property
    def subnet(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network((int(self.pool.network_address) + self.slot * 256, 30))

    @property
    def host_interface(self) -> ipaddress.IPv4Interface:
        return ipaddress.IPv4Interface((self.subnet.network_address + 1, 30))

    @property
    def vm_interface(self) -> ipaddress.IPv4Interface:
        return ipaddress.IPv4Interface((self.subnet.network_address + 2, 30))

    @property
    def gateway(self) -> ipaddress.IPv4Address:
        return self.host_interface.ip

    @property
    def vm_address(self) -> ipaddress.IPv4Address:
        return self.vm_interface.ip


# --------------------------------------------------------------------------------------------
# nftables JSON


def _match(left: Any, right: Any, op: str = "==") -> dict[str, Any]:
    return {"match": {"op": op, "left": left, "right": right}}


def _meta(key: str) -> dict[str, Any]:
    return {"meta": {"key": key}}


def _payload(protocol: str, field: str) -> dict[str, Any]:
    return {"payload": {"protocol": protocol, "field": field}}


def _prefix(network: ipaddress.IPv4Network) -> dict[str, Any]:
    return {"prefix": {"addr": str(network.network_address), "len": network.prefixlen}}


def _rule(chain: str, comment: str, *expr: dict[str, Any]) -> dict[str, Any]:
    return {
        "rule": {
            "family": FAMILY,
            "table": TABLE,
            "chain": chain,
            "comment": comment,
            "expr": list(expr),
        }
    }


_REPLIES: Final = _match({"ct": {"key": "state"}}, ["established", "related"], op="in")


def base_commands() -> list[dict[str, Any]]:
    """``add`` the table and its four base chains (a no-op for those that exist)."""
    commands: list[dict[str, Any]] = [{"add": {"table": {"family": FAMILY, "name": TABLE}}}]
    for name, kind, hook, priority in _CHAINS:
        chain = {
            "family": FAMILY,
            "table": TABLE,
            "name": name,
            "type": kind,
            "hook": hook,
            "prio": priority,
            "policy": "accept",
        }
        commands.append({"add": {"chain": chain}})
    return commands


def base_rule_commands(missing_in: Iterable[str]) -> list[dict[str, Any]]:
    """``insert`` (at the head) the replies-pass rule into the chains that lack it."""
    return [
        {"insert": _rule(chain, BASE_COMMENT, _REPLIES, {"accept": None})} for chain in missing_in
    ]


def lease_rule_commands(
    addr: LeaseAddressing, isolated: Sequence[ipaddress.IPv4Network]
) -> list[dict[str, Any]]:
    """``add`` commands for every rule of one lease (see the module docstring)."""
    comment = lease_comment(addr.lease_id)
    bridge = addr.bridge
    vm = str(addr.vm_address)
    from_vm = _match(_meta("iifname"), bridge)
    to_vm = _match(_meta("oifname"), bridge)
    isolated_set = {"set": [_prefix(network) for network in isolated]}
    rules = [
        _rule(
            "prerouting",
            comment,
            _match(_meta("nfproto"), "ipv4"),
            _match({"fib": {"result": "type", "flags": ["daddr"]}}, "local"),
            _match(_payload("tcp", "dport"), addr.ssh_port),
            {"dnat": {"family": "ip", "addr": vm, "port": _VM_SSH_PORT}},
        ),
        _rule(
            "postrouting",
            comment,
            _match(_payload("ip", "saddr"), _prefix(addr.subnet)),
            _match(_meta("oifname"), bridge, op="!="),
            {"masquerade": None},
        ),
        _rule(
            "forward", comment, from_vm, _match(_meta("nfproto"), "ipv4", op="!="), {"drop": None}
        ),
        _rule(
            "forward",
            comment,
            from_vm,
            _match(_payload("ip", "saddr"), vm, op="!="),
            {"drop": None},
        ),
        _rule(
            "forward",
            comment,
            from_vm,
            _match(_payload("ip", "daddr"), isolated_set),
            {"drop": None},
        ),
        _rule(
            "forward",
            comment,
            to_vm,
            _match({"ct": {"key": "status"}}, "dnat", op="in"),
            _match(_payload("ip", "daddr"), vm),
            _match(_payload("tcp", "dport"), _VM_SSH_PORT),
            {"accept": None},
        ),
        _rule("forward", comment, to_vm, {"drop": None}),
        _rule("input", comment, from_vm, {"drop": None}),
    ]
    return [{"add": rule} for rule in rules]


def _batch(commands: Sequence[dict[str, Any]]) -> bytes:
    return json.dumps({"nftables": [{"metainfo": {"json_schema_version": 1}}, *commands]}).encode()


@dataclass(frozen=True)
class _ListedRule:
    chain: str
    handle: int
    comment: str


def _listed_rules(listing: str) -> list[_ListedRule]:
    try:
        document = json.loads(listing)
        items = document["nftables"]
    except (ValueError, KeyError, TypeError):
        raise VmError("nft printed a listing that is not nftables JSON") from None
    rules: list[_ListedRule] = []
    for item in items:
        rule = item.get("rule") if isinstance(item, dict) else None
        if not isinstance(rule, dict) or rule.get("table") != TABLE:
            continue
        handle, chain = rule.get("handle"), rule.get("chain")
        if isinstance(handle, int) and isinstance(chain, str):
            rules.append(_ListedRule(chain, handle, str(rule.get("comment", ""))))
    return rules


# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NetworkInventory:
    """What exists now: lease ids with rules in the table, and slots with a bridge."""

    rule_lease_ids: frozenset[str]
    bridge_slots: frozenset[int]


class LeaseNetworkPort(Protocol):
    """What the VM manager needs from the network (blocking; call from a thread)."""

    def setup(self, addr: LeaseAddressing) -> None: ...

    def teardown(self, lease_id: str | None, slot: int | None) -> None: ...

    def inventory(self) -> NetworkInventory: ...


class LeaseNetwork:
    """The real thing: netlink for the bridge, nftables for the rules."""

    def __init__(
        self,
        pool: ipaddress.IPv4Network,
        isolated_ranges: Sequence[ipaddress.IPv4Network],
        *,
        netns: str | None = None,
        tool_timeout_s: float = 30.0,
    ) -> None:
        self.pool = pool
        # The pool is always isolated, whatever the configuration says: leases never see each
        # other.
        self.isolated = tuple(ipaddress.collapse_addresses([*isolated_ranges, pool]))
        self.netns = netns
        self.tool_timeout_s = tool_timeout_s
        self._lock = threading.Lock()

    # -- public ---------------------------------------------------------------------------

    def setup(self, addr: LeaseAddressing) -> None:
        """Bridge, host address and rules for ``addr``; re-running it repairs a partial setup."""
        if addr.pool != self.pool:
            raise VmError(f"lease {addr.lease_id}: its pool {addr.pool} is not {self.pool}")
        with self._lock:
            self._check_forwarding()
            self._ensure_bridge(addr)
            self._nft_batch(base_commands(), what="creating table inet byteleap")
            rules = self._list_rules()
            comment = lease_comment(addr.lease_id)
            with_base = {rule.chain for rule in rules if rule.comment == BASE_COMMENT}
            commands = base_rule_commands(c for c in _BASE_CHAINS if c not in with_base)
            commands += self._delete_commands(rule for rule in rules if rule.comment == comment)
            commands += lease_rule_commands(addr, self.isolated)
            self._nft_batch(commands, what=f"lease {addr.lease_id}: installing firewall rules")

    def teardown(self, lease_id: str | None, slot: int | None) -> None:
        """Remove the lease's rules (``lease_id`` given) and the bridge of ``slot`` (given);
        nothing for what is already gone."""
        comment = lease_comment(lease_id) if lease_id is not None else None
        with self._lock:
            if comment is not None and self._table_exists():
                mine = [rule for rule in self._list_rules() if rule.comment == comment]
                if mine:
                    self._nft_batch(
                        self._delete_commands(mine),
                        what=f"lease {lease_id}: removing firewall rules",
                    )
            if slot is not None:
                self._remove_bridge(f"{BRIDGE_PREFIX}{slot}")

    def inventory(self) -> NetworkInventory:
        with self._lock:
            lease_ids: set[str] = set()
            if self._table_exists():
                for rule in self._list_rules():
                    match = _LEASE_COMMENT.fullmatch(rule.comment)
                    if match:
                        lease_ids.add(match.group(1))
            slots: set[int] = set()
            with self._ipr() as ipr:
                for link in ipr.get_links():
                    name = link.get("ifname") or ""
                    match = _BRIDGE_NAME.fullmatch(name)
                    if match and int(match.group(1)) < MAX_SLOTS:
                        slots.add(int(match.group(1)))
            return NetworkInventory(frozenset(lease_ids), frozenset(slots))

    # -- netlink --------------------------------------------------------------------------

    @contextmanager
    def _ipr(self) -> Iterator[Any]:
        from pyroute2 import IPRoute

        try:
            ipr = IPRoute(netns=self.netns) if self.netns else IPRoute()
        except OSError as exc:
            raise VmError(f"cannot open netlink{self._where()}: {exc}") from None
        try:
            yield ipr
        finally:
            ipr.close()

    def _ensure_bridge(self, addr: LeaseAddressing) -> None:
        from pyroute2.netlink.exceptions import NetlinkError

        name = addr.bridge
        wanted = addr.host_interface
        try:
            with self._ipr() as ipr:
                found = ipr.link_lookup(ifname=name)
                if found:
                    kind = _link_kind(ipr.get_links(found[0])[0])
                    if kind != "bridge":
                        raise VmError(f"{name} exists{self._where()} but is a {kind or 'link'}")
                else:
                    try:
                        ipr.link("add", ifname=name, kind="bridge")
                    except NetlinkError as exc:
                        if exc.code != _EEXIST:
                            raise
                    found = ipr.link_lookup(ifname=name)
                index = found[0]
                present = False
                for entry in ipr.get_addr(index=index, family=2):
                    address = ipaddress.IPv4Interface(
                        (entry.get("IFA_ADDRESS") or entry.get("IFA_LOCAL"), entry["prefixlen"])
                    )
                    if address == wanted:
                        present = True
                    else:  # the bridge is ours alone: a stray address would misroute
                        ipr.addr(
                            "del",
                            index=index,
                            address=str(address.ip),
                            prefixlen=address.network.prefixlen,
                        )
                if not present:
                    try:
                        ipr.addr("add", index=index, address=str(wanted.ip), prefixlen=30)
                    except NetlinkError as exc:
                        if exc.code != _EEXIST:
                            raise
                ipr.link("set", index=index, state="up")
        except NetlinkError as exc:
            raise VmError(
                f"lease {addr.lease_id}: setting up bridge {name}{self._where()}: {exc}"
            ) from None

    def _remove_bridge(self, name: str) -> None:
        from pyroute2.netlink.exceptions import NetlinkError

        try:
            with self._ipr() as ipr:
                found = ipr.link_lookup(ifname=name)
                if not found:
                    return
                kind = _link_kind(ipr.get_links(found[0])[0])
                if kind != "bridge":
                    raise VmError(f"{name}{self._where()} is a {kind or 'link'}, not our bridge")
                try:
                    ipr.link("del", index=found[0])
                except NetlinkError as exc:
                    if exc.code != _ENODEV:
                        raise
        except NetlinkError as exc:
            raise VmError(f"removing bridge {name}{self._where()}: {exc}") from None

    def _check_forwarding(self) -> None:
        if self.netns is None:
            try:
                value = Path("/proc/sys/net/ipv4/ip_forward").read_text().strip()
            except OSError as exc:
                raise VmError(f"cannot read net.ipv4.ip_forward: {exc.strerror}") from None
        else:
            value = run_tool(
                [*self._in_netns(), "sysctl", "-n", "net.ipv4.ip_forward"],
                what="reading net.ipv4.ip_forward",
                timeout_s=self.tool_timeout_s,
            ).strip()
        if value != "1":
            raise VmError(
                f"net.ipv4.ip_forward is {value or 'unset'}{self._where()}: leased VMs would "
                "have no network (set net.ipv4.ip_forward=1 in /etc/sysctl.d)"
            )

    # -- nftables -------------------------------------------------------------------------

    def _in_netns(self) -> list[str]:
        return ["ip", "netns", "exec", self.netns] if self.netns else []

    def _where(self) -> str:
        return f" in network namespace {self.netns}" if self.netns else ""

    def _nft_batch(self, commands: Sequence[dict[str, Any]], *, what: str) -> None:
        if commands:
            run_tool(
                [*self._in_netns(), "nft", "-j", "-f", "-"],
                what=what,
                timeout_s=self.tool_timeout_s,
                stdin=_batch(commands),
            )

    def _table_exists(self) -> bool:
        listing = run_tool(
            [*self._in_netns(), "nft", "-j", "list", "tables", FAMILY],
            what="listing nftables tables",
            timeout_s=self.tool_timeout_s,
        )
        try:
            items = json.loads(listing)["nftables"]
        except (ValueError, KeyError, TypeError):
            raise VmError("nft printed a table list that is not nftables JSON") from None
        return any(
            isinstance(item, dict) and item.get("table", {}).get("name") == TABLE for item in items
        )

    def _list_rules(self) -> list[_ListedRule]:
        listing = run_tool(
            [*self._in_netns(), "nft", "-j", "list", "table", FAMILY, TABLE],
            what="listing table inet byteleap",
            timeout_s=self.tool_timeout_s,
        )
        return _listed_rules(listing)

    @staticmethod
    def _delete_commands(rules: Iterable[_ListedRule]) -> list[dict[str, Any]]:
        return [
            {
                "delete": {
                    "rule": {
                        "family": FAMILY,
                        "table": TABLE,
                        "chain": rule.chain,
                        "handle": rule.handle,
                    }
                }
            }
            for rule in rules
        ]


def _link_kind(link: Any) -> str | None:
    info = link.get("IFLA_LINKINFO")
    if info is None:
        return None
    kind = info.get("IFLA_INFO_KIND")
    return str(kind) if kind is not None else None
