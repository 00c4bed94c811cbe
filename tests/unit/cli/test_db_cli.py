"""``byteleapctl db upgrade|check|status`` on SQLite and PostgreSQL, as an operator runs them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from byteleap.cli.db import URL_ENV
from byteleap.cli.main import app
from byteleap.validator.store import SCHEMA_VERSION, open_store
from byteleap.validator.store_sql import SqlStore
from tests.support.fixtures import free_port
from tests.support.postgres import postgres_url

PASSWORD = "s3cret-pw"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(URL_ENV, raising=False)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'validator.db'}"
    # Trust authentication ignores the password: it is there to prove it is never shown.
    return postgres_url(request).replace(
        "postgresql://postgres@", f"postgresql://postgres:{PASSWORD}@"
    )


def db(*args: str) -> Result:
    return CliRunner().invoke(app, ["db", *args])


def test_check_upgrade_status_round(url: str) -> None:
    before = db("check", "--url", url)
    assert before.exit_code == 1
    assert before.stderr.count("\n") == 1
    assert "version 0" in before.stderr and "byteleapctl db upgrade" in before.stderr

    first = db("upgrade", "--url", url)
    assert first.exit_code == 0, first.output
    assert f"schema is at version {SCHEMA_VERSION}" in first.stdout
    again = db("upgrade", "--url", url)
    assert again.exit_code == 0 and "already at version" in again.stdout

    assert db("check", "--url", url).exit_code == 0

    shown = db("status", "--url", url)
    assert shown.exit_code == 0, shown.output
    assert "current" in shown.stdout and "never" in shown.stdout
    assert ("sqlite" if url.startswith("sqlite") else "postgresql") in shown.stdout
    as_json = db("status", "--json", "--url", url)
    status = json.loads(as_json.stdout)
    assert (status["schema_version"], status["workers"], status["cycles"]) == (SCHEMA_VERSION, 0, 0)
    for result in (before, first, again, shown, as_json):
        assert PASSWORD not in result.output


def test_url_from_environment_and_from_a_private_file(
    url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(URL_ENV, url)
    assert db("upgrade").exit_code == 0
    monkeypatch.delenv(URL_ENV)

    url_file = tmp_path / "store-url"
    url_file.write_text(url + "\n")
    url_file.chmod(0o600)
    checked = db("check", "--url-file", str(url_file))
    assert checked.exit_code == 0, checked.output

    url_file.chmod(0o644)
    refused = db("status", "--url-file", str(url_file))
    assert refused.exit_code == 2
    assert "chmod 600" in refused.stderr and str(url_file) in refused.stderr
    assert PASSWORD not in refused.output


def test_a_newer_schema_fails_the_check(url: str) -> None:
    assert db("upgrade", "--url", url).exit_code == 0
    store = open_store(url)
    assert isinstance(store, SqlStore)
    with store._transaction(write=True) as tx:
        tx.execute(
            "INSERT INTO schema_migrations (version, description, applied_at) VALUES (?, ?, ?)",
            (SCHEMA_VERSION + 1, "from the future", 0.0),
        )
    store.close()
    checked = db("check", "--url", url)
    assert checked.exit_code == 1 and "newer than this code" in checked.stderr
    shown = db("status", "--url", url)
    assert shown.exit_code == 0 and "newer than this code" in shown.stdout


def test_unreachable_database_is_one_line_without_the_password() -> None:
    dead = f"postgresql://postgres:{PASSWORD}@127.0.0.1:{free_port()}/test"
    result = db("check", "--url", dead, "--timeout", "1")
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1 and "byteleapctl db:" in result.stderr
    assert PASSWORD not in result.output


def test_an_unknown_scheme_is_refused() -> None:
    result = db("status", "--url", f"mysql://root:{PASSWORD}@db/v")
    assert result.exit_code == 1 and "unsupported store URL" in result.stderr
    assert PASSWORD not in result.output
