"""ValidatorConfig: usable defaults, every bad value named by its key, the store URL kept secret."""

from __future__ import annotations

from pathlib import Path

import pytest

from byteleap.core.config import ConfigError, load_config
from byteleap.validator.config import (
    ENV_PREFIX,
    STORE_URL_CREDENTIAL,
    StoreSettings,
    StoreUrlError,
    ValidatorConfig,
)

SECRET_URL = "postgresql://validator:hunter2-not-for-logs@db.example/validator"


def load(tmp_path: Path, text: str, **env: str) -> ValidatorConfig:
    path = tmp_path / "validator.yaml"
    path.write_text(text)
    return load_config(path, ValidatorConfig, env_prefix=ENV_PREFIX, environ=env)


def test_defaults_load_without_a_file() -> None:
    config = load_config(None, ValidatorConfig, env_prefix=ENV_PREFIX, environ={})
    assert (config.listen.port, config.listen.path) == (7800, "/v1/miner")
    assert config.listen.public_ip is None
    assert config.store.url == "sqlite:////var/lib/byteleap/validator/validator.db"
    assert (config.rounds.interval_s, config.rounds.cpu_n, config.rounds.gpu_max_n) == (
        240.0,
        2048,
        32768,
    )
    assert (config.rounds.sample_rows, config.rounds.sample_cols) == (16, 8)
    assert config.scoring.w_lease == 0.9
    assert config.chain.netuid == 128


def test_a_devnet_style_config_loads(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        """
listen: {host: 127.0.0.1, port: 7801, public_ip: 127.0.0.1, public_port: 7801}
chain: {network: devnet, devnet_path: /tmp/chain.db, netuid: 7, snapshot_refresh_s: 2}
rounds: {interval_s: 4, cpu_n: 256, commit_deadline_s: 20, reveal_deadline_s: 20}
scoring: {challenge_interval_seconds: 4, window_hours: 0.01, bucket_seconds: 4,
          challenge_window_minutes: 0.6}
weights: {interval_s: 0}
""",
        BYTELEAP_VALIDATOR__ROUNDS__PRECISION="bf16",
    )
    assert config.rounds.cpu_n == 256 and config.rounds.precision == "bf16"
    assert config.listen.published_port == 7801
    assert config.chain.network == "devnet"


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("rounds: {cpu_n: 100}\n", "rounds.cpu_n"),  # not a multiple of 64
        ("rounds: {gpu_max_n: 131072}\n", "rounds.gpu_max_n"),
        ("rounds: {precision: fp64}\n", "rounds.precision"),
        ("rounds: {sample_rows: 0}\n", "rounds.sample_rows"),
        ("rounds: {commit_deadline_s: 7200}\n", "rounds.commit_deadline_s"),
        ("rounds: {cpu_n: 64, sample_rows: 65}\n", "rounds: sample_rows (65) must not exceed"),
        ("rounds: {gpu_max_n: 65536, sample_rows: 64}\n", "would not fit the"),
        ("listen: {path: v1/miner}\n", "listen: path must start with '/'"),
        ("listen: {public_ip: miner.example}\n", "is not an IP address"),
        ("listen: {public_ip: 0.0.0.0}\n", "cannot be dialed"),
        ("listen: {port: 0}\n", "listen.port"),
        ("policy: {max_connections: 0}\n", "policy.max_connections"),
        ("retention: {cycles: 0}\n", "retention.cycles"),
        ("scoring: {w_lease: -1}\n", "w_lease must be >= 0"),
        ("rounds: {interval_s: 120}\n", "must equal rounds.interval_s"),
        ("chain: {network: devnet}\n", "devnet_path"),
        ("round: {interval_s: 120}\n", "did you mean 'rounds'"),
    ],
)
def test_bad_values_name_their_key(tmp_path: Path, text: str, where: str) -> None:
    with pytest.raises(ConfigError, match=r"validator\.yaml") as refused:
        load(tmp_path, text)
    assert where in str(refused.value)


def test_a_bad_store_url_is_refused_without_showing_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as refused:
        load(tmp_path, "", BYTELEAP_VALIDATOR__STORE__URL="mysql://root:hunter2@db/x")
    assert "store: url must start with sqlite://" in str(refused.value)
    assert "hunter2" not in str(refused.value)


def write_private(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


def test_store_url_comes_from_its_file_or_credential(tmp_path: Path) -> None:
    assert StoreSettings(url="sqlite:///v.db").resolve_url({}) == "sqlite:///v.db"
    url_file = write_private(tmp_path / "store-url", SECRET_URL + "\n")
    settings = StoreSettings(url_file=str(url_file))
    assert settings.resolve_url({}) == SECRET_URL

    credentials = tmp_path / "credentials"
    credentials.mkdir()
    other = SECRET_URL.replace("db.example", "db2.example")
    write_private(credentials / STORE_URL_CREDENTIAL, other)
    assert StoreSettings().resolve_url({"CREDENTIALS_DIRECTORY": str(credentials)}) == other


@pytest.mark.parametrize(
    ("content", "mode", "problem"),
    [
        (SECRET_URL, 0o644, "mode 0644"),
        ("", 0o600, "exactly one URL"),
        (SECRET_URL + "\n" + SECRET_URL, 0o600, "exactly one URL"),
        (SECRET_URL.replace("postgresql", "mysql"), 0o600, "must start with sqlite://"),
    ],
)
def test_an_unusable_store_url_file_is_refused_without_its_content(
    tmp_path: Path, content: str, mode: int, problem: str
) -> None:
    url_file = write_private(tmp_path / "store-url", content, mode)
    with pytest.raises(StoreUrlError) as refused:
        StoreSettings(url_file=str(url_file)).resolve_url({})
    assert problem in str(refused.value)
    assert "hunter2" not in str(refused.value)


def test_a_missing_store_url_file_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(StoreUrlError, match="does not exist"):
        StoreSettings(url_file=str(missing)).resolve_url({})
