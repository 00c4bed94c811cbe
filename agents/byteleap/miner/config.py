"""byteleap-miner configuration (/etc/byteleap/miner.yaml, env prefix BYTELEAP_MINER)."""

from __future__ import annotations

from typing import Annotated

import msgspec
from msgspec import Meta

from ..chain.config import ChainConfig
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


class ValidatorPolicy(ConfigStruct, frozen=True, kw_only=True):
    """Which validators the miner dials (docs/miner-validator.md) and how it keeps the links."""

    min_stake_tao: Annotated[float, Meta(ge=0, le=1e12)] = 0.0
    """Stake a permitted validator needs before this miner dials it. The default, 0, trusts the
    chain's own gate: a validator permit goes only to the top stakers of the subnet (64 on
    finney). Raise it to ignore permitted validators with little stake behind them: every
    validator dialed may challenge this miner's idle devices."""
    reconnect_min_s: PositiveSeconds = 1.0
    reconnect_max_s: PositiveSeconds = 60.0
    """Cap of the jittered exponential backoff; a validator that refuses this miner (HTTP
    401/403) is retried after between half of it and all of it."""
    roster_interval_s: Annotated[float, Meta(gt=0, le=60)] = 60.0
    """The full worker roster is re-sent at least this often (the protocol's maximum: 60 s)."""
    connect_timeout_s: PositiveSeconds = 10.0
    reveal_timeout_s: PositiveSeconds = 30.0
    """How long a worker gets to reveal the sampled rows of a committed challenge."""

    def __post_init__(self) -> None:
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError("reconnect_max_s must not be smaller than reconnect_min_s")


class MinerConfig(ConfigStruct, frozen=True, kw_only=True):
    state_dir: str = "/var/lib/byteleap/miner"
    workers: WorkerListen = msgspec.field(default_factory=WorkerListen)
    policy: WorkerPolicy = msgspec.field(default_factory=WorkerPolicy)
    chain: ChainConfig = msgspec.field(default_factory=ChainConfig)
    validators: ValidatorPolicy = msgspec.field(default_factory=ValidatorPolicy)
    logging: LoggingConfig = msgspec.field(default_factory=LoggingConfig)
