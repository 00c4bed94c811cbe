"""The one-box devnet (DESIGN §9): every agent as a real process on loopback.

:class:`Devnet` lays out a directory with a devnet chain, dev hotkeys, enrollment secrets and one
YAML config per agent, then starts a validator, the miners and their CPU workers exactly as an
operator would (``python -m byteleap.<agent>.agent --config ...``), waits for every worker to be
online at the validator, lets the validator run its challenge rounds and scoring cycles, and
reads back what happened from the validator's store and the chain.

Roles for demonstrations and tests:

* ``cheaters`` run :mod:`byteleap.devnet.adversary` (honest commit, garbage reveal);
* ``flaky`` workers are stopped and restarted by the devnet every other round, so they are
  offline about half the time.

With ``gateway`` the devnet also runs a gateway (:mod:`byteleap.gateway.agent`) with its own CA,
a validator API key and a renter key; the validator reads its signed lease feed (``gateways:``,
polled every second) and hands out its enrollment tokens. Every worker gets a ``vm:`` section on
libvirt's test driver with simulated GPUs (:mod:`byteleap.worker.vm.simulated`) and enrolls with
the gateway through its miner and the validator. A simulated renter then rents one GPU of the
first honest worker through the REST API with a fresh Ed25519 SSH key, for about half of the
rounds: the printed scores show that worker's lease time, and its miner ranks higher.

Workers are spread over the miners round-robin, cheaters and flaky ones first, so that with two
miners the first gets the cheater and the second the flaky worker.

Everything is on 127.0.0.1 with freshly chosen ports; keys are dev URIs
(``//byteleap-devnet/...``) that are worthless outside this machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ..chain.devnet import DevnetChain
from ..core.files import write_new_file
from ..core.identity import HotkeySigner, IdentityError, WorkerKey
from ..gateway.agent import StartupError, prepare_keys
from ..gateway.ca import client_tls_context
from ..gateway.config import GatewayConfig
from ..gateway.keys import KEY_PREFIXES, new_secret, secret_hash
from ..gateway.store import StoreError as GatewayStoreError
from ..gateway.store import open_store as open_gateway_store
from ..validator.store import CycleRecord, Store, StoreError, open_store
from ..worker.agent import KEY_FILE
from ..worker.vm import VmError, run_tool
from ..worker.vm.simulated import simulated_host_xml

__all__ = [
    "Devnet",
    "DevnetError",
    "DevnetLease",
    "DevnetPlan",
    "DevnetReport",
    "WorkerRole",
]

log = logging.getLogger("byteleap.devnet")

NETUID = 128
VALIDATOR_URI = "//byteleap-devnet/validator"
TAO = 10**9
VALIDATOR_STAKE_RAO = 1000 * TAO
BLOCK_TIME_S = 0.25
WEIGHTS_RATE_LIMIT_BLOCKS = 4  # 1 s: every devnet round may set weights
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0
GATEWAY_NAME = "devnet"
GPUS_PER_WORKER = 2
VM_VCPUS_PER_GPU = 2
VM_MEMORY_MIB_PER_GPU = 1024
VM_DISK_GIB = 1
BASE_IMAGE_SIZE = "64M"
LEASE_POLL_S = 0.25


class DevnetError(Exception):
    """The devnet could not be brought up or did not progress; the message says which part."""


class WorkerRole(msgspec.Struct, frozen=True):
    name: str
    miner: int
    kind: str
    """``honest``, ``cheater`` or ``flaky``."""


@dataclass(frozen=True, slots=True)
class DevnetPlan:
    miners: int = 1
    workers: int = 3
    cheaters: int = 0
    flaky: int = 0
    rounds: int = 3
    round_interval_s: int = 4
    n: int = 512
    """Matrix size of the CPU challenges (a multiple of 64)."""
    gateway: bool = False
    """Run a gateway, give workers simulated GPUs and rent one out (module docstring)."""

    def __post_init__(self) -> None:
        if not 1 <= self.miners <= 16:
            raise DevnetError("miners must be between 1 and 16")
        if not 1 <= self.workers <= 100:
            raise DevnetError("workers must be between 1 and 100")
        if self.cheaters < 0 or self.flaky < 0 or self.cheaters + self.flaky > self.workers:
            raise DevnetError("cheaters + flaky must be between 0 and the number of workers")
        if self.rounds < 1:
            raise DevnetError("rounds must be at least 1")
        if self.round_interval_s < 2:
            raise DevnetError("round_interval_s must be at least 2 seconds")
        if self.n < 64 or self.n % 64:
            raise DevnetError("n must be a positive multiple of 64")

    def roles(self) -> list[WorkerRole]:
        kinds = ["cheater"] * self.cheaters + ["flaky"] * self.flaky
        kinds += ["honest"] * (self.workers - len(kinds))
        return [
            WorkerRole(name=f"worker-{i + 1}", miner=i % self.miners, kind=kind)
            for i, kind in enumerate(kinds)
        ]

    @property
    def lease_s(self) -> float:
        """How long the simulated renter keeps its GPU: about half of the rounds."""
        return float(self.round_interval_s * max(1, self.rounds // 2))

    def leased_role(self) -> WorkerRole | None:
        """The worker whose GPU the simulated renter rents: the first honest one."""
        if not self.gateway:
            return None
        return next((r for r in self.roles() if r.kind == "honest"), None)

    def scoring(self) -> dict[str, Any]:
        """Windows sized to the run, so a worker present in every round scores near 1."""
        bucket = self.round_interval_s
        window_s = bucket * (self.rounds + 1)
        return {
            "window_hours": window_s / 3600,
            "bucket_seconds": bucket,
            "challenge_window_minutes": window_s / 60,
            "challenge_interval_seconds": float(self.round_interval_s),
        }


class DevnetLease(msgspec.Struct, frozen=True, kw_only=True):
    """The simulated renter's lease as the gateway reports it."""

    lease_id: str
    worker: str
    """The worker's devnet name."""
    state: str
    device_uuids: list[str]
    started_at: float | None = None
    ended_at: float | None = None
    end_reason: str | None = None
    ssh: str | None = None
    """``renter@host -p port`` while it ran."""


class DevnetReport(msgspec.Struct, frozen=True, kw_only=True):
    cycle: CycleRecord
    roles: dict[str, WorkerRole]
    """worker_id -> role."""
    miner_names: dict[str, str]
    """miner hotkey -> ``miner-N``."""
    chain_weights: dict[int, dict[int, int]]
    validator_uid: int
    lease: DevnetLease | None = None


@dataclass
class _Process:
    name: str
    argv: list[str]
    log_path: Path
    proc: asyncio.subprocess.Process | None = None
    restarts: int = 0
    log_file: Any = field(default=None, repr=False)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def start(self, env: dict[str, str]) -> None:
        self.log_file = self.log_path.open("ab")
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=self.log_file,
            stderr=asyncio.subprocess.STDOUT,
            env=env,
        )

    async def stop(self, timeout: float = STOP_TIMEOUT_S) -> int | None:  # noqa: ASYNC109
        proc = self.proc
        if proc is None:
            return None
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(timeout):
                    await proc.wait()
            except TimeoutError:
                log.warning("%s ignored SIGTERM for %g s: killing it", self.name, timeout)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        if self.log_file is not None:
            self.log_file.close()
            self.log_file = None
        return proc.returncode

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _write_yaml(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


class Devnet:
    """One devnet run in ``root`` (created if needed). Use ``async with``; see :meth:`run`."""

    def __init__(
        self,
        plan: DevnetPlan,
        root: Path,
        *,
        progress: Callable[[str], None] = lambda line: None,
        python: str = sys.executable,
        store_url: str | None = None,
    ) -> None:
        """``store_url``: the validator's store (default: SQLite in ``root``)."""
        self.plan = plan
        self.root = root
        self._store_url = store_url
        self._progress = progress
        self._python = python
        self._processes: list[_Process] = []
        self._validator: _Process | None = None
        self._gateway: _Process | None = None
        self._gateway_api = ""
        self._gateway_ca_pem = ""
        self._renter_key = ""
        self._lease_id: str | None = None
        self._workers: dict[str, _Process] = {}
        self._roles = plan.roles()
        self._miner_hotkeys: list[str] = []
        self._validator_hotkey = ""
        self._store: Store | None = None
        self._flaky_task: asyncio.Task[None] | None = None
        self._env = dict(os.environ)
        self._env.pop("NOTIFY_SOCKET", None)  # our children are not systemd services
        self._env["PYTHONUNBUFFERED"] = "1"

    # ------------------------------------------------------------------ layout

    @property
    def chain_path(self) -> Path:
        return self.root / "chain.db"

    @property
    def store_url(self) -> str:
        if self._store_url is not None:
            return self._store_url
        return f"sqlite:///{self.root / 'validator' / 'validator.db'}"

    def logs(self) -> Path:
        return self.root / "logs"

    def _command(self, module: str, config: Path, *extra: str) -> list[str]:
        return [self._python, "-m", module, "--config", str(config), *extra]

    def prepare(self) -> None:
        """Write the chain, keys and configs (nothing is started)."""
        plan = self.plan
        self.root.mkdir(parents=True, exist_ok=True)
        self.logs().mkdir(exist_ok=True)
        chain = DevnetChain.create(
            self.chain_path,
            netuid=NETUID,
            block_time=BLOCK_TIME_S,
            weights_rate_limit=WEIGHTS_RATE_LIMIT_BLOCKS,
        )
        validator = HotkeySigner.from_uri(VALIDATOR_URI)
        self._validator_hotkey = validator.ss58_address
        chain.register(
            NETUID, validator.ss58_address, stake_rao=VALIDATOR_STAKE_RAO, validator_permit=True
        )
        chain_section = {
            "network": "devnet",
            "devnet_path": str(self.chain_path),
            "netuid": NETUID,
            "snapshot_refresh_s": 2.0,
        }
        gateways = [self._prepare_gateway()] if plan.gateway else []
        port = _free_port()
        validator_config = _write_yaml(
            self.root / "validator.yaml",
            {
                "state_dir": str(self.root / "validator"),
                "listen": {
                    "host": "127.0.0.1",
                    "port": port,
                    "public_ip": "127.0.0.1",
                    "public_port": port,
                },
                "chain": chain_section,
                "store": {"url": self.store_url},
                "rounds": {
                    "interval_s": float(plan.round_interval_s),
                    "cpu_n": plan.n,
                    "commit_deadline_s": 20.0,
                    "reveal_deadline_s": 20.0,
                },
                "scoring": plan.scoring(),
                "weights": {"interval_s": 0.0},
                "gateways": gateways,
            },
        )
        self._validator = _Process(
            "validator",
            self._command(
                "byteleap.validator.agent", validator_config, "--hotkey-uri", VALIDATOR_URI
            ),
            self.logs() / "validator.log",
        )
        self._processes.append(self._validator)

        miner_ports: list[int] = []
        secret_files: list[Path] = []
        for index in range(plan.miners):
            name = f"miner-{index + 1}"
            uri = f"//byteleap-devnet/{name}"
            hotkey = HotkeySigner.from_uri(uri).ss58_address
            self._miner_hotkeys.append(hotkey)
            chain.register(NETUID, hotkey)
            secret = self.root / f"{name}.secret"
            write_new_file(secret, secrets.token_hex(32).encode() + b"\n")
            secret_files.append(secret)
            miner_port = _free_port()
            miner_ports.append(miner_port)
            config = _write_yaml(
                self.root / f"{name}.yaml",
                {
                    "state_dir": str(self.root / name),
                    "workers": {"host": "127.0.0.1", "port": miner_port},
                    "policy": {
                        "enrollment_secret_file": str(secret),
                        "heartbeat_interval_s": 1.0,
                        "heartbeat_timeout_s": 10.0,
                    },
                    "chain": chain_section,
                    "validators": {"min_stake_tao": 0.0},
                },
            )
            self._processes.append(
                _Process(
                    name,
                    self._command(
                        "byteleap.miner.agent",
                        config,
                        "--hotkey-uri",
                        uri,
                        "--control-socket",
                        str(self.root / f"{name}.sock"),
                    ),
                    self.logs() / f"{name}.log",
                )
            )

        base_image = self._base_image() if plan.gateway else None
        for role in self._roles:
            worker: dict[str, Any] = {
                "state_dir": str(self.root / role.name),
                "miner": {
                    "url": f"ws://127.0.0.1:{miner_ports[role.miner]}/worker",
                    "hotkey": self._miner_hotkeys[role.miner],
                    "enrollment_secret_file": str(secret_files[role.miner]),
                    "reconnect_initial_s": 0.5,
                    "reconnect_max_s": 2.0,
                },
                "heartbeat_interval_s": 1.0,
                "challenge": {"backend": "numpy"},
                "gpu": {"mode": "host"},
            }
            if base_image is not None:
                worker.update(self._lease_sections(role, *base_image))
            config = _write_yaml(self.root / f"{role.name}.yaml", worker)
            if role.kind == "cheater":
                argv = [
                    self._python,
                    "-m",
                    "byteleap.devnet.adversary",
                    "garbage-reveal",
                    "--config",
                    str(config),
                ]
            else:
                argv = self._command("byteleap.worker.agent", config)
            process = _Process(role.name, argv, self.logs() / f"{role.name}.log")
            self._workers[role.name] = process
            self._processes.append(process)

    def _prepare_gateway(self) -> dict[str, Any]:
        """The gateway's config, keys, store and API keys; returns the validator's entry."""
        state = self.root / "gateway"
        store_url = f"sqlite:///{state / 'gateway.db'}"
        data: dict[str, Any] = {
            "state_dir": str(state),
            "public_names": ["127.0.0.1"],
            "api": {"host": "127.0.0.1", "port": _free_port()},
            "workers": {
                "host": "127.0.0.1",
                "port": _free_port(),
                "heartbeat_interval_s": 1.0,
                "heartbeat_timeout_s": 10.0,
                "revocation_check_s": 1.0,
            },
            "leases": {
                # Checkpoints every second: credit follows the VM closely on a short run.
                "checkpoint_s": 1.0,
                "worker_grace_s": 30.0,
                "start_timeout_s": 60.0,
                "min_duration_s": 1.0,
                "vcpus_per_gpu": VM_VCPUS_PER_GPU,
                "memory_mib_per_gpu": VM_MEMORY_MIB_PER_GPU,
                "disk_gib_per_gpu": VM_DISK_GIB,
                "tick_s": 0.25,
            },
            "store": {"url": store_url},
        }
        config_path = _write_yaml(self.root / "gateway.yaml", data)
        config = msgspec.convert(data, GatewayConfig)
        try:
            ca, signer = prepare_keys(config)
        except StartupError as exc:
            raise DevnetError(f"gateway key material: {exc}") from None
        validator_key = new_secret(KEY_PREFIXES["validator"])
        self._renter_key = new_secret(KEY_PREFIXES["renter"])
        try:
            store = open_gateway_store(store_url)
            try:
                store.upgrade()
                store.bind_gateway_id(signer.gateway_id)
                now = time.time()
                store.add_api_key("validator", "devnet-validator", secret_hash(validator_key), now)
                store.add_api_key("renter", "devnet-renter", secret_hash(self._renter_key), now)
            finally:
                store.close()
        except GatewayStoreError as exc:
            raise DevnetError(f"gateway store: {exc}") from None
        key_file = self.root / f"gateway-{GATEWAY_NAME}.key"
        write_new_file(key_file, validator_key.encode("ascii") + b"\n")
        self._gateway_api = config.api_url
        self._gateway_ca_pem = ca.cert_pem
        self._gateway = _Process(
            "gateway",
            self._command("byteleap.gateway.agent", config_path),
            self.logs() / "gateway.log",
        )
        self._processes.append(self._gateway)
        return {
            "name": GATEWAY_NAME,
            "url": config.api_url,
            "ca_file": str(state / "ca.crt"),
            "signing_public_key": signer.public_key.hex(),
            "api_key_file": str(key_file),
            "poll_interval_s": 1.0,
            "lease_grace_s": 5.0,
        }

    def _base_image(self) -> tuple[Path, str]:
        """An empty qcow2 base image for the simulated VMs, and its SHA-256."""
        path = self.root / "base.qcow2"
        try:
            run_tool(
                ["qemu-img", "create", "-q", "-f", "qcow2", str(path), BASE_IMAGE_SIZE],
                what="creating the devnet's VM base image",
                timeout_s=60.0,
            )
        except VmError as exc:
            raise DevnetError(f"{exc} (bin/dev-deps installs qemu-utils)") from None
        if shutil.which("genisoimage") is None:
            raise DevnetError(
                "leased VMs need genisoimage for their cloud-init seed (bin/dev-deps installs it)"
            )
        return path, hashlib.sha256(path.read_bytes()).hexdigest()

    def _lease_sections(self, role: WorkerRole, base: Path, digest: str) -> dict[str, Any]:
        """A worker's ``vm:`` (libvirt's test driver, simulated GPUs) and ``gateway:``."""
        node = self.root / f"{role.name}.node.xml"
        node.write_text(simulated_host_xml(GPUS_PER_WORKER), encoding="utf-8")
        return {
            "gpu": {"mode": "auto"},
            "vm": {
                "libvirt_uri": f"test://{node.absolute()}",
                "domain_type": "test",
                "vm_dir": str(self.root / "vms" / role.name),
                "base_image": str(base),
                "base_image_sha256": digest,
                "max_disk_gib": VM_DISK_GIB * GPUS_PER_WORKER,
                "vcpus_per_gpu": VM_VCPUS_PER_GPU,
                "memory_mib_per_gpu": VM_MEMORY_MIB_PER_GPU,
                "firmware": "bios",
                "shutdown_timeout_s": 1.0,
                "tool_timeout_s": 30.0,
            },
            "gateway": {
                "enabled": True,
                "ssh_host": "127.0.0.1",
                "reconnect_initial_s": 0.5,
                "reconnect_max_s": 2.0,
                "enroll_retry_initial_s": 1.0,
                "enroll_retry_max_s": 4.0,
            },
        }

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Devnet:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Start every process and wait until every worker is online at the validator."""
        if self._validator is None:
            self.prepare()
        if self._gateway is not None:  # first: workers enroll with it as soon as they start
            await self._gateway.start(self._env)
            await self._gateway_ready()
            self._progress(f"started gateway at {self._gateway_api}")
        workers = set(self._workers)
        for process in self._processes:
            if process is not self._gateway and process.name not in workers:
                await process.start(self._env)
        if self._gateway is not None:
            # Workers enroll through their miner and the validator: let the miners connect first.
            await self._miners_connected()
        for process in self._processes:
            if process.name in workers:
                await process.start(self._env)
        self._progress(
            f"started validator, {self.plan.miners} miner(s), {self.plan.workers} worker(s)"
        )
        expected = len(self._roles)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            self._check_alive()
            online = await self._online_workers()
            if online >= expected:
                break
            if time.monotonic() > deadline:
                raise DevnetError(
                    f"only {online} of {expected} workers came online at the validator within "
                    f"{START_TIMEOUT_S:g} s; logs in {self.logs()}"
                )
            await asyncio.sleep(0.25)
        self._progress(f"all {expected} workers online at the validator")
        if any(role.kind == "flaky" for role in self._roles):
            self._flaky_task = asyncio.create_task(self._flap(), name="devnet-flaky")

    async def run(self) -> DevnetReport:
        """Start, wait for ``plan.rounds`` scoring cycles with weights on chain, report."""
        await self.start()
        if self.plan.gateway:
            await self._rent()
        first = await self._cycles()
        target = first + self.plan.rounds
        timeout = self.plan.rounds * (self.plan.round_interval_s + 45.0) + 30.0
        deadline = time.monotonic() + timeout
        seen = first
        while True:
            self._check_alive()
            cycles = await self._cycles()
            if cycles > seen:
                seen = cycles
                self._progress(f"round {min(cycles - first, self.plan.rounds)} scored")
            if cycles >= target:
                report = await self.report()
                if report.cycle.weights is not None and report.cycle.weights.status in (
                    "submitted",
                    "skipped",
                ):
                    return report
            if time.monotonic() > deadline:
                raise DevnetError(
                    f"{cycles - first} of {self.plan.rounds} rounds scored within {timeout:g} s; "
                    f"logs in {self.logs()}"
                )
            await asyncio.sleep(0.25)

    async def stop(self) -> dict[str, int | None]:
        """SIGTERM everything (workers first, then miners, the validator, the gateway); returns
        exit codes."""
        if self._flaky_task is not None:
            self._flaky_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flaky_task
            self._flaky_task = None
        codes: dict[str, int | None] = {}
        ordered = list(reversed(self._processes))  # workers, miners, then the validator
        for group in (
            [p for p in ordered if p.name.startswith("worker")],
            [p for p in ordered if p.name.startswith("miner")],
            [p for p in ordered if p.name == "validator"],
            [p for p in ordered if p.name == "gateway"],
        ):
            results = await asyncio.gather(*(p.stop() for p in group))
            codes.update({p.name: code for p, code in zip(group, results, strict=True)})
        if self._store is not None:
            self._store.close()
            self._store = None
        return codes

    async def kill_validator(self) -> None:
        """SIGKILL the validator (fault tests): no drain, no sweep, whatever it was doing."""
        assert self._validator is not None and self._validator.proc is not None
        with contextlib.suppress(ProcessLookupError):
            self._validator.proc.kill()
        await self._validator.stop()

    async def start_validator(self) -> None:
        assert self._validator is not None
        self._validator.restarts += 1
        await self._validator.start(self._env)

    def store(self) -> Store:
        """The validator's store, opened read-write by the devnet (for reports and tests)."""
        if self._store is None:
            self._store = open_store(self.store_url)
        return self._store

    @property
    def validator_pid(self) -> int | None:
        proc = None if self._validator is None else self._validator.proc
        return None if proc is None or proc.returncode is not None else proc.pid

    # ------------------------------------------------------------------ observation

    def _check_alive(self) -> None:
        for process in self._processes:
            if process.proc is None or process.running:
                continue
            if process.name in self._workers and self._role(process.name).kind == "flaky":
                continue  # stopped on purpose
            raise DevnetError(
                f"{process.name} exited with code {process.proc.returncode}:\n{process.tail()}"
            )

    def _role(self, name: str) -> WorkerRole:
        return next(r for r in self._roles if r.name == name)

    async def _open_store(self) -> Store | None:
        """:meth:`store`, or None while the validator has not created its SQLite file yet."""
        sqlite_file = self.root / "validator" / "validator.db"
        if self._store is None and self._store_url is None and not sqlite_file.exists():
            return None
        try:
            return await asyncio.to_thread(self.store)
        except StoreError:
            return None

    async def _online_workers(self) -> int:
        store = await self._open_store()
        if store is None:
            return 0
        try:
            status = await asyncio.to_thread(store.status)
        except StoreError:  # schema not created yet, or busy
            return 0
        return status.online_workers

    async def _miners_connected(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            self._check_alive()
            store = await self._open_store()
            known = 0
            if store is not None:
                with contextlib.suppress(StoreError):
                    known = (await asyncio.to_thread(store.status)).miners
            if known >= self.plan.miners:
                return
            if time.monotonic() > deadline:
                raise DevnetError(
                    f"only {known} of {self.plan.miners} miners reached the validator within "
                    f"{START_TIMEOUT_S:g} s; logs in {self.logs()}"
                )
            await asyncio.sleep(0.25)

    async def _cycles(self) -> int:
        store = await self._open_store()
        if store is None:
            return 0
        try:
            return (await asyncio.to_thread(store.status)).cycles
        except StoreError:
            return 0

    async def _flap(self) -> None:
        """Flaky workers: one round interval off, one on, until the devnet stops."""
        flaky = [self._workers[r.name] for r in self._roles if r.kind == "flaky"]
        period = float(self.plan.round_interval_s)
        while True:
            await asyncio.gather(*(p.stop() for p in flaky))
            await asyncio.sleep(period)
            for process in flaky:
                process.restarts += 1
                await process.start(self._env)
            await asyncio.sleep(period)

    # ------------------------------------------------------------------ the renter

    def _gateway_http(self) -> aiohttp.ClientSession:
        """The renter's HTTPS client: the gateway's CA is the only trust root."""
        return aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=client_tls_context(self._gateway_ca_pem)),
            headers={"Authorization": f"Bearer {self._renter_key}"},
            timeout=aiohttp.ClientTimeout(total=10.0),
        )

    async def _gateway_call(
        self, http: aiohttp.ClientSession, method: str, path: str, body: Any = None
    ) -> tuple[int, Any]:
        data = None if body is None else msgspec.json.encode(body)
        async with http.request(method, self._gateway_api + path, data=data) as response:
            raw = await response.read()
            return response.status, msgspec.json.decode(raw) if raw else None

    async def _gateway_ready(self) -> None:
        assert self._gateway is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        async with self._gateway_http() as http:
            while True:
                self._check_alive()
                with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
                    status, _ = await self._gateway_call(http, "GET", "/v1/gpus")
                    if status == 200:
                        return
                if time.monotonic() > deadline:
                    raise DevnetError(
                        f"the gateway did not answer within {START_TIMEOUT_S:g} s:\n"
                        f"{self._gateway.tail()}"
                    )
                await asyncio.sleep(LEASE_POLL_S)

    async def _rent(self) -> None:
        """Rent one GPU of :meth:`DevnetPlan.leased_role`'s worker and wait until it runs."""
        role = self.plan.leased_role()
        if role is None:
            self._progress("renter: no honest worker to rent a GPU from")
            return
        worker_id = self._worker_id(role.name)
        if worker_id is None:
            raise DevnetError(f"{role.name} has no worker key; logs in {self.logs()}")
        public = Ed25519PrivateKey.generate().public_key()
        ssh_key = (
            public.public_bytes(
                serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
            ).decode("ascii")
            + " devnet-renter"
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        async with self._gateway_http() as http:
            while True:  # the worker enrolls through its miner and the validator first
                self._check_alive()
                status, listed = await self._gateway_call(http, "GET", "/v1/gpus")
                if status == 200 and any(
                    w["worker_id"] == worker_id and w["idle"] >= 1 for w in listed["workers"]
                ):
                    break
                if time.monotonic() > deadline:
                    raise DevnetError(
                        f"{role.name} did not come online at the gateway with an idle GPU "
                        f"within {START_TIMEOUT_S:g} s; logs in {self.logs()}"
                    )
                await asyncio.sleep(LEASE_POLL_S)
            status, lease = await self._gateway_call(
                http,
                "POST",
                "/v1/leases",
                {
                    "gpus": 1,
                    "worker_id": worker_id,
                    "ssh_public_key": ssh_key,
                    "duration_s": self.plan.lease_s,
                },
            )
            if status != 201:
                raise DevnetError(f"the gateway refused the lease: HTTP {status} {lease}")
            self._lease_id = str(lease["lease_id"])
            while True:
                self._check_alive()
                status, view = await self._gateway_call(http, "GET", f"/v1/leases/{self._lease_id}")
                if status == 200 and view["state"] == "running":
                    break
                if status != 200 or view["state"] in ("failed", "ended"):
                    raise DevnetError(f"the lease did not start: HTTP {status} {view}")
                if time.monotonic() > deadline:
                    raise DevnetError(
                        f"the lease did not start within {START_TIMEOUT_S:g} s; "
                        f"logs in {self.logs()}"
                    )
                await asyncio.sleep(LEASE_POLL_S)
        ssh = view["ssh"]
        self._progress(
            f"renter: leased a GPU of {role.name} for {self.plan.lease_s:g} s "
            f"(ssh {ssh['user']}@{ssh['host']} -p {ssh['port']})"
        )

    async def _lease_report(self) -> DevnetLease | None:
        role = self.plan.leased_role()
        if self._lease_id is None or role is None:
            return None
        async with self._gateway_http() as http:
            try:
                status, view = await self._gateway_call(http, "GET", f"/v1/leases/{self._lease_id}")
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                raise DevnetError(f"cannot read the lease from the gateway: {exc}") from None
        if status != 200:
            raise DevnetError(f"cannot read the lease from the gateway: HTTP {status} {view}")
        ssh = view.get("ssh")
        return DevnetLease(
            lease_id=self._lease_id,
            worker=role.name,
            state=view["state"],
            device_uuids=list(view["device_uuids"]),
            started_at=view.get("started_at"),
            ended_at=view.get("ended_at"),
            end_reason=view.get("end_reason"),
            ssh=None if not ssh else f"{ssh['user']}@{ssh['host']} -p {ssh['port']}",
        )

    async def report(self) -> DevnetReport:
        store = await self._open_store()
        if store is None:
            raise DevnetError("the validator has not created its store")
        cycle = await asyncio.to_thread(store.latest_cycle)
        if cycle is None:
            raise DevnetError("the validator has not scored yet")
        chain = DevnetChain(self.chain_path)
        try:
            weights = await chain.weights(NETUID)
            validator_uid = await chain.uid_of(NETUID, self._validator_hotkey)
        finally:
            await chain.close()
        roles: dict[str, WorkerRole] = {}
        for role in self._roles:
            worker_id = self._worker_id(role.name)
            if worker_id is not None:
                roles[worker_id] = role
        return DevnetReport(
            cycle=cycle,
            roles=roles,
            miner_names={hk: f"miner-{i + 1}" for i, hk in enumerate(self._miner_hotkeys)},
            chain_weights=weights,
            validator_uid=-1 if validator_uid is None else validator_uid,
            lease=await self._lease_report(),
        )

    def _worker_id(self, name: str) -> str | None:
        """The worker_id the worker derived from the key it created in its state directory."""
        try:
            return WorkerKey.load(self.root / name / KEY_FILE).worker_id
        except IdentityError:
            return None


def default_root() -> Path:
    """A fresh private directory for one devnet run."""
    return Path(tempfile.mkdtemp(prefix="byteleap-devnet-"))
