"""Agent logging: journald with structured fields under systemd, one-line stderr otherwise.

Call :func:`setup_logging` once at start-up, then log with structured fields through ``extra=``::

    log.info("challenge done", extra=log_fields(worker_id=wid, challenge_id=cid, seconds=1.9))

:func:`log_fields` upper-cases the keys (``WORKER_ID``, ``CHALLENGE_ID``): under systemd they become
journal fields (``journalctl WORKER_ID=... -o verbose``); on stderr they are appended to the line as
``worker_id=... challenge_id=...``. ``message_id`` (a :class:`uuid.UUID` or 32 hex digits) becomes
the journal's ``MESSAGE_ID`` (message catalog id) and is shown on stderr like any other field.

The journal is used when ``JOURNAL_STREAM`` is set **and** names our stderr (``systemd.exec(5)``: a
child whose stderr was redirected elsewhere keeps the variable but must not use the journal).

Secrets: never pass key material, passwords, tokens, or whole config sections to a log call. As a
second line of defence, a field whose key contains ``secret``, ``password``, ``passwd``, ``token``
or ``key`` (``API_TOKEN``, ``HOTKEY_SEED``; see :func:`is_secret_key`) has its value replaced by
``<redacted>`` by both :func:`log_fields` and the installed handlers; :func:`redact` applies the
same rule to any mapping, and configuration errors hide such values the same way. The message
text itself is not inspected.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import uuid
from collections.abc import Mapping
from typing import Any, Final, TextIO

__all__ = [
    "REDACTED",
    "is_secret_key",
    "journal_stream_active",
    "log_fields",
    "redact",
    "setup_logging",
]

REDACTED: Final = "<redacted>"
_SECRET_PARTS: Final = ("secret", "password", "passwd", "token", "key")
_FIELD_RE: Final = re.compile(r"^[A-Z][A-Z0-9_]*$")
_MESSAGE_ID_RE: Final = re.compile(r"\A[0-9a-fA-F]{32}\Z")
# Fields that journald or the JournalHandler set themselves; an extra= with one of these is dropped.
_RESERVED: Final = frozenset(
    {
        "MESSAGE",
        "PRIORITY",
        "LOGGER",
        "THREAD_NAME",
        "PROCESS_NAME",
        "CODE_FILE",
        "CODE_LINE",
        "CODE_FUNC",
        "CODE_ARGS",
        "SYSLOG_IDENTIFIER",
        "EXCEPTION_TEXT",
        "EXCEPTION_INFO",
    }
)
_MARK: Final = "_byteleap_handler"


def is_secret_key(key: str) -> bool:
    """True when a field or config key named ``key`` may hold a secret (never log or show it).

    Case-insensitive: the name contains ``secret``, ``password``, ``passwd``, ``token`` or ``key``.
    The single rule for log redaction and for configuration error messages.
    """
    low = key.lower()
    return any(part in low for part in _SECRET_PARTS)


def redact(fields: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``fields`` with every secret-looking key's value replaced by ``<redacted>``."""
    return {k: (REDACTED if is_secret_key(k) else v) for k, v in fields.items()}


def log_fields(**kw: Any) -> dict[str, Any]:
    """Structured fields for ``extra=``: keys upper-cased (journal field names), secrets redacted.

    ``None`` values are left out. Keys must be identifiers (``worker_id``, not ``worker-id``).
    ``message_id`` must be a :class:`uuid.UUID` or 32 hex digits; it is passed on as 32 lowercase
    hex digits (the journal's ``MESSAGE_ID`` format).
    """
    out: dict[str, Any] = {}
    for key, value in kw.items():
        name = key.upper()
        if not _FIELD_RE.match(name):
            raise ValueError(f"invalid log field name {key!r}")
        if name in _RESERVED:
            raise ValueError(f"log field name {key!r} is reserved")
        if value is None:
            continue
        if name == "MESSAGE_ID":
            value = _message_id(value)
        out[name] = value
    return redact(out)


def _message_id(value: object) -> str:
    if isinstance(value, uuid.UUID):
        return value.hex
    if isinstance(value, str) and _MESSAGE_ID_RE.match(value):
        return value.lower()
    raise ValueError(f"message_id must be a UUID or 32 hex digits, got {value!r}")


def _is_field(name: str) -> bool:
    """Whether a record attribute is a structured field (an upper-case name ``extra=`` set)."""
    return _FIELD_RE.match(name) is not None and name not in _RESERVED


def _record_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The structured fields on a record, secret-looking ones redacted."""
    return {
        k: (REDACTED if is_secret_key(k) else v) for k, v in record.__dict__.items() if _is_field(k)
    }


class _RedactFilter(logging.Filter):
    """Redacts secret-looking structured fields on the record itself.

    For handlers that send the record's attributes as they are (the JournalHandler).
    :class:`PlainFormatter` redacts while it collects the fields, so the stderr handler does not
    need this filter and each record's fields are collected once.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        for key in [k for k in record.__dict__ if _is_field(k) and is_secret_key(k)]:
            setattr(record, key, REDACTED)
        return True


def _format_value(value: Any) -> str:
    text = str(value)
    if text == "" or any(c.isspace() or c in '"=' for c in text):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


class PlainFormatter(logging.Formatter):
    """``LEVEL agent: message key=value ...`` on one line (tracebacks follow on their own lines).

    Secret-looking fields are shown as ``<redacted>``.
    """

    def __init__(self, agent: str) -> None:
        super().__init__()
        self.agent = agent

    def format(self, record: logging.LogRecord) -> str:
        line = f"{record.levelname} {self.agent}: {record.getMessage()}"
        fields = _record_fields(record)
        if fields:
            line += " " + " ".join(f"{k.lower()}={_format_value(v)}" for k, v in fields.items())
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line += "\n" + record.exc_text
        if record.stack_info:
            line += "\n" + self.formatStack(record.stack_info)
        return line


def journal_stream_active(
    environ: Mapping[str, str] | None = None, stream: TextIO | None = None
) -> bool:
    """True when ``JOURNAL_STREAM`` (``DEVICE:INODE``) is set and matches our stderr."""
    env = os.environ if environ is None else environ
    value = env.get("JOURNAL_STREAM", "")
    if not value:
        return False
    try:
        dev_s, ino_s = value.split(":", 1)
        dev, ino = int(dev_s), int(ino_s)
        st = os.fstat((stream if stream is not None else sys.stderr).fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return st.st_dev == dev and st.st_ino == ino


def _journal_handler(agent: str) -> logging.Handler:
    from systemd.journal import JournalHandler

    handler: logging.Handler = JournalHandler(SYSLOG_IDENTIFIER=agent)
    return handler


def setup_logging(agent: str, level: str = "info") -> logging.Handler:
    """Configure the root logger for ``agent`` (e.g. ``"worker"``) at ``level`` (``"debug"``, ...).

    Idempotent: a handler installed by an earlier call is replaced. Returns the new handler.
    """
    levelno = logging.getLevelName(level.upper())
    if not isinstance(levelno, int):
        raise ValueError(f"unknown log level {level!r}")
    handler: logging.Handler
    if journal_stream_active():
        handler = _journal_handler(agent)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler.addFilter(_RedactFilter())
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(PlainFormatter(agent))  # redacts as it formats
    setattr(handler, _MARK, True)
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, _MARK, False):
            root.removeHandler(old)
            old.close()
    root.addHandler(handler)
    root.setLevel(levelno)
    return handler
