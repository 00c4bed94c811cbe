"""``byteleapctl gateway``: what an operator types, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from byteleap.cli.gateway import app
from byteleap.gateway.keys import secret_hash
from byteleap.gateway.store import open_store
from tests.support.postgres import postgres_url

WORKER = "a" * 32
MINER = "5FHneW46xGXgs5mUiveU4sbTyGBzmstUspZC92UhjJM694ty"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    for name in list(os.environ):
        if name.startswith("BYTELEAP_GATEWAY__"):
            monkeypatch.delenv(name)


@pytest.fixture(params=["sqlite", "postgresql"])
def config(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    state = tmp_path / "state"
    url = (
        f"sqlite:///{state / 'gateway.db'}" if request.param == "sqlite" else postgres_url(request)
    )
    path = tmp_path / "gateway.yaml"
    path.write_text(
        f"state_dir: {state}\npublic_names: [gw.example.org, 192.0.2.1]\nstore: {{url: '{url}'}}\n"
    )
    return path


def run(config: Path, *args: str) -> Result:
    return CliRunner().invoke(app, [*args, "--config", str(config)])


def _url(config: Path) -> str:
    text = config.read_text()
    return text.split("url: '", 1)[1].split("'", 1)[0]


def test_init_then_show_name_the_gateway(config: Path) -> None:
    before = run(config, "show")
    assert before.exit_code == 2 and "byteleapctl gateway init" in before.stderr
    first = run(config, "init", "--json")
    assert first.exit_code == 0, first.output
    shown = json.loads(first.stdout)
    assert set(shown) == {
        "gateway_id",
        "signing_public_key",
        "ca_fingerprint_sha256",
        "api_url",
        "ws_url",
    }
    assert shown["api_url"] == "https://gw.example.org:8443"
    assert len(shown["ca_fingerprint_sha256"]) == 64 and len(shown["signing_public_key"]) == 64
    again = run(config, "init", "--json")  # idempotent: nothing is replaced
    assert again.exit_code == 0 and json.loads(again.stdout) == shown
    plain = run(config, "show")
    assert plain.exit_code == 0 and shown["gateway_id"] in plain.stdout
    state = Path(config.read_text().split("state_dir: ", 1)[1].split("\n", 1)[0])
    for name in ("ca.key", "signing.key", "server.key"):
        assert (state / name).stat().st_mode & 0o777 == 0o600


def test_renter_and_validator_keys_are_shown_once_and_revocable(config: Path) -> None:
    assert run(config, "init").exit_code == 0
    added = run(config, "renter", "add", "alice")
    assert added.exit_code == 0, added.output
    key = added.stdout.strip()
    assert key.startswith("blr_") and "shown once" in added.stderr
    store = open_store(_url(config))
    try:
        assert store.api_key_owner("renter", secret_hash(key)) == "alice"
    finally:
        store.close()
    taken = run(config, "renter", "add", "alice")
    assert taken.exit_code == 1 and "already has an active key" in taken.stderr
    assert key not in run(config, "renter", "list").stdout
    listed = json.loads(run(config, "renter", "list", "--json").stdout)
    assert [row["name"] for row in listed] == ["alice"] and listed[0]["revoked_at"] is None
    assert run(config, "renter", "revoke", "alice").exit_code == 0
    again = run(config, "renter", "revoke", "alice")
    assert again.exit_code == 1 and "no active key" in again.stderr
    validator = run(config, "validator-key", "add", "val-1")
    assert validator.exit_code == 0 and validator.stdout.startswith("blv_")
    assert run(config, "validator-key", "revoke", "val-1").exit_code == 0
    bad = run(config, "renter", "add", "../etc")
    assert bad.exit_code == 2


def test_worker_revoke(config: Path) -> None:
    assert run(config, "init").exit_code == 0
    unknown = run(config, "worker", "revoke", WORKER)
    assert unknown.exit_code == 1 and "not enrolled" in unknown.stderr
    store = open_store(_url(config))
    try:
        store.add_token(
            b"t" * 32, worker_id=WORKER, miner_hotkey=MINER, issued_by="v", now=1.0, expires_at=9e9
        )
        store.enroll(
            b"t" * 32,
            now=2.0,
            worker_id=WORKER,
            public_key=b"k" * 32,
            serial="1",
            not_before=1.0,
            not_after=9e9,
        )
    finally:
        store.close()
    listed = json.loads(run(config, "worker", "list", "--json").stdout)
    assert listed == [
        {"worker_id": WORKER, "miner_hotkey": MINER, "enrolled_at": 2.0, "revoked_at": None}
    ]
    done = run(config, "worker", "revoke", WORKER)
    assert done.exit_code == 0, done.output
    again = run(config, "worker", "revoke", WORKER)
    assert again.exit_code == 1 and "already revoked" in again.stderr
    assert run(config, "worker", "revoke", "NOT-A-WORKER").exit_code == 2
    store = open_store(_url(config))
    try:
        assert store.session_allowed(WORKER, "1") == "worker revoked"
    finally:
        store.close()


def test_commands_before_init_and_with_a_bad_config_exit_2(tmp_path: Path, config: Path) -> None:
    before = run(config, "renter", "list")
    assert before.exit_code == 2 and "byteleapctl gateway init" in before.stderr
    broken = tmp_path / "broken.yaml"
    broken.write_text("api: {port: 0}\n")
    result = run(broken, "show")
    assert result.exit_code == 2 and "api.port" in result.stderr
    missing = run(tmp_path / "missing.yaml", "show")
    assert missing.exit_code == 2 and "file not found" in missing.stderr
