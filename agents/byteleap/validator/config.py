"""byteleap-validator configuration (/etc/byteleap/validator.yaml, env prefix BYTELEAP_VALIDATOR).

Sections: ``listen`` (the miner-facing WebSocket and the endpoint published on chain), ``chain``,
``store`` (SQLite by default, PostgreSQL in production), ``rounds`` (the challenge engine),
``scoring`` (:class:`~byteleap.core.scoring.ScoringParams` as it is), ``weights``, ``policy``
(admission and flood limits for miner connections), ``retention``, ``gateways`` (the lease feeds
to read) and ``logging``.

Cross-field rules are checked here so a bad combination fails at start-up with the keys named,
not in the middle of a round: the row sample must fit the smallest matrix, the largest reveal must
fit a wire frame, and scoring must count rounds at the interval they really run.

The store URL of a PostgreSQL database usually holds a password. It never has a default, and it
can live outside the config: a systemd credential named ``store-url`` (``LoadCredential=``) or
``store.url_file`` (a 0600 file); :meth:`StoreSettings.resolve_url` reads it. Error messages about
the URL never repeat it. A gateway's API key is handled the same way: the credential
``gateway-<name>-key`` or ``api_key_file`` (:meth:`GatewaySettings.resolve_api_key`).
"""

from __future__ import annotations

import ipaddress
import os
import urllib.parse
from collections.abc import Mapping
from typing import Annotated, Final

import msgspec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from msgspec import Meta

from ..chain.config import ChainConfig
from ..core import wire
from ..core.challenge.spec import MAX_SAMPLE_COLUMNS, MAX_SAMPLE_ROWS, Precision
from ..core.config import (
    ConfigStruct,
    LoggingConfig,
    NonNegativeSeconds,
    Port,
    PositiveSeconds,
)
from ..core.credentials import CredentialError, credential_path
from ..core.files import PrivateFileError, read_private_file
from ..core.lease import gateway_id_of
from ..core.scoring import ScoringParams
from ..core.sqlstore import STORE_URL_CREDENTIAL, SqlStoreSettings, StoreUrlError

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "ENV_PREFIX",
    "GATEWAY_CHECKPOINT_S",
    "STORE_URL_CREDENTIAL",
    "GatewayKeyError",
    "GatewaySettings",
    "MinerListen",
    "MinerPolicy",
    "Retention",
    "RoundSettings",
    "StoreSettings",
    "StoreUrlError",
    "ValidatorConfig",
    "WeightsSettings",
]

DEFAULT_CONFIG_PATH: Final = "/etc/byteleap/validator.yaml"
ENV_PREFIX: Final = "BYTELEAP_VALIDATOR"


MatrixSize = Annotated[int, Meta(ge=wire.MIN_N, le=wire.MAX_N, multiple_of=wire.N_MULTIPLE)]


class MinerListen(ConfigStruct, frozen=True, kw_only=True):
    """The WebSocket route miners dial, and what to publish on chain so they find it."""

    host: str = "0.0.0.0"  # noqa: S104 - miners on other hosts must reach it; auth is mandatory
    port: Port = 7800
    path: str = "/v1/miner"
    public_ip: str | None = None
    """IP published on chain (ServeAxon); unset: the agent does not publish an endpoint."""
    public_port: Port | None = None
    """Port published on chain; unset: ``port``."""

    def __post_init__(self) -> None:
        if not self.path.startswith("/") or any(c.isspace() for c in self.path):
            raise ValueError(f"path must start with '/' and hold no spaces, got {self.path!r}")
        if self.public_ip is not None:
            try:
                address = ipaddress.ip_address(self.public_ip)
            except ValueError:
                raise ValueError(f"public_ip {self.public_ip!r} is not an IP address") from None
            if address.is_unspecified or address.is_multicast:
                raise ValueError(f"public_ip {self.public_ip} cannot be dialed by miners")

    @property
    def published_port(self) -> int:
        return self.public_port if self.public_port is not None else self.port


class StoreSettings(SqlStoreSettings, frozen=True, kw_only=True):
    url: str = "sqlite:////var/lib/byteleap/validator/validator.db"
    """``sqlite:///path`` or ``postgresql://user@host/db``; put a password in ``url_file``."""


class RoundSettings(ConfigStruct, frozen=True, kw_only=True):
    """The challenge rounds (docs/miner-validator.md, docs/challenge.md)."""

    interval_s: PositiveSeconds = 240.0
    """A round starts this long after the previous one started (never while it still runs)."""
    cpu_n: MatrixSize = 2048
    """Matrix size for workers without GPUs (their CPU prover ``cpu-0``, always fp32)."""
    gpu_max_n: MatrixSize = 32768
    """Largest GPU matrix; each GPU gets the largest n its memory holds comfortably, up to this."""
    precision: Precision = "fp32"
    """Input precision of GPU challenges (the product always accumulates in fp32)."""
    sample_rows: Annotated[int, Meta(ge=1, le=MAX_SAMPLE_ROWS)] = 16
    """k: rows revealed per device; a device skipping a fraction f of the work passes ~f^k."""
    sample_cols: Annotated[int, Meta(ge=1, le=MAX_SAMPLE_COLUMNS)] = 8
    """m: entries recomputed per revealed row (secret: the prover reveals whole rows)."""
    commit_deadline_s: Annotated[float, Meta(gt=0, le=3600)] = 120.0
    """Dispatch to commit, per device (sent to the worker as its deadline)."""
    reveal_deadline_s: PositiveSeconds = 30.0
    echo_timeout_s: PositiveSeconds = 5.0
    max_concurrent_verifications: Annotated[int, Meta(ge=1, le=256)] = 4
    """Reveals verified at once (each in a thread, off the event loop)."""

    def __post_init__(self) -> None:
        smallest = min(self.cpu_n, self.gpu_max_n)
        if self.sample_rows > smallest:
            raise ValueError(
                f"sample_rows ({self.sample_rows}) must not exceed the smallest matrix size "
                f"({smallest})"
            )
        if self.sample_cols > smallest:
            raise ValueError(
                f"sample_cols ({self.sample_cols}) must not exceed the smallest matrix size "
                f"({smallest})"
            )
        largest = max(self.cpu_n, self.gpu_max_n)
        limit = wire.max_frame_bytes(wire.Link.MINER_VALIDATOR, wire.Direction.UP)
        if wire.reveal_frame_bound(largest, self.sample_rows) > limit:
            raise ValueError(
                f"a reveal of {self.sample_rows} rows at n={largest} would not fit the "
                f"{limit}-byte frame limit; lower sample_rows or gpu_max_n"
            )


class WeightsSettings(ConfigStruct, frozen=True, kw_only=True):
    interval_s: NonNegativeSeconds = 1200.0
    """Time between scoring cycles (each ends in a weights submission when the chain allows)."""
    version_key: Annotated[int, Meta(ge=0, le=2**63 - 1)] = 0  # msgspec bounds are int64
    """The subnet's weights version (``weights_version`` hyperparameter)."""


class MinerPolicy(ConfigStruct, frozen=True, kw_only=True):
    """Admission and flood limits for miner connections."""

    handshake_timeout_s: PositiveSeconds = 10.0
    """Upgrade to MinerHello, all steps together."""
    max_connections: Annotated[int, Meta(ge=1, le=100_000)] = 512
    """Open connections at once (a subnet has at most 256 uids; reconnects overlap briefly)."""
    messages_per_second: Annotated[float, Meta(gt=0)] = 10.0
    """Sustained rate of frames that answer nothing the validator asked for (rosters, pings)."""
    message_burst: Annotated[int, Meta(ge=1)] = 100
    heartbeat_s: PositiveSeconds = 30.0
    """WebSocket ping interval; a connection that stops answering is closed."""
    btauth_max_age_s: PositiveSeconds = 10.0
    btauth_allowed_skew_s: NonNegativeSeconds = 2.0


class Retention(ConfigStruct, frozen=True, kw_only=True):
    challenges_days: Annotated[float, Meta(gt=0)] = 7.0
    """Terminal challenges older than this are deleted (history and bitmaps are kept)."""
    cycles: Annotated[int, Meta(ge=1)] = 200
    """Scoring cycles kept (``byteleapctl scores`` explains any of them): about 66 h at the
    default 20-minute interval, ~1.1 MiB each for a full subnet of 25 600 workers."""


GatewayName = Annotated[str, Meta(pattern=r"\A[a-z0-9](?:[a-z0-9-]{0,30}[a-z0-9])?\Z")]
"""Lower-case letters, digits and inner dashes, at most 32: it names a systemd credential."""
GATEWAY_CHECKPOINT_S: Final = 300.0
"""The gateway's default ``leases.checkpoint_s``: how stale a running lease's record may be."""
_MAX_API_KEY_BYTES: Final = 1024
_MIN_API_KEY_CHARS: Final = 16


class GatewayKeyError(Exception):
    """A gateway's API key is missing, unsafe or malformed; the message never shows the key."""


class GatewaySettings(ConfigStruct, frozen=True, kw_only=True):
    """One gateway whose signed lease feed the validator reads (docs/validator.md, Leases).

    Its id is derived from ``signing_public_key`` (:func:`~byteleap.core.lease.gateway_id_of`),
    never configured: a record is only believed when this key signed it and it names this id.
    """

    name: GatewayName
    """Names the gateway in logs and its API key credential ``gateway-<name>-key``."""
    url: str
    """``https://host[:port][/prefix]``: the feed is ``{url}/v1/lease-feed``."""
    ca_file: str
    """PEM of the gateway's own CA: the only trust root for ``url`` (system CAs are not used)."""
    signing_public_key: str
    """Hex of the gateway's raw Ed25519 lease-signing public key (64 hex digits)."""
    api_key_file: str | None = None
    """A 0600 file holding the validator's API key for this gateway (the credential
    ``gateway-<name>-key`` wins)."""
    poll_interval_s: Annotated[float, Meta(gt=0, le=3600)] = 60.0
    lease_grace_s: Annotated[float, Meta(gt=0, le=86400)] | None = None
    """How long after its last checkpoint a lease that has not ended keeps its devices out of
    challenges; unset: the gateway's default checkpoint interval (300 s) plus two poll
    intervals. Set it to at least the gateway's checkpoint interval plus ``poll_interval_s``."""

    def __post_init__(self) -> None:
        try:
            parts = urllib.parse.urlsplit(self.url)
            _ = parts.port  # raises for a port that is not a number in range
        except ValueError:
            raise ValueError(f"url {self.url!r} is not a valid URL") from None
        if parts.scheme != "https" or not parts.hostname:
            raise ValueError(f"url {self.url!r} must be https://host[:port][/path]")
        if parts.username is not None or parts.password is not None:
            raise ValueError("url must not hold credentials: put the API key in api_key_file")
        if parts.query or parts.fragment or any(c.isspace() for c in self.url):
            raise ValueError(f"url {self.url!r} must have no query, fragment or spaces")
        if not self.ca_file:
            raise ValueError("ca_file must name the gateway CA's PEM file")
        raw = self.signing_public_key
        if len(raw) != 64 or any(c not in "0123456789abcdefABCDEF" for c in raw):
            raise ValueError("signing_public_key must be 64 hex digits (a raw Ed25519 key)")

    @property
    def public_key(self) -> Ed25519PublicKey:
        return Ed25519PublicKey.from_public_bytes(bytes.fromhex(self.signing_public_key))

    @property
    def gateway_id(self) -> str:
        return gateway_id_of(bytes.fromhex(self.signing_public_key))

    @property
    def feed_url(self) -> str:
        return self.url.rstrip("/") + "/v1/lease-feed"

    @property
    def credential_name(self) -> str:
        return f"gateway-{self.name}-key"

    @property
    def api_key_source(self) -> str:
        """Where the API key is read from, for messages (never the key)."""
        return self.api_key_file or f"$CREDENTIALS_DIRECTORY/{self.credential_name}"

    @property
    def grace_s(self) -> float:
        """:attr:`lease_grace_s`, or a checkpoint interval plus two poll intervals."""
        if self.lease_grace_s is not None:
            return self.lease_grace_s
        return GATEWAY_CHECKPOINT_S + 2 * self.poll_interval_s

    def resolve_api_key(self, environ: Mapping[str, str] | None = None) -> str:
        """The API key: the systemd credential ``gateway-<name>-key``, else ``api_key_file``.

        Raises :class:`GatewayKeyError` for a missing, unsafe (group/other readable) or
        malformed file; the message names the file, never its content.
        """
        env = os.environ if environ is None else environ
        try:
            path = credential_path(self.credential_name, self.api_key_file, env)
            raw = read_private_file(path, _MAX_API_KEY_BYTES, what="gateway API key file")
        except (CredentialError, PrivateFileError) as exc:
            raise GatewayKeyError(f"gateway {self.name}: {exc}") from None
        try:
            key = raw.decode("ascii").strip()
        except UnicodeDecodeError:
            raise GatewayKeyError(
                f"gateway {self.name}: API key file {path} is not ASCII text"
            ) from None
        # It travels in an Authorization header: visible ASCII only, no spaces.
        if len(key) < _MIN_API_KEY_CHARS or not all("!" <= c <= "~" for c in key):
            raise GatewayKeyError(
                f"gateway {self.name}: API key file {path} must hold one key of at least "
                f"{_MIN_API_KEY_CHARS} visible ASCII characters on one line"
            )
        return key


class ValidatorConfig(ConfigStruct, frozen=True, kw_only=True):
    state_dir: str = "/var/lib/byteleap/validator"
    listen: MinerListen = msgspec.field(default_factory=MinerListen)
    chain: ChainConfig = msgspec.field(default_factory=ChainConfig)
    store: StoreSettings = msgspec.field(default_factory=StoreSettings)
    rounds: RoundSettings = msgspec.field(default_factory=RoundSettings)
    scoring: ScoringParams = msgspec.field(default_factory=ScoringParams)
    weights: WeightsSettings = msgspec.field(default_factory=WeightsSettings)
    policy: MinerPolicy = msgspec.field(default_factory=MinerPolicy)
    retention: Retention = msgspec.field(default_factory=Retention)
    gateways: list[GatewaySettings] = msgspec.field(default_factory=list)
    logging: LoggingConfig = msgspec.field(default_factory=LoggingConfig)

    def __post_init__(self) -> None:
        # Participation counts verified rounds against window / interval: both must agree.
        if abs(self.scoring.challenge_interval_seconds - self.rounds.interval_s) > 1e-9:
            raise ValueError(
                f"scoring.challenge_interval_seconds ({self.scoring.challenge_interval_seconds:g})"
                f" must equal rounds.interval_s ({self.rounds.interval_s:g}): participation is "
                "counted in rounds"
            )
        names: set[str] = set()
        ids: dict[str, str] = {}
        for gateway in self.gateways:
            if gateway.name in names:
                raise ValueError(f"gateways: the name {gateway.name!r} is used twice")
            names.add(gateway.name)
            other = ids.setdefault(gateway.gateway_id, gateway.name)
            if other != gateway.name:
                raise ValueError(
                    f"gateways: {other!r} and {gateway.name!r} have the same signing key"
                )
