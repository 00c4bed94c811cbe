"""byteleap-gateway configuration (/etc/byteleap/gateway.yaml, env prefix BYTELEAP_GATEWAY).

Sections: ``public_names`` (the DNS names and IP addresses the gateway's server certificate
carries; the first one builds the default URLs), ``api`` (the HTTPS listener for renters,
validators and enrollment), ``workers`` (the mTLS WebSocket listener for workers), ``tls``
(certificate lifetimes), ``tokens``, ``leases``, ``auth``, ``store`` and ``logging``.

Key material lives in ``state_dir`` (created on first start or by ``byteleapctl gateway init``,
mode 0600) unless the unit hands it over as systemd credentials: ``ca-key`` (the CA's private key)
and ``signing-key`` (the Ed25519 lease-signing key), both PEM. The store URL can come from the
credential ``store-url`` or ``store.url_file`` (it may hold a password); messages never show it.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Final

import msgspec
from msgspec import Meta

from ..core.config import ConfigStruct, LoggingConfig, Port, PositiveSeconds
from ..core.sqlstore import STORE_URL_CREDENTIAL, SqlStoreSettings, StoreUrlError

__all__ = [
    "CA_KEY_CREDENTIAL",
    "DEFAULT_CONFIG_PATH",
    "ENV_PREFIX",
    "SIGNING_KEY_CREDENTIAL",
    "STORE_URL_CREDENTIAL",
    "ApiListen",
    "AuthSettings",
    "GatewayConfig",
    "LeaseSettings",
    "StoreSettings",
    "StoreUrlError",
    "TlsSettings",
    "TokenSettings",
    "WorkerListen",
    "key_path",
    "url_host",
]

DEFAULT_CONFIG_PATH: Final = "/etc/byteleap/gateway.yaml"
ENV_PREFIX: Final = "BYTELEAP_GATEWAY"
CA_KEY_CREDENTIAL: Final = "ca-key"
SIGNING_KEY_CREDENTIAL: Final = "signing-key"

_DNS_LABEL: Final = re.compile(r"\A(?!-)[A-Za-z0-9-]{1,63}(?<!-)\Z")

Days = Annotated[int, Meta(ge=1, le=3650)]


def _check_name(name: str) -> None:
    try:
        ipaddress.ip_address(name)
        return
    except ValueError:
        pass
    labels = name.rstrip(".").split(".")
    if len(name) > 253 or not all(_DNS_LABEL.match(label) for label in labels):
        raise ValueError(f"public_names: {name!r} is neither an IP address nor a DNS name")


def key_path(
    state_dir: Path, credential: str, file_name: str, environ: Mapping[str, str]
) -> tuple[Path, bool]:
    """Where a key is, and whether it is the systemd credential ``credential`` (then it is
    never created): the credential when the unit hands one over (even a dangling link, so
    that it is refused rather than replaced), else ``state_dir / file_name``."""
    directory = environ.get("CREDENTIALS_DIRECTORY")
    if directory:
        candidate = Path(directory) / credential
        if candidate.exists() or candidate.is_symlink():
            return candidate, True
    return state_dir / file_name, False


def url_host(name: str) -> str:
    """``name`` as the host part of a URL (IPv6 addresses in brackets)."""
    try:
        if ipaddress.ip_address(name).version == 6:
            return f"[{name}]"
    except ValueError:
        pass
    return name


def _check_url(url: str | None, scheme: str, where: str) -> None:
    if url is None:
        return
    if not url.startswith(scheme + "://") or any(c.isspace() for c in url) or url.endswith("/"):
        raise ValueError(f"{where} must start with {scheme}:// and not end with '/'")


def _check_path(path: str) -> None:
    if not path.startswith("/") or any(c.isspace() or c in "?#" for c in path):
        raise ValueError(f"path must start with '/' and hold no spaces, '?' or '#': {path!r}")


class ApiListen(ConfigStruct, frozen=True, kw_only=True):
    """The HTTPS listener of renters, validators and enrolling workers."""

    host: str = "0.0.0.0"  # noqa: S104 - renters and validators are remote; every route authenticates
    port: Port = 8443
    public_url: str | None = None
    """``https://host:port`` as others reach it; unset: the first public name and ``port``."""
    max_body_bytes: Annotated[int, Meta(ge=1024, le=1 << 20)] = 64 * 1024

    def __post_init__(self) -> None:
        _check_url(self.public_url, "https", "api.public_url")


class WorkerListen(ConfigStruct, frozen=True, kw_only=True):
    """The mTLS WebSocket listener workers dial (client certificates from the gateway's CA)."""

    host: str = "0.0.0.0"  # noqa: S104 - workers are remote; a CA-issued client certificate is required
    port: Port = 8444
    path: str = "/v1/worker"
    public_url: str | None = None
    """``wss://host:port/path`` as workers reach it; unset: the first public name, port, path."""
    hello_timeout_s: PositiveSeconds = 10.0
    heartbeat_interval_s: PositiveSeconds = 15.0
    heartbeat_timeout_s: PositiveSeconds = 60.0
    """A worker silent for this long is disconnected (its leases enter their grace period)."""
    revocation_check_s: Annotated[float, Meta(gt=0, le=60)] = 2.0
    """How often live sessions are checked against revocations made by ``byteleapctl``."""
    messages_per_second: Annotated[float, Meta(gt=0)] = 20.0
    message_burst: Annotated[int, Meta(ge=1)] = 100
    max_connections: Annotated[int, Meta(ge=1, le=100_000)] = 4096

    def __post_init__(self) -> None:
        _check_path(self.path)
        _check_url(self.public_url, "wss", "workers.public_url")
        if self.heartbeat_timeout_s <= self.heartbeat_interval_s:
            raise ValueError("heartbeat_timeout_s must be longer than heartbeat_interval_s")


class TlsSettings(ConfigStruct, frozen=True, kw_only=True):
    server_cert_days: Days = 90
    """Lifetime of the listeners' certificate (re-issued by the daemon a third before expiry)."""
    worker_cert_days: Days = 30
    """Lifetime of worker certificates; workers renew in-session before they expire."""


class TokenSettings(ConfigStruct, frozen=True, kw_only=True):
    ttl_s: Annotated[float, Meta(ge=10, le=86400)] = 600.0
    """How long an enrollment token stays usable (it is also single-use)."""


class LeaseSettings(ConfigStruct, frozen=True, kw_only=True):
    checkpoint_s: Annotated[float, Meta(gt=0, le=3600)] = 300.0
    """A signed checkpoint record per running lease this often (if the worker confirmed it)."""
    worker_grace_s: Annotated[float, Meta(ge=0, le=86400)] = 300.0
    """Running leases of a disconnected worker stay ``running`` this long, then fail."""
    start_timeout_s: PositiveSeconds = 900.0
    """A lease not started by its worker within this time fails."""
    min_duration_s: PositiveSeconds = 60.0
    max_duration_s: PositiveSeconds = 30 * 86400.0
    """Longest lease, extensions included."""
    vcpus_per_gpu: Annotated[int, Meta(ge=1, le=1024)] = 8
    memory_mib_per_gpu: Annotated[int, Meta(ge=512, le=1 << 22)] = 65536
    disk_gib_per_gpu: Annotated[int, Meta(ge=1, le=1 << 16)] = 200
    max_active_per_renter: Annotated[int, Meta(ge=1, le=100_000)] = 32
    tick_s: Annotated[float, Meta(gt=0, le=60)] = 1.0
    """How often expiries, timeouts, grace periods and checkpoints are looked at."""

    def __post_init__(self) -> None:
        if self.max_duration_s < self.min_duration_s:
            raise ValueError("max_duration_s must not be smaller than min_duration_s")


class AuthSettings(ConfigStruct, frozen=True, kw_only=True):
    """Failed authentications per remote address before it is refused outright (429)."""

    failures_per_minute: Annotated[float, Meta(gt=0)] = 10.0
    failure_burst: Annotated[int, Meta(ge=1)] = 20


class StoreSettings(SqlStoreSettings, frozen=True, kw_only=True):
    url: str = "sqlite:////var/lib/byteleap/gateway/gateway.db"
    """``sqlite:///path`` or ``postgresql://user@host/db``; put a password in ``url_file``."""


class GatewayConfig(ConfigStruct, frozen=True, kw_only=True):
    state_dir: str = "/var/lib/byteleap/gateway"
    public_names: Annotated[list[str], Meta(min_length=1, max_length=64)] = msgspec.field(
        default_factory=lambda: ["localhost", "127.0.0.1"]
    )
    api: ApiListen = msgspec.field(default_factory=ApiListen)
    workers: WorkerListen = msgspec.field(default_factory=WorkerListen)
    tls: TlsSettings = msgspec.field(default_factory=TlsSettings)
    tokens: TokenSettings = msgspec.field(default_factory=TokenSettings)
    leases: LeaseSettings = msgspec.field(default_factory=LeaseSettings)
    auth: AuthSettings = msgspec.field(default_factory=AuthSettings)
    store: StoreSettings = msgspec.field(default_factory=StoreSettings)
    logging: LoggingConfig = msgspec.field(default_factory=LoggingConfig)

    def __post_init__(self) -> None:
        for name in self.public_names:
            _check_name(name)
        if len({n.lower() for n in self.public_names}) != len(self.public_names):
            raise ValueError("public_names: a name is listed twice")
        if self.api.port == self.workers.port:
            raise ValueError("api and workers must listen on different ports")

    @property
    def api_url(self) -> str:
        """Base URL of the HTTPS API (no trailing slash)."""
        if self.api.public_url is not None:
            return self.api.public_url
        return f"https://{url_host(self.public_names[0])}:{self.api.port}"

    @property
    def ws_url(self) -> str:
        """The URL workers dial."""
        if self.workers.public_url is not None:
            return self.workers.public_url
        return f"wss://{url_host(self.public_names[0])}:{self.workers.port}{self.workers.path}"

    @property
    def enroll_url(self) -> str:
        return f"{self.api_url}/v1/enroll"
