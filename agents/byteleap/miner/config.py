"""byteleap-miner configuration (/etc/byteleap/miner.yaml, env prefix BYTELEAP_MINER)."""

from __future__ import annotations

from typing import Annotated

import msgspec
from msgspec import Meta

from ..core.config import ConfigStruct, LoggingConfig, Port, PositiveSeconds
from .registry import MAX_WORKERS

DEFAULT_CONFIG_PATH = "/etc/byteleap/miner.yaml"
ENV_PREFIX = "BYTELEAP_MINER"


class WorkerListen(ConfigStruct, frozen=True, kw_only=True):
    """The WebSocket endpoint workers dial."""

    host: str = "0.0.0.0"  # noqa: S104 - workers on other hosts must reach it; auth is mandatory
    port: Port = 7799
    path: str = "/worker"
    # TLS is optional because every frame is authenticated and encrypted by the session layer;
    # with TLS, workers pin the certificate's SHA-256 fingerprint.
    tls_cert_file: str | None = None
    tls_key_file: str | None = None


class WorkerPolicy(ConfigStruct, frozen=True, kw_only=True):
    max_workers: Annotated[int, Meta(ge=1, le=MAX_WORKERS)] = MAX_WORKERS
    enrollment_secret_file: str = "/etc/byteleap/miner-enrollment.secret"  # noqa: S105 - a path
    heartbeat_interval_s: PositiveSeconds = 30.0
    heartbeat_timeout_s: PositiveSeconds = 90.0
    handshake_timeout_s: PositiveSeconds = 10.0
    max_connections: Annotated[int, Meta(ge=1, le=10000)] = 150
    messages_per_second: Annotated[float, Meta(gt=0)] = 20.0
    message_burst: Annotated[int, Meta(ge=1)] = 50


class MinerConfig(ConfigStruct, frozen=True, kw_only=True):
    state_dir: str = "/var/lib/byteleap/miner"
    workers: WorkerListen = msgspec.field(default_factory=WorkerListen)
    policy: WorkerPolicy = msgspec.field(default_factory=WorkerPolicy)
    logging: LoggingConfig = msgspec.field(default_factory=LoggingConfig)
