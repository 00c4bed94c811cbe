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


class WorkerConfig(ConfigStruct, frozen=True, kw_only=True):
    state_dir: str = "/var/lib/byteleap/worker"
    miner: MinerLink = msgspec.field(default_factory=MinerLink)
    heartbeat_interval_s: Annotated[float, Meta(ge=1, le=3600)] = 30.0
    challenge: ChallengeSettings = msgspec.field(default_factory=ChallengeSettings)
    gpu: GpuSettings = msgspec.field(default_factory=GpuSettings)
    # Leased VMs (docs/leased-vms.md); without this section the worker takes no leases.
    vm: VmSettings | None = None
    logging: LoggingConfig = msgspec.field(default_factory=LoggingConfig)

    def __post_init__(self) -> None:
        if self.vm is not None and self.gpu.mode == "host":
            raise ValueError(
                "vm: leases need gpu.mode auto or passthrough (gpu.mode host keeps every GPU "
                "on the NVIDIA driver)"
            )
