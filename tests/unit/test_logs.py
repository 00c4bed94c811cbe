"""byteleap.core.logs: journald vs. stderr, one-line format, structured fields, redaction."""

from __future__ import annotations

import logging
import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from systemd import journal

from byteleap.core.logs import (
    REDACTED,
    PlainFormatter,
    is_secret_key,
    journal_stream_active,
    log_fields,
    redact,
    setup_logging,
)


@pytest.fixture(autouse=True)
def _restore_root_logger(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
            h.close()
    root.setLevel(level)


def _ours(root: logging.Logger) -> list[logging.Handler]:
    return [h for h in root.handlers if getattr(h, "_byteleap_handler", False)]


def test_stderr_one_line_with_fields(capsys: pytest.CaptureFixture[str]) -> None:
    handler = setup_logging("worker", "info")
    assert isinstance(handler, logging.StreamHandler)
    log = logging.getLogger("byteleap.worker.test")
    log.info(
        "challenge %s done",
        "c9",
        extra=log_fields(worker_id="w1", challenge_id="c9", seconds=1.5, note="two words"),
    )
    log.debug("not shown")
    err = capsys.readouterr().err
    assert err == (
        'INFO worker: challenge c9 done worker_id=w1 challenge_id=c9 seconds=1.5 note="two words"\n'
    )


def test_stderr_exception_and_redaction(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("miner", "DEBUG")
    log = logging.getLogger("byteleap.miner.test")
    try:
        raise ValueError("boom")
    except ValueError:
        # extra= without log_fields(): the handler still redacts secret-looking fields
        log.exception("failed", extra={"API_TOKEN": "s3cr3t", "WORKER_ID": "w2"})
    err = capsys.readouterr().err
    first, *rest = err.splitlines()
    assert first == f"ERROR miner: failed api_token={REDACTED} worker_id=w2"
    assert "s3cr3t" not in err
    assert "ValueError: boom" in rest[-1]


def test_setup_is_idempotent_and_checks_level() -> None:
    setup_logging("worker", "info")
    setup_logging("worker", "warning")
    root = logging.getLogger()
    assert len(_ours(root)) == 1
    assert root.level == logging.WARNING
    with pytest.raises(ValueError, match="unknown log level"):
        setup_logging("worker", "loud")


def test_journal_selected_when_journal_stream_names_stderr(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sent: list[dict[str, Any]] = []

    def capture(text: str, /, **fields: Any) -> None:  # positional: record.message is a field
        sent.append({"MESSAGE": text, **fields})

    with (tmp_path / "stderr").open("w") as fake_stderr:
        st = os.fstat(fake_stderr.fileno())
        monkeypatch.setattr(sys, "stderr", fake_stderr)
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        assert journal_stream_active()
        handler = setup_logging("validator", "info")
        assert isinstance(handler, journal.JournalHandler)
        # no journald here (no systemd PID 1): keep the real handler's field logic, capture the send
        handler.send = capture
        logging.getLogger("byteleap.validator.test").warning(
            "weights set", extra=log_fields(round=17, hotkey_seed="abc", worker_id=None)
        )
        # extra= without log_fields(): the handler's filter redacts before the journal sees it
        mid = uuid.UUID(int=0xC0FFEE)
        logging.getLogger("byteleap.validator.test").info(
            "raw", extra={"DB_PASSWD": "pw", "MESSAGE_ID": mid.hex}
        )
    assert (tmp_path / "stderr").read_text() == ""
    assert len(sent) == 2
    msg = sent[0]
    assert msg["MESSAGE"] == "weights set"
    assert msg["SYSLOG_IDENTIFIER"] == "validator"
    assert msg["PRIORITY"] == "4"
    assert msg["ROUND"] == 17
    assert msg["HOTKEY_SEED"] == REDACTED
    assert "WORKER_ID" not in msg
    assert sent[1]["DB_PASSWD"] == REDACTED
    assert sent[1]["MESSAGE_ID"] == mid.hex


def test_journal_stream_must_match_stderr(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    other = tmp_path / "other"
    other.write_text("")
    st = other.stat()
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    assert not journal_stream_active()
    monkeypatch.setenv("JOURNAL_STREAM", "garbage")
    assert not journal_stream_active()
    assert not journal_stream_active(environ={})
    assert isinstance(setup_logging("worker", "info").formatter, PlainFormatter)


def test_log_fields() -> None:
    assert log_fields(worker_id="w", challenge_id=3, skip=None) == {
        "WORKER_ID": "w",
        "CHALLENGE_ID": 3,
    }
    assert log_fields(password="x", db_passwd="y", api_key="z") == {
        "PASSWORD": REDACTED,
        "DB_PASSWD": REDACTED,
        "API_KEY": REDACTED,
    }
    with pytest.raises(ValueError, match="reserved"):
        log_fields(message="x")
    with pytest.raises(ValueError, match="invalid"):
        log_fields(**{"bad-name": 1})


def test_message_id_is_a_field_everywhere(capsys: pytest.CaptureFixture[str]) -> None:
    mid = uuid.UUID("5f1e6b2a-0c4d-4e8f-9a7b-3c2d1e0f9a8b")
    assert log_fields(message_id=mid) == {"MESSAGE_ID": mid.hex}
    assert log_fields(message_id=mid.hex.upper()) == {"MESSAGE_ID": mid.hex}
    for bad in ("not-an-id", str(mid), 7):
        with pytest.raises(ValueError, match="message_id"):
            log_fields(message_id=bad)
    setup_logging("worker", "info")
    logging.getLogger("byteleap.worker.test").info("x", extra=log_fields(message_id=mid))
    assert capsys.readouterr().err == f"INFO worker: x message_id={mid.hex}\n"


def test_redact() -> None:
    fields = {"hotkey": "5F...", "Secret_Seed": "x", "auth_token": "t", "password": "p", "url": "u"}
    assert redact(fields) == {
        "hotkey": REDACTED,
        "Secret_Seed": REDACTED,
        "auth_token": REDACTED,
        "password": REDACTED,
        "url": "u",
    }
    assert fields["password"] == "p"  # a copy
    assert is_secret_key("WALLET_KEYFILE")
    assert not is_secret_key("worker_id")


@pytest.mark.parametrize(
    ("name", "secret"),
    [
        ("enrollment_secret", True),
        ("Password", True),
        ("db_passwd", True),
        ("api_token", True),
        ("hotkey", True),
        ("key_file", True),
        ("url", False),
        ("metrics_port", False),
        ("message_id", False),
    ],
)
def test_is_secret_key(name: str, secret: bool) -> None:
    assert is_secret_key(name) is secret
