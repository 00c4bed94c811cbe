"""byteleap-worker: the daemon on every GPU host (``python -m byteleap.worker.agent``).

Start-up, in order; any failure up to the key is one line on stderr and exit code 2 (systemd
shows it in ``systemctl status``, and ``RestartPreventExitStatus=2`` can keep a broken config from
restart-looping):

1. ``--config`` (default ``/etc/byteleap/worker.yaml``) with ``BYTELEAP_WORKER__*`` overrides;
2. the enrollment secret: systemd credential ``enrollment-secret``, else
   ``miner.enrollment_secret_file``;
3. the state directory (created 0700) and the worker's Ed25519 key ``<state_dir>/worker.key``
   (created on first start; the worker id derives from it).

Then the event loop: the systemd watchdog pings from the loop, the inventory is collected and the
challenge devices are set up off the loop (CPU ``cpu-0`` always; each CUDA GPU through CuPy in a
prover process of its own unless ``gpu.mode`` is ``passthrough``), and the
:class:`~byteleap.worker.link.WorkerLink` runs.
``READY=1`` goes out after the first successful miner session, or after the first failed attempt
when the miner is unreachable (the agent is then configured and retrying; ``STATUS=`` says which).
``STATUS=`` follows every link state change. SIGTERM/SIGINT: ``STOPPING=1``, the link is closed
with ``GOING_AWAY``, exit 0.

With ``gateway.enabled`` (and a ``vm:`` section) the worker also takes leases: the
:class:`~byteleap.worker.gateway_link.GatewayLink` enrolls with the gateway through the miner
(:mod:`.gateway_enroll`), keeps an mTLS session to it and turns its leases into VMs
(:class:`~byteleap.worker.vm.manager.LeaseVmManager`; with ``vm.domain_type: test`` on libvirt's
test driver with a simulated GPU host). It runs beside the miner link; ``STATUS=`` shows both.
A stop closes the gateway session but leaves the VMs running: a restart does not end a lease.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import logging
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NoReturn

from byteleap import __version__
from byteleap.core import wire
from byteleap.core.challenge.device_process import DeviceProcess, ProverProcessError, Ready
from byteleap.core.challenge.prover import NumpyBackend
from byteleap.core.config import ConfigError, load_config
from byteleap.core.credentials import CredentialError, read_secret
from byteleap.core.identity import IdentityError, WorkerKey
from byteleap.core.logs import log_fields, setup_logging
from byteleap.core.systemd import Notifier, install_signal_handlers, run_watchdog, watchdog_interval

from . import gateway_enroll, inventory
from .challenges import ChallengeRunner, Device
from .config import DEFAULT_CONFIG_PATH, ENV_PREFIX, WorkerConfig
from .gateway_link import GatewayLink, GatewayLinkSettings, GatewayStatus
from .link import LinkSettings, LinkState, LinkStatus, WorkerLink
from .vm.gpus import GpuBinder, PreboundGpuBinder, SystemdGpuBinder
from .vm.manager import LeaseVmManager
from .vm.network import LeaseNetworkPort
from .vm.simulated import SimulatedGpuBinder, SimulatedNetwork

__all__ = [
    "CPU_DEVICE",
    "EXIT_CONFIG",
    "LEASES_DIR",
    "build_devices",
    "build_lease_vms",
    "gateway_settings",
    "main",
]

log = logging.getLogger(__name__)

AGENT = "byteleap-worker"
CPU_DEVICE = wire.CPU_DEVICE
EXIT_CONFIG = 2
SECRET_CREDENTIAL = "enrollment-secret"  # noqa: S105 - a credential name, not a secret
KEY_FILE = "worker.key"
LEASES_DIR = "leases"
_GPU_PRECISIONS = frozenset({"fp32", "fp16"})
_AMPERE_PRECISIONS = frozenset({"tf32", "bf16"})  # compute capability 8.0 and newer


# --------------------------------------------------------------------------------------------
# Challenge devices


ProverFactory = Callable[[wire.GpuInfo, Path], DeviceProcess]
"""Makes the prover of one GPU: its inventory entry and the kernel cache directory."""


def cupy_prover(gpu: wire.GpuInfo, cache_dir: Path) -> DeviceProcess:
    """The GPU's CuPy prover, in a child process that sees only this GPU (by NVML uuid)."""
    # Looked up, never imported: the worker process itself must not initialise CUDA.
    if importlib.util.find_spec("cupy") is None:
        raise ProverProcessError("CuPy is not installed (the cuda extra)")
    return DeviceProcess("cupy", gpu.uuid, cache_dir=cache_dir)


def build_devices(
    cfg: WorkerConfig, inv: wire.Inventory, *, make_prover: ProverFactory = cupy_prover
) -> list[Device]:
    """The devices that run challenges: ``cpu-0`` always, each GPU on the NVIDIA driver when CuPy
    can use it.

    The worker process itself never initialises CUDA (a CUDA process holds every GPU it sees
    until it exits, so no GPU could leave for a lease): each GPU proves in a child process of
    its own (:mod:`byteleap.core.challenge.device_process`), started here so that the first
    challenge does not pay for loading CUDA and compiling the kernels. Blocking: call it off the
    event loop.
    """
    devices = [Device(uuid=CPU_DEVICE, backend=NumpyBackend(), precisions=frozenset({"fp32"}))]
    if cfg.gpu.mode == "passthrough":
        log.info("gpu.mode is passthrough: GPUs are for leases only, no GPU challenges")
        return devices
    if cfg.challenge.backend == "numpy":
        return devices
    gpus = [gpu for gpu in inv.gpus if not gpu.vfio_bound]
    if not gpus:
        if cfg.challenge.backend == "cupy":
            log.warning("challenge.backend is cupy but no GPU is on the NVIDIA driver: cpu-0 only")
        return devices
    devices.extend(_gpu_devices(gpus, Path(cfg.state_dir) / "cupy-cache", make_prover))
    return devices


def _gpu_devices(
    gpus: list[wire.GpuInfo], cache_dir: Path, make_prover: ProverFactory
) -> list[Device]:
    """Start every GPU's prover at once (each loads CUDA for seconds); keep those that work."""

    def start(gpu: wire.GpuInfo) -> tuple[DeviceProcess, Ready] | Exception:
        try:
            prover = make_prover(gpu, cache_dir)
        except Exception as exc:
            return exc
        try:
            return prover, prover.start()
        except Exception as exc:  # one bad GPU must not hide the others (start cleaned up)
            return exc

    with ThreadPoolExecutor(max_workers=len(gpus), thread_name_prefix="prover-start") as pool:
        started = list(pool.map(start, gpus))
    devices: list[Device] = []
    for gpu, outcome in zip(gpus, started, strict=True):
        if isinstance(outcome, Exception):
            log.warning(
                "GPU %s (%s) cannot run challenges, cpu-0 and the other GPUs carry on: %s",
                gpu.uuid,
                gpu.name,
                outcome,
            )
            continue
        prover, ready = outcome
        expected = inventory.normalize_pci_address(gpu.pci_bus_id)
        if ready.pci_bus_id and inventory.normalize_pci_address(ready.pci_bus_id) != expected:
            log.warning(
                "GPU %s: its prover sees the CUDA device at %s, not %s: no challenges on it",
                gpu.uuid,
                ready.pci_bus_id,
                expected,
            )
            prover.stop()
            continue
        precisions = _GPU_PRECISIONS
        if _major(gpu.compute_capability) >= 8:
            precisions = precisions | _AMPERE_PRECISIONS
        devices.append(Device(uuid=gpu.uuid, backend=prover, precisions=precisions))
        log.info(
            "GPU %s (%s) runs challenges in %s (prover pid %d)",
            gpu.uuid,
            gpu.name,
            ", ".join(sorted(precisions)),
            ready.pid,
        )
    return devices


def _major(compute_capability: str) -> int:
    """The major version of an inventory ``major.minor`` compute capability; 0 when unknown."""
    major = compute_capability.partition(".")[0]
    return int(major) if major.isdigit() else 0


# --------------------------------------------------------------------------------------------
# Leases


def build_lease_vms(cfg: WorkerConfig, state_dir: Path) -> LeaseVmManager:
    """The VM manager the gateway link drives (the config guarantees a ``vm:`` section).

    ``vm.domain_type: test`` is libvirt's test driver: nothing runs, so GPU binding and the
    network are simulated too (no systemd unit, no bridge, no nftables).
    """
    vm = cfg.vm
    if vm is None:
        raise ValueError("leases need a vm: section")
    binder: GpuBinder
    network: LeaseNetworkPort | None = None
    if vm.domain_type == "test":
        binder = SimulatedGpuBinder()
        network = SimulatedNetwork()
    elif cfg.gpu.mode == "passthrough":
        binder = PreboundGpuBinder()
    else:
        binder = SystemdGpuBinder(timeout_s=vm.gpu_timeout_s)
    return LeaseVmManager(
        vm.libvirt_uri, vm, binder, state_dir=state_dir / LEASES_DIR, network=network
    )


def gateway_settings(cfg: WorkerConfig) -> GatewayLinkSettings:
    """The gateway link's settings. Raises ``ValueError`` naming the bad key."""
    section = cfg.gateway
    if section.ssh_host is None:
        raise ValueError("gateway.ssh_host: required when gateway.enabled is true")
    return GatewayLinkSettings(
        ssh_host=section.ssh_host,
        connect_timeout_s=section.connect_timeout_s,
        reconnect_initial_s=section.reconnect_initial_s,
        reconnect_max_s=section.reconnect_max_s,
        enroll_retry_initial_s=section.enroll_retry_initial_s,
        enroll_retry_max_s=section.enroll_retry_max_s,
        expiry_grace_s=section.expiry_grace_s,
    )


# --------------------------------------------------------------------------------------------
# Start-up


def _die(message: str) -> NoReturn:
    """One line on stderr and exit code 2 (configuration, credential or key problem)."""
    line = " ".join(message.split())
    print(f"{AGENT}: {line}", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_CONFIG)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=AGENT, description="ByteLeap worker: reports this host to its miner, runs challenges."
    )
    parser.add_argument(
        "--config",
        default=DEFAULT_CONFIG_PATH,
        metavar="PATH",
        help=f"YAML configuration file (default: {DEFAULT_CONFIG_PATH})",
    )
    parser.add_argument("--version", action="version", version=f"{AGENT} {__version__}")
    return parser.parse_args(argv)


def main(
    argv: Sequence[str] | None = None, *, runner_type: type[ChallengeRunner] = ChallengeRunner
) -> None:
    """Entry point of ``byteleap-worker``.

    ``runner_type`` exists for the devnet's deliberately dishonest workers (byteleap.devnet); the
    packaged command always runs the honest :class:`ChallengeRunner`.
    """
    args = _parse_args(argv)
    config_path = Path(args.config)
    try:
        cfg = load_config(config_path, WorkerConfig, env_prefix=ENV_PREFIX)
        settings = LinkSettings.from_config(cfg)
        gateway = gateway_settings(cfg) if cfg.gateway.enabled else None
    except ConfigError as exc:
        _die(f"configuration error: {exc}")
    except ValueError as exc:  # LinkSettings: names the key
        _die(f"configuration error: {config_path}: {exc}")
    try:
        secret = read_secret(SECRET_CREDENTIAL, cfg.miner.enrollment_secret_file)
    except CredentialError as exc:
        _die(f"enrollment secret: {exc}")
    state_dir = Path(cfg.state_dir)
    try:  # creates state_dir (0700) with the key on first start
        key = WorkerKey.load_or_create(state_dir / KEY_FILE)
    except IdentityError as exc:
        _die(f"worker key: {exc}")

    setup_logging(AGENT, cfg.logging.level)
    log.info(
        "%s %s starting as worker %s (miner %s)",
        AGENT,
        __version__,
        key.worker_id,
        settings.url,
        extra=log_fields(worker_id=key.worker_id, miner_url=settings.url),
    )
    try:
        code = asyncio.run(_serve(cfg, settings, key, secret, state_dir, runner_type, gateway))
    except KeyboardInterrupt:  # a second Ctrl-C during shutdown
        code = 130
    raise SystemExit(code)


async def _serve(
    cfg: WorkerConfig,
    settings: LinkSettings,
    key: WorkerKey,
    secret: bytes,
    state_dir: Path,
    runner_type: type[ChallengeRunner] = ChallengeRunner,
    gateway: GatewayLinkSettings | None = None,
) -> int:
    loop = asyncio.get_running_loop()
    notifier = Notifier()
    link: WorkerLink | None = None
    gateway_link: GatewayLink | None = None
    stop_requested = asyncio.Event()

    async def on_stop() -> None:
        stop_requested.set()
        if gateway_link is not None:
            await gateway_link.stop()
        if link is not None:
            await link.stop()

    trigger = install_signal_handlers(loop, on_stop, notifier)
    watchdog = asyncio.create_task(run_watchdog(notifier, watchdog_interval()), name="watchdog")
    runner: ChallengeRunner | None = None
    vms: LeaseVmManager | None = None
    try:
        notifier.status("starting: collecting the inventory and setting up challenge devices")
        inv = await asyncio.to_thread(inventory.collect_inventory)
        devices = await asyncio.to_thread(build_devices, cfg, inv)
        runner = runner_type(
            key.worker_id,
            devices,
            max_n=cfg.challenge.max_n,
            result_ttl_s=cfg.challenge.result_ttl_s,
        )
        log.info("challenge devices: %s", ", ".join(runner.device_uuids))
        ready = False
        lines = {"miner": "", "gateway": ""}

        def publish() -> None:
            notifier.status("; ".join(line for line in lines.values() if line))

        def on_status(status: LinkStatus) -> None:
            nonlocal ready
            lines["miner"] = status.line()
            if not ready and status.state in (LinkState.CONNECTED, LinkState.WAITING):
                ready = True
                notifier.ready(lines["miner"])
            elif status.state is not LinkState.STOPPED:
                publish()

        def on_gateway_status(status: GatewayStatus) -> None:
            lines["gateway"] = status.line()
            if ready:
                publish()

        def leased_devices(miner_inventory: wire.Inventory) -> list[str]:
            # Heartbeats name the GPUs leases hold so the roster marks them leased.
            if gateway_link is None:
                return []
            return gateway_link.leased_inventory_uuids(miner_inventory)

        link = WorkerLink(
            settings,
            key=key,
            secret=secret,
            runner=runner,
            state_dir=state_dir,
            leased_devices=leased_devices,
            initial_inventory=inv,
            on_status=on_status,
        )
        if gateway is not None:
            vms = build_lease_vms(cfg, state_dir)
            gateway_link = _gateway_link(
                cfg, gateway, key, state_dir, runner, vms, link, on_gateway_status
            )
        if not stop_requested.is_set():
            await _run_links(link, gateway_link)
    except Exception:
        log.exception("%s failed", AGENT)
        notifier.stopping("failed; see the journal")
        return 1
    finally:
        if runner is not None:
            runner.close()
        if vms is not None:
            await vms.close()  # the VMs keep running: they are libvirt's
        watchdog.cancel()
    if trigger.task is not None:
        await trigger.wait()
    log.info("%s stopped", AGENT)
    return 0


def _gateway_link(
    cfg: WorkerConfig,
    settings: GatewayLinkSettings,
    key: WorkerKey,
    state_dir: Path,
    runner: ChallengeRunner,
    vms: LeaseVmManager,
    link: WorkerLink,
    on_status: Callable[[GatewayStatus], None],
) -> GatewayLink:
    assert cfg.vm is not None  # the config refuses gateway.enabled without it

    def load() -> gateway_enroll.GatewayEnrollment | None:
        return gateway_enroll.GatewayEnrollment.load(state_dir, worker_id=key.worker_id)

    async def enroll() -> gateway_enroll.GatewayEnrollment:
        return await gateway_enroll.enroll(state_dir, key, link.request_gateway_grant)

    return GatewayLink(
        settings,
        key=key,
        vm=cfg.vm,
        vms=vms,
        duty=runner,
        state_dir=state_dir,
        load_enrollment=load,
        enroll=enroll,
        mode="passthrough" if cfg.gpu.mode == "passthrough" else "auto",
        on_status=on_status,
    )


async def _run_links(link: WorkerLink, gateway_link: GatewayLink | None) -> None:
    """Both links until they are stopped; one failing stops the other."""
    tasks = [asyncio.create_task(link.run(), name="miner-link")]
    if gateway_link is not None:
        tasks.append(asyncio.create_task(gateway_link.run(), name="gateway-link"))
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            failure = None if task.cancelled() else task.exception()
            if failure is not None:
                raise failure
    finally:
        if gateway_link is not None:
            await gateway_link.stop()
        await link.stop()
        await asyncio.gather(*tasks, return_exceptions=True)


if __name__ == "__main__":
    main()
