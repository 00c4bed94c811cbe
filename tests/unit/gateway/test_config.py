"""byteleap-gateway configuration: usable defaults, derived URLs, named errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from byteleap.core.config import ConfigError, load_config
from byteleap.gateway.config import ENV_PREFIX, GatewayConfig, StoreUrlError

PACKAGED = Path(__file__).parents[3] / "debian" / "config" / "gateway.yaml"


def _load(text: str | None, tmp_path: Path, env: dict[str, str] | None = None) -> GatewayConfig:
    path = None
    if text is not None:
        path = tmp_path / "gateway.yaml"
        path.write_text(text)
    return load_config(path, GatewayConfig, env_prefix=ENV_PREFIX, environ=env or {})


def test_defaults_and_derived_urls(tmp_path: Path) -> None:
    config = _load(None, tmp_path)
    assert config.api_url == "https://localhost:8443"
    assert config.ws_url == "wss://localhost:8444/v1/worker"
    assert config.enroll_url == "https://localhost:8443/v1/enroll"
    assert config.store.url == "sqlite:////var/lib/byteleap/gateway/gateway.db"
    v6 = _load("public_names: ['2001:db8::1']\napi: {port: 443}\n", tmp_path)
    assert v6.api_url == "https://[2001:db8::1]:443"
    explicit = _load(
        "api: {public_url: 'https://rent.example'}\n"
        "workers: {public_url: 'wss://workers.example/v1/worker'}\n",
        tmp_path,
    )
    assert explicit.enroll_url == "https://rent.example/v1/enroll"
    assert explicit.ws_url == "wss://workers.example/v1/worker"


def test_the_packaged_config_loads() -> None:
    config = load_config(PACKAGED, GatewayConfig, env_prefix=ENV_PREFIX, environ={})
    assert config.state_dir == "/var/lib/byteleap/gateway"


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("public_names: ['bad name']\n", "public_names"),
        ("public_names: []\n", "public_names"),
        ("public_names: [a.example, A.example]\n", "listed twice"),
        ("api: {port: 8444}\n", "different ports"),
        ("api: {public_url: 'http://plain'}\n", "api.public_url"),
        ("workers: {path: 'v1'}\n", "workers"),
        ("workers: {heartbeat_interval_s: 60, heartbeat_timeout_s: 30}\n", "heartbeat_timeout_s"),
        ("leases: {min_duration_s: 100, max_duration_s: 10}\n", "max_duration_s"),
        ("tls: {worker_cert_days: 0}\n", "tls.worker_cert_days"),
        ("store: {url: 'mysql://root:hunter2@db/x'}\n", "store"),
        ("tokens: {ttl: 5}\n", "tokens.ttl"),
    ],
)
def test_bad_values_name_their_key(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as error:
        _load(text, tmp_path)
    assert "hunter2" not in str(error.value)


def test_environment_overrides(tmp_path: Path) -> None:
    config = _load(
        None,
        tmp_path,
        {"BYTELEAP_GATEWAY__LEASES__CHECKPOINT_S": "60", "BYTELEAP_GATEWAY__API__PORT": "9443"},
    )
    assert config.leases.checkpoint_s == 60 and config.api.port == 9443


def test_the_store_url_can_live_in_a_private_file(tmp_path: Path) -> None:
    secret = tmp_path / "url"
    secret.write_text("postgresql://gw:hunter2@db/gateway\n")
    secret.chmod(0o600)
    config = _load(f"store: {{url_file: '{secret}'}}\n", tmp_path)
    assert config.store.resolve_url({}) == "postgresql://gw:hunter2@db/gateway"
    secret.chmod(0o644)
    with pytest.raises(StoreUrlError, match="mode 0644") as error:
        config.store.resolve_url({})
    assert "hunter2" not in str(error.value)
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "store-url").write_text("sqlite:///x.db")
    (creds / "store-url").chmod(0o600)
    assert config.store.resolve_url({"CREDENTIALS_DIRECTORY": str(creds)}) == "sqlite:///x.db"
