"""The lifecycle of leased VMs: start, status, stop, and recovery after a crash.

:class:`LeaseVmManager` is what the worker's gateway link drives. Every blocking call (libvirt,
qemu-img, genisoimage, nft, systemctl, hashing, fsync) runs in a thread, so the worker's event loop
and its watchdog pings stay alive while a VM boots or a base image is hashed. One libvirt
connection is shared and reopened when it drops (libvirtd restarted).

State: before any side effect, a lease's allocations (slot, SSH port, MAC, UUID, GPUs) are
written to ``<state_dir>/<lease_id>.json`` (0600, atomic). The file is what makes a crash
recoverable: :meth:`LeaseVmManager.recover` finds every trace a lease can leave (state file,
domain, lease folder, nftables rules, bridge, bound GPU), keeps the leases the gateway still
considers active and tears down everything else.

``start`` undoes what it did, in reverse, when any step fails, and raises one
:class:`VmStartError` naming the step. ``start`` and ``stop`` are shielded from cancellation: a
cancelled caller stops waiting, but the operation finishes (or is undone) on its own, so a VM is
never left half-built by a dropped gateway connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import logging
import secrets
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal, TypeVar

import msgspec

from byteleap.core.lease import MAX_LEASE_DEVICES
from byteleap.core.logs import log_fields

from . import VmError, replace_private_file
from .config import VmSettings
from .disks import BaseImage, create_overlay, make_lease_dir, remove_lease_dir
from .domain import (
    DomainSpec,
    GuestAgentState,
    PciAddress,
    domain_name,
    guest_agent_state,
    has_nvram,
    lease_id_of_domain,
    render_domain_xml,
    validate_lease_id,
)
from .gpus import GpuBinder, list_display_functions, passthrough_functions
from .network import (
    LeaseAddressing,
    LeaseNetwork,
    LeaseNetworkPort,
    allocate_port,
    allocate_slot,
)
from .seed import SeedSpec, validate_ssh_public_key, write_seed_iso

__all__ = [
    "HostGpu",
    "LeaseVmManager",
    "LeaseVmSpec",
    "RecoveryReport",
    "VmInfo",
    "VmStartError",
    "VmState",
    "VmStatus",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

DISK_FILE: Final = "disk.qcow2"
SEED_FILE: Final = "seed.iso"
CONSOLE_FILE: Final = "console.log"
VERDICT_FILE: Final = "base-image.verdict.json"
_STATE_VERSION: Final = 1
_MAX_STATE_BYTES: Final = 64 * 1024
_SHUTDOWN_POLL_S: Final = 0.5

VmState = Literal["starting", "running", "paused", "shutoff", "crashed", "stopping", "missing"]
Phase = Literal["starting", "running", "stopping"]


class VmStartError(VmError):
    """A lease's VM could not be started; everything it had set up was undone (or is left for
    :meth:`LeaseVmManager.recover` when the message says so)."""


@dataclass(frozen=True, kw_only=True)
class LeaseVmSpec:
    """What the gateway asks for: a lease, its GPUs (PCI addresses), the renter's key and the
    disk's virtual size (at most ``vm.max_disk_gib``)."""

    lease_id: str
    gpus: tuple[str, ...]
    ssh_public_key: str
    disk_gib: int


@dataclass(frozen=True, kw_only=True)
class VmInfo:
    """A started lease VM: how the renter reaches it and what it holds."""

    lease_id: str
    domain: str
    uuid: str
    gpus: tuple[str, ...]
    hostdevs: tuple[str, ...]
    vcpus: int
    memory_mib: int
    bridge: str
    vm_address: str
    ssh_port: int


@dataclass(frozen=True, kw_only=True)
class VmStatus:
    """``state``: the lease's phase while it starts or stops, else its domain's state
    (``missing``: no VM); ``guest_agent``: whether the guest agent is connected."""

    lease_id: str
    state: VmState
    guest_agent: GuestAgentState
    info: VmInfo | None


@dataclass(frozen=True, kw_only=True)
class HostGpu:
    """A GPU of this host as libvirt knows it; ``problem`` says why it cannot be leased."""

    address: str
    vendor_id: int
    product: str
    problem: str | None


@dataclass(frozen=True)
class RecoveryReport:
    """``kept``: active leases whose VM runs; ``failed``: active leases whose VM could not be
    kept (torn down: report them failed); ``removed``: leases not active any more, torn down;
    ``errors``: cleanup problems (the traces stay and the next recovery retries)."""

    kept: tuple[str, ...] = ()
    failed: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    errors: tuple[str, ...] = ()


class _LeaseState(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    version: int
    lease_id: str
    phase: Phase
    uuid: str
    slot: int
    ssh_port: int
    mac: str
    gpus: list[str]
    hostdevs: list[str]
    vcpus: int
    memory_mib: int
    created_at: float


_STATE_DECODER: Final = msgspec.json.Decoder(_LeaseState)


@dataclass
class _Undo:
    steps: list[tuple[str, Callable[[], None]]] = field(default_factory=list)

    def push(self, what: str, action: Callable[[], None]) -> None:
        self.steps.append((what, action))


def _suppress_libvirt_stderr() -> None:
    """libvirt prints every error to stderr by default; we raise them with context instead."""
    import libvirt

    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)


class LeaseVmManager:
    """Leased VMs of this host. ``recover`` once at start-up, then ``start``/``status``/``stop``.

    ``binder`` moves GPUs to vfio-pci and back (:mod:`.gpus`); ``network`` defaults to the real
    :class:`~.network.LeaseNetwork` on the host; ``open_connection`` defaults to
    ``libvirt.open``.
    """

    def __init__(
        self,
        conn_uri: str,
        settings: VmSettings,
        binder: GpuBinder,
        *,
        state_dir: Path,
        network: LeaseNetworkPort | None = None,
        open_connection: Callable[[str], Any] | None = None,
    ) -> None:
        self.conn_uri = conn_uri
        self.settings = settings
        self.binder = binder
        self.state_dir = state_dir
        self.vm_dir = Path(settings.vm_dir)
        self.pool = settings.pool_network()
        self.network: LeaseNetworkPort = network or LeaseNetwork(
            self.pool,
            [ipaddress.IPv4Network(text) for text in settings.isolated_ranges],
            tool_timeout_s=settings.tool_timeout_s,
        )
        self.base_image = BaseImage(
            Path(settings.base_image),
            settings.base_image_sha256,
            verdict_file=state_dir / VERDICT_FILE,
            tool_timeout_s=settings.tool_timeout_s,
        )
        if open_connection is None:
            import libvirt

            open_connection = libvirt.open
        self._open_connection = open_connection
        _suppress_libvirt_stderr()
        self._conn: Any = None
        self._conn_lock = threading.Lock()
        self._lock = asyncio.Lock()
        self._busy: set[str] = set()
        self._tasks: set[asyncio.Task[Any]] = set()

    # ----------------------------------------------------------------------------------------
    # Public API

    async def start(self, spec: LeaseVmSpec) -> VmInfo:
        """Bind the GPUs, create disk and seed, set up the network, define and start the VM.

        Starting a lease whose VM already runs with the same GPUs returns its info (the gateway
        may repeat a request after a reconnect). :class:`VmError` (``VmStartError``, or
        ``InvalidSshKeyError`` before anything happens) on failure.
        """
        lease_id = validate_lease_id(spec.lease_id)
        key = validate_ssh_public_key(spec.ssh_public_key)
        gpus = self._parse_gpus(spec.gpus)
        most = self.settings.max_disk_gib
        if not 1 <= spec.disk_gib <= most:
            raise VmStartError(
                f"lease {lease_id}: a {spec.disk_gib} GiB disk is outside 1..{most} GiB "
                "(vm.max_disk_gib)"
            )
        async with self._lock:
            self._check_idle(lease_id)
            existing = await asyncio.to_thread(self._read_state, lease_id)
            if existing is not None:
                info = await asyncio.to_thread(self._running_info, existing, gpus)
                if info is not None:
                    return info
                raise VmStartError(
                    f"lease {lease_id} already has a VM ({existing.phase}): stop it first"
                )
            state = await asyncio.to_thread(self._allocate, lease_id, gpus)
            self._busy.add(lease_id)
        try:
            return await self._shielded(self._start_steps(state, key, spec.disk_gib))
        finally:
            self._busy.discard(lease_id)

    async def stop(self, lease_id: str) -> bool:
        """Shut the VM down (gracefully, then by force), remove it with its disk, seed, network
        and GPU bindings. False when the lease left no trace at all; :class:`VmError` when
        something could not be removed (its state stays for :meth:`recover`)."""
        validate_lease_id(lease_id)
        async with self._lock:
            self._check_idle(lease_id)
            self._busy.add(lease_id)
        try:
            return await self._shielded(self._stop_steps(lease_id))
        finally:
            self._busy.discard(lease_id)

    async def status(self, lease_id: str) -> VmStatus:
        """The lease's phase or domain state and whether its guest agent is connected."""
        validate_lease_id(lease_id)
        return await asyncio.to_thread(self._status, lease_id)

    async def recover(self, active_lease_ids: Collection[str]) -> RecoveryReport:
        """Reconcile with what a crash may have left: keep (and re-assert) the VMs of
        ``active_lease_ids``, tear down every other lease's traces and release stray GPUs."""
        active = {validate_lease_id(lease_id) for lease_id in active_lease_ids}
        async with self._lock:
            return await self._recover(active)

    async def free_gpus(self) -> list[str]:
        """Addresses of this host's GPUs that no lease holds (the ones a lease may ask for)."""

        def find() -> list[str]:
            states, _ = self._read_all_states()
            held = {gpu for state in states for gpu in (*state.gpus, *state.hostdevs)}
            functions = list_display_functions(self._connection())
            return [str(f.address) for f in functions if str(f.address) not in held]

        return await asyncio.to_thread(find)

    async def host_gpus(self) -> list[HostGpu]:
        """Every GPU libvirt knows on this host, leased or not, with why one is unleasable
        (an IOMMU group shared with a device of the host, no IOMMU group at all)."""

        def find() -> list[HostGpu]:
            conn = self._connection()
            gpus = []
            for function in list_display_functions(conn):
                problem = None
                try:
                    passthrough_functions(conn, function.address)
                except VmError as exc:
                    problem = str(exc)
                gpus.append(
                    HostGpu(
                        address=str(function.address),
                        vendor_id=function.vendor_id,
                        product=function.product,
                        problem=problem,
                    )
                )
            return gpus

        return await asyncio.to_thread(find)

    async def close(self) -> None:
        """Close the libvirt connection (VMs keep running; they are libvirt's)."""

        def close() -> None:
            with self._conn_lock:
                if self._conn is not None:
                    with contextlib.suppress(Exception):
                        self._conn.close()
                    self._conn = None

        await asyncio.to_thread(close)

    # ----------------------------------------------------------------------------------------
    # Start

    def _parse_gpus(self, gpus: Iterable[str]) -> tuple[PciAddress, ...]:
        try:
            addresses = [PciAddress.parse(text) for text in gpus]
        except ValueError as exc:
            raise VmStartError(f"bad GPU address: {exc}") from None
        if not addresses:
            raise VmStartError("a lease needs at least one GPU")
        if len(addresses) > MAX_LEASE_DEVICES:
            raise VmStartError(f"a lease holds at most {MAX_LEASE_DEVICES} GPUs")
        if len(set(addresses)) != len(addresses):
            raise VmStartError("a GPU is listed twice")
        return tuple(sorted(addresses))

    def _check_idle(self, lease_id: str) -> None:
        if lease_id in self._busy:
            raise VmError(f"lease {lease_id}: another start or stop is in progress")

    def _allocate(self, lease_id: str, gpus: tuple[PciAddress, ...]) -> _LeaseState:
        states, _ = self._read_all_states()
        held = {}
        for other in states:
            for address in (*other.gpus, *other.hostdevs):
                held[address] = other.lease_id
        for gpu in gpus:
            if str(gpu) in held:
                raise VmStartError(f"GPU {gpu} is already leased (lease {held[str(gpu)]})")
        macs = {other.mac for other in states}
        mac = _random_mac()
        while mac in macs:
            mac = _random_mac()
        count = len(gpus)
        memory = self.settings.memory_mib_per_gpu * count
        state = _LeaseState(
            version=_STATE_VERSION,
            lease_id=lease_id,
            phase="starting",
            uuid=str(uuid.uuid4()),
            slot=allocate_slot(other.slot for other in states),
            ssh_port=allocate_port(
                self.settings.ssh_port_first,
                self.settings.ssh_port_last,
                (other.ssh_port for other in states),
            ),
            mac=mac,
            gpus=[str(gpu) for gpu in gpus],
            hostdevs=[],
            vcpus=self.settings.vcpus_per_gpu * count,
            memory_mib=memory,
            created_at=time.time(),
        )
        self._write_state(state)
        return state

    async def _start_steps(self, state: _LeaseState, key: str, disk_gib: int) -> VmInfo:
        lease_id = state.lease_id
        gpus = tuple(PciAddress.parse(text) for text in state.gpus)
        addressing = self._addressing(state)
        undo = _Undo()
        step = "starting"
        try:
            step = "reading the GPUs' IOMMU groups"
            hostdevs = await asyncio.to_thread(self._resolve_hostdevs, lease_id, gpus)
            state = msgspec.structs.replace(state, hostdevs=[str(a) for a in hostdevs])
            await asyncio.to_thread(self._write_state, state)
            for gpu in gpus:
                step = f"binding GPU {gpu}"
                # Pushed before the bind: a bind that fails half-way is released all the same.
                undo.push(f"releasing GPU {gpu}", functools.partial(self.binder.release, gpu))
                await asyncio.to_thread(self.binder.bind, gpu)
            step = "verifying the base image"
            base = await asyncio.to_thread(self.base_image.verify)
            step = "creating the lease directory"
            lease_dir = await asyncio.to_thread(make_lease_dir, self.vm_dir, lease_id)
            undo.push(
                "removing the lease directory", functools.partial(remove_lease_dir, lease_dir)
            )
            step = "creating the disk overlay"
            await asyncio.to_thread(
                create_overlay,
                base,
                lease_dir / DISK_FILE,
                disk_gib,
                tool_timeout_s=self.settings.tool_timeout_s,
            )
            step = "writing the cloud-init seed"
            seed = SeedSpec(
                lease_id=lease_id,
                ssh_public_key=key,
                mac=state.mac,
                vm_interface=addressing.vm_interface,
                gateway=addressing.gateway,
                dns_servers=tuple(self.settings.dns_servers),
            )
            await asyncio.to_thread(
                write_seed_iso,
                seed,
                lease_dir / SEED_FILE,
                tool_timeout_s=self.settings.tool_timeout_s,
            )
            step = "setting up the network"
            undo.push(
                "tearing down the network",
                functools.partial(self.network.teardown, lease_id, state.slot),
            )
            await asyncio.to_thread(self.network.setup, addressing)
            step = "defining and starting the domain"
            undo.push("removing the domain", functools.partial(self._remove_domain, lease_id))
            spec = self._domain_spec(state, hostdevs, lease_dir)
            await asyncio.to_thread(self._define_and_start, spec)
            state = msgspec.structs.replace(state, phase="running")
            await asyncio.to_thread(self._write_state, state)
        except Exception as exc:
            problems = await self._undo(undo)
            if problems:
                note = f"; cleanup incomplete ({'; '.join(problems)}): recover() retries it"
            else:
                note = ""
                await asyncio.to_thread(self._delete_state, lease_id)
            log.error(
                "lease %s: %s failed: %s%s",
                lease_id,
                step,
                exc,
                note,
                extra=log_fields(lease_id=lease_id),
            )
            raise VmStartError(f"lease {lease_id}: {step} failed: {exc}{note}") from exc
        info = self._info(state)
        log.info(
            "lease %s: VM %s running with %s (SSH port %d -> %s)",
            lease_id,
            info.domain,
            ", ".join(info.hostdevs),
            info.ssh_port,
            info.vm_address,
            extra=log_fields(lease_id=lease_id, domain=info.domain, ssh_port=info.ssh_port),
        )
        return info

    async def _undo(self, undo: _Undo) -> list[str]:
        problems: list[str] = []
        for what, action in reversed(undo.steps):
            try:
                await asyncio.to_thread(action)
            except Exception as exc:
                log.error("undo: %s failed: %s", what, exc)
                problems.append(f"{what}: {exc}")
        return problems

    def _resolve_hostdevs(
        self, lease_id: str, gpus: tuple[PciAddress, ...]
    ) -> tuple[PciAddress, ...]:
        conn = self._connection()
        everything: list[PciAddress] = []
        for gpu in gpus:
            everything.extend(passthrough_functions(conn, gpu))
        # Companions of a GPU must not be held by another lease either.
        states, _ = self._read_all_states()
        for other in states:
            if other.lease_id == lease_id:
                continue
            clash = {str(a) for a in everything} & {*other.hostdevs, *other.gpus}
            if clash:
                raise VmError(f"{', '.join(sorted(clash))} already leased (lease {other.lease_id})")
        return tuple(everything)

    def _domain_spec(
        self, state: _LeaseState, hostdevs: tuple[PciAddress, ...], lease_dir: Path
    ) -> DomainSpec:
        settings = self.settings
        return DomainSpec(
            lease_id=state.lease_id,
            uuid=state.uuid,
            domain_type=settings.domain_type,
            vcpus=state.vcpus,
            memory_mib=state.memory_mib,
            memory_hard_limit_mib=state.memory_mib + settings.memory_overhead_mib,
            machine=settings.machine,
            cpu_mode=settings.cpu_mode,
            firmware=settings.firmware,
            disk_path=str(lease_dir / DISK_FILE),
            seed_path=str(lease_dir / SEED_FILE),
            console_log=str(lease_dir / CONSOLE_FILE),
            bridge=self._addressing(state).bridge,
            mac=state.mac,
            hostdevs=hostdevs,
            # Never stored: only libvirt (root-readable domain config) knows it.
            vnc_password=secrets.token_urlsafe(6)[:8] if settings.vnc_localhost else None,
        )

    def _define_and_start(self, spec: DomainSpec) -> None:
        import libvirt

        conn = self._connection()
        try:
            domain = conn.defineXML(render_domain_xml(spec))
            domain.create()
        except libvirt.libvirtError as exc:
            raise VmError(f"libvirt: {exc}") from None

    # ----------------------------------------------------------------------------------------
    # Stop

    async def _stop_steps(self, lease_id: str) -> bool:
        state = await asyncio.to_thread(self._read_state, lease_id)
        if state is not None and state.phase != "stopping":
            state = msgspec.structs.replace(state, phase="stopping")
            await asyncio.to_thread(self._write_state, state)
        found = state is not None
        found |= await self._shutdown(lease_id, self.settings.shutdown_timeout_s)
        found |= await asyncio.to_thread(self._teardown_rest, lease_id, state)
        if found:
            log.info(
                "lease %s: VM stopped and removed", lease_id, extra=log_fields(lease_id=lease_id)
            )
        return found

    async def _shutdown(self, lease_id: str, grace_s: float) -> bool:
        """Shut the domain down (ACPI first, up to ``grace_s``), then undefine it; False if
        there is none. Raises when it cannot be removed: its GPUs must not be released then."""
        domain = await asyncio.to_thread(self._lookup, lease_id)
        if domain is None:
            return False
        if grace_s > 0 and await asyncio.to_thread(_is_active, domain):
            with contextlib.suppress(VmError):  # a guest that ignores ACPI is destroyed below
                await asyncio.to_thread(_call, domain.shutdown, f"shutting down {lease_id}")
            deadline = time.monotonic() + grace_s
            while time.monotonic() < deadline:
                if not await asyncio.to_thread(_is_active, domain):
                    break
                await asyncio.sleep(_SHUTDOWN_POLL_S)
        await asyncio.to_thread(self._remove_domain, lease_id)
        return True

    def _remove_domain(self, lease_id: str) -> None:
        """Destroy (if running) and undefine the lease's domain; nothing if there is none."""
        import libvirt

        domain = self._lookup(lease_id)
        if domain is None:
            return
        try:
            if domain.isActive():
                domain.destroy()
            flags = libvirt.VIR_DOMAIN_UNDEFINE_NVRAM if has_nvram(domain.XMLDesc(0)) else 0
            domain.undefineFlags(flags)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return
            raise VmError(
                f"lease {lease_id}: removing domain {domain_name(lease_id)}: {exc}"
            ) from None

    def _teardown_rest(self, lease_id: str, state: _LeaseState | None) -> bool:
        """Network, lease folder, GPUs and state file of a lease whose domain is gone."""
        lease_dir = self.vm_dir / lease_id
        found = lease_dir.exists()
        problems: list[str] = []
        try:
            self.network.teardown(lease_id, state.slot if state else None)
        except VmError as exc:
            problems.append(str(exc))
        try:
            remove_lease_dir(lease_dir)
        except VmError as exc:
            problems.append(str(exc))
        if state is not None:
            for text in state.gpus:
                try:
                    self.binder.release(PciAddress.parse(text))
                except VmError as exc:
                    problems.append(str(exc))
        if problems:
            raise VmError(f"lease {lease_id}: cleanup incomplete: {'; '.join(problems)}")
        self._delete_state(lease_id)
        return found

    # ----------------------------------------------------------------------------------------
    # Status

    def _status(self, lease_id: str) -> VmStatus:
        state = self._read_state(lease_id)
        info = self._info(state) if state is not None else None
        if state is not None and state.phase != "running":
            return VmStatus(lease_id=lease_id, state=state.phase, guest_agent="unknown", info=info)
        domain = self._lookup(lease_id)
        if domain is None:
            return VmStatus(lease_id=lease_id, state="missing", guest_agent="unknown", info=info)
        vm_state = _domain_state(domain)
        agent: GuestAgentState = "disconnected"
        if vm_state == "running":
            agent = guest_agent_state(_call(domain.XMLDesc, f"reading {lease_id}", 0))
        return VmStatus(lease_id=lease_id, state=vm_state, guest_agent=agent, info=info)

    def _running_info(self, state: _LeaseState, gpus: tuple[PciAddress, ...]) -> VmInfo | None:
        if state.phase != "running" or state.gpus != [str(gpu) for gpu in gpus]:
            return None
        domain = self._lookup(state.lease_id)
        if domain is None or not _is_active(domain):
            return None
        return self._info(state)

    def _info(self, state: _LeaseState) -> VmInfo:
        addressing = self._addressing(state)
        return VmInfo(
            lease_id=state.lease_id,
            domain=domain_name(state.lease_id),
            uuid=state.uuid,
            gpus=tuple(state.gpus),
            hostdevs=tuple(state.hostdevs),
            vcpus=state.vcpus,
            memory_mib=state.memory_mib,
            bridge=addressing.bridge,
            vm_address=str(addressing.vm_address),
            ssh_port=state.ssh_port,
        )

    # ----------------------------------------------------------------------------------------
    # Recovery

    async def _recover(self, active: set[str]) -> RecoveryReport:
        states_list, unreadable = await asyncio.to_thread(self._read_all_states)
        states = {state.lease_id: state for state in states_list}
        domains = await asyncio.to_thread(self._our_domains)
        dirs = await asyncio.to_thread(self._lease_dirs)
        network = await asyncio.to_thread(self.network.inventory)
        bound = await asyncio.to_thread(self.binder.bound)
        kept: list[str] = []
        failed: list[str] = []
        removed: list[str] = []
        errors = [f"unreadable lease state {name}" for name in unreadable]

        traces = set(states) | domains | dirs | set(network.rule_lease_ids) | set(unreadable)
        for lease_id in sorted(traces - self._busy):
            state = states.get(lease_id)
            if lease_id in active:
                if state is not None and state.phase == "running":
                    try:
                        await asyncio.to_thread(self._reassert, state)
                    except VmError as exc:
                        errors.append(f"lease {lease_id}: cannot keep its VM: {exc}")
                    else:
                        kept.append(lease_id)
                        continue
                failed.append(lease_id)
            else:
                removed.append(lease_id)
            try:
                await self._shutdown(lease_id, grace_s=0)
                await asyncio.to_thread(self._teardown_rest, lease_id, state)
            except VmError as exc:
                errors.append(str(exc))

        # Leftovers no lease state names: bridges and GPUs.
        remaining, _ = await asyncio.to_thread(self._read_all_states)
        owned_slots = {state.slot for state in remaining}
        held = {gpu for state in remaining for gpu in state.gpus}
        for slot in sorted(network.bridge_slots - owned_slots):
            try:
                await asyncio.to_thread(self.network.teardown, None, slot)
            except VmError as exc:
                errors.append(str(exc))
        for gpu in sorted(bound):
            if str(gpu) in held:
                continue
            try:
                await asyncio.to_thread(self.binder.release, gpu)
            except VmError as exc:
                errors.append(str(exc))
        report = RecoveryReport(tuple(kept), tuple(failed), tuple(removed), tuple(errors))
        log.info(
            "lease recovery: kept %d, failed %d, removed %d, %d problem(s)",
            len(kept),
            len(failed),
            len(removed),
            len(errors),
            extra=log_fields(
                kept=" ".join(kept), failed=" ".join(failed), removed=" ".join(removed)
            ),
        )
        for problem in errors:
            log.warning("lease recovery: %s", problem)
        return report

    def _reassert(self, state: _LeaseState) -> None:
        """Make a kept lease whole again (after a host reboot its GPUs, bridge and rules are
        gone and its domain is shut off); every step is a no-op when nothing is missing."""
        domain = self._lookup(state.lease_id)
        if domain is None:
            raise VmError("its domain is gone")
        for text in state.gpus:
            self.binder.bind(PciAddress.parse(text))
        self.network.setup(self._addressing(state))
        if not _is_active(domain):
            _call(domain.create, f"restarting {state.lease_id}")
            log.info("lease %s: VM restarted", state.lease_id)

    def _our_domains(self) -> set[str]:
        import libvirt

        try:
            domains = self._connection().listAllDomains(0)
            names = [domain.name() for domain in domains]
        except libvirt.libvirtError as exc:
            raise VmError(f"listing libvirt domains: {exc}") from None
        return {lease for lease in map(lease_id_of_domain, names) if lease is not None}

    def _lease_dirs(self) -> set[str]:
        try:
            names = [entry.name for entry in self.vm_dir.iterdir() if entry.is_dir()]
        except FileNotFoundError:
            return set()
        found = set()
        for name in names:
            with contextlib.suppress(ValueError):
                found.add(validate_lease_id(name))
        return found

    # ----------------------------------------------------------------------------------------
    # libvirt

    def _connection(self) -> Any:
        import libvirt

        with self._conn_lock:
            if self._conn is not None:
                try:
                    alive = self._conn.isAlive() == 1
                except libvirt.libvirtError:
                    alive = False
                if alive:
                    return self._conn
                log.warning("libvirt connection to %s dropped: reconnecting", self.conn_uri)
                with contextlib.suppress(Exception):
                    self._conn.close()
                self._conn = None
            try:
                self._conn = self._open_connection(self.conn_uri)
            except libvirt.libvirtError as exc:
                raise VmError(f"cannot connect to libvirt at {self.conn_uri}: {exc}") from None
            return self._conn

    def _lookup(self, lease_id: str) -> Any:
        import libvirt

        try:
            return self._connection().lookupByName(domain_name(lease_id))
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise VmError(f"lease {lease_id}: looking up its domain: {exc}") from None

    # ----------------------------------------------------------------------------------------
    # State files

    def _addressing(self, state: _LeaseState) -> LeaseAddressing:
        return LeaseAddressing(state.lease_id, state.slot, state.ssh_port, self.pool)

    def _state_path(self, lease_id: str) -> Path:
        return self.state_dir / f"{lease_id}.json"

    def _write_state(self, state: _LeaseState) -> None:
        try:
            self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            replace_private_file(self._state_path(state.lease_id), msgspec.json.encode(state))
        except OSError as exc:
            raise VmError(f"lease {state.lease_id}: cannot write its state: {exc}") from None

    def _delete_state(self, lease_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._state_path(lease_id).unlink()

    def _read_state(self, lease_id: str) -> _LeaseState | None:
        path = self._state_path(lease_id)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise VmError(f"lease {lease_id}: cannot read its state {path}: {exc}") from None
        if len(data) > _MAX_STATE_BYTES:
            raise VmError(f"lease {lease_id}: state file {path} is too large")
        try:
            state = _STATE_DECODER.decode(data)
        except msgspec.DecodeError as exc:
            raise VmError(f"lease {lease_id}: state file {path} is corrupt: {exc}") from None
        if state.lease_id != lease_id or state.version != _STATE_VERSION:
            raise VmError(f"lease {lease_id}: state file {path} does not describe this lease")
        return state

    def _read_all_states(self) -> tuple[list[_LeaseState], list[str]]:
        """Every lease state, and the lease ids whose state file cannot be read."""
        try:
            paths = sorted(self.state_dir.glob("*.json"))
        except OSError:
            return [], []
        states: list[_LeaseState] = []
        unreadable: list[str] = []
        for path in paths:
            try:
                lease_id = validate_lease_id(path.stem)
            except ValueError:
                continue
            try:
                state = self._read_state(lease_id)
            except VmError as exc:
                log.warning("%s", exc)
                unreadable.append(lease_id)
                continue
            if state is not None:
                states.append(state)
        return states, unreadable

    async def _shielded(self, work: Awaitable[T]) -> T:
        task: asyncio.Task[T] = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return await asyncio.shield(task)


def _random_mac() -> str:
    tail = secrets.token_bytes(3)
    return "52:54:00:" + ":".join(f"{b:02x}" for b in tail)


def _call(method: Callable[..., T], what: str, *args: Any) -> T:
    import libvirt

    try:
        return method(*args)
    except libvirt.libvirtError as exc:
        raise VmError(f"{what}: {exc}") from None


def _is_active(domain: Any) -> bool:
    return bool(_call(domain.isActive, "reading domain state"))


def _domain_state(domain: Any) -> VmState:
    import libvirt

    state = _call(domain.state, "reading domain state")[0]
    if state in (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_BLOCKED):
        return "running"
    if state in (libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PMSUSPENDED):
        return "paused"
    if state == libvirt.VIR_DOMAIN_CRASHED:
        return "crashed"
    if state == libvirt.VIR_DOMAIN_SHUTDOWN:
        return "stopping"
    return "shutoff"
