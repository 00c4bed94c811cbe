"""byteleap-worker configuration (/etc/byteleap/worker.yaml, env prefix BYTELEAP_WORKER)."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from ..core import wire
from ..core.config import ConfigStruct, LoggingConfig, PositiveSeconds
from .vm.config import VmSettings

DEFAULT_CONFIG_PATH = "/etc/byteleap/worker.yaml"
ENV_PREFIX = "BYTELEAP_WORKER"

_WS_URL = r"\Awss?://[^\s/]+(/\S*)?\Z"
_FINGERPRINT = r"\A([0-9a-fA-F]{2}:){31}[0-9a-fA-F]{2}\Z|\A[0-9a-fA-F]{64}\Z"


class MinerLink(ConfigStruct, frozen=True, kw_only=True):
    url: Annotated[str, Meta(pattern=_WS_URL)] = "ws://127.0.0.1:7799/worker"
    # The miner's sr25519 hotkey (ss58). Unset: trust the first hotkey seen and pin it in
    # <state_dir>/miner.pin (trust on first use); any other hotkey is refused afterwards.
    hotkey: wire.Hotkey | None = None
    # With wss://, the SHA-256 fingerprint of the miner's certificate (hex, colons optional,
    # as `openssl x509 -noout -fingerprint -sha256` prints it):
    # miners use self-signed certificates, so a pinned fingerprint replaces a CA.
    tls_fingerprint: Annotated[str, Meta(pattern=_FINGERPRINT)] | None = None
    enrollment_secret_file: str = "/etc/byteleap/worker-enrollment.secret"  # noqa: S105 - a path
    connect_timeout_s: PositiveSeconds = 10.0
    reconnect_initial_s: PositiveSeconds = 1.0
    reconnect_max_s: PositiveSeconds = 10.0


class ChallengeSettings(ConfigStruct, frozen=True, kw_only=True):
    backend: Literal["auto", "numpy", "cupy"] = "auto"
    max_n: Annotated[int, Meta(ge=64, le=65536)] = 32768
    result_ttl_s: PositiveSeconds = 300.0


class GpuSettings(ConfigStruct, frozen=True, kw_only=True):
    # host: GPUs stay on the NVIDIA driver (challenges only); passthrough: GPUs live on vfio-pci
    # (leases only); auto: idle GPUs do challenges and are rebound to vfio-pci for a lease.
    mode: Literal["host", "passthrough", "auto"] = "auto"


class GatewaySection(ConfigStruct, frozen=True, kw_only=True):
    # Take leases from a gateway (docs/leased-vms.md): needs a vm: section and ssh_host.
    enabled: bool = False
    # The DNS name or IP address renters reach this host's forwarded SSH ports at.
    ssh_host: (
        Annotated[str, Meta(min_length=1, max_length=253, pattern=r"\A[A-Za-z0-9.:-]+\Z")] | None
    ) = None
    connect_timeout_s: PositiveSeconds = 10.0
    reconnect_initial_s: PositiveSeconds = 1.0
    reconnect_max_s: PositiveSeconds = 60.0
    # Enrolling asks the miner, a validator and the gateway: failures are retried more gently.
    enroll_retry_initial_s: PositiveSeconds = 5.0
    enroll_retry_max_s: PositiveSeconds = 300.0
    # A lease still running this long after its end without word from the gateway is stopped.
    expiry_grace_s: PositiveSeconds = 300.0

    def __post_init__(self) -> None:
        if self.reconnect_max_s < self.reconnect_initial_s:
            raise ValueError("gateway.reconnect_max_s must not be smaller than reconnect_initial_s")
        if self.enroll_retry_max_s < self.enroll_retry_initial_s:
            raise ValueError(
                "gateway.enroll_retry_max_s must not be smaller than enroll_retry_initial_s"
            )


class WorkerConfig(ConfigStruct, frozen=True, kw_only=True):
    state_dir: str = "/var/lib/byteleap/worker"
    miner: MinerLink = msgspec.field(default_factory=MinerLink)
    heartbeat_interval_s: Annotated[float, Meta(ge=1, le=3600)] = 30.0
    challenge: ChallengeSettings = msgspec.field(default_factory=ChallengeSettings)
    gpu: GpuSettings = msgspec.field(default_factory=GpuSettings)
    # Leased VMs (docs/leased-vms.md); without this section the worker takes no leases.
    vm: VmSettings | None = None
    gateway: GatewaySection = msgspec.field(default_factory=GatewaySection)
    logging: LoggingConfig = msgspec.field(default_factory=LoggingConfig)

    def __post_init__(self) -> None:
        if self.vm is not None and self.gpu.mode == "host":
            raise ValueError(
                "vm: leases need gpu.mode auto or passthrough (gpu.mode host keeps every GPU "
                "on the NVIDIA driver)"
            )
        vm = self.vm
        if vm is not None and vm.domain_type == "test" and not vm.libvirt_uri.startswith("test:"):
            raise ValueError(
                "vm: domain_type test is libvirt's test driver: libvirt_uri must be test:///..."
            )
        if self.gateway.enabled:
            if self.vm is None:
                raise ValueError("gateway: enabled needs a vm: section (how leased VMs are built)")
            if self.gateway.ssh_host is None:
                raise ValueError(
                    "gateway: enabled needs ssh_host, the name or address renters reach this "
                    "host's SSH ports at"
                )
