"""byteleap.core.systemd: sd_notify contract, driven through the NOTIFY_SOCKET harness."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from byteleap.core import systemd as sd
from byteleap.core.systemd import (
    Notifier,
    install_signal_handlers,
    run_watchdog,
    watchdog_interval,
)
from tests.support.notify_harness import NotifyHarness

AGENTS_DIR = Path(sd.__file__).resolve().parents[2]
WATCHDOG_SEC = 1.0
TIMEOUT = 30.0  # generous: a loaded 2-core CI box may take seconds to start an interpreter

DAEMON = textwrap.dedent(
    """
    import asyncio, sys, time
    from byteleap.core.systemd import (
        Notifier, install_signal_handlers, run_watchdog, watchdog_interval)

    async def main() -> None:
        mode = sys.argv[1]
        notifier = Notifier()
        loop = asyncio.get_running_loop()

        async def shutdown() -> None:
            await asyncio.sleep(0.05)  # the drain
            print("drained", flush=True)

        trigger = install_signal_handlers(loop, shutdown, notifier)
        watchdog = asyncio.create_task(run_watchdog(notifier, watchdog_interval()))
        notifier.ready("3 workers, round 1")
        notifier.status("3 workers, round 2")
        if mode == "block":
            # heavy work wrongly done on the loop: no pings while it runs
            loop.call_later(1.2, time.sleep, 2.5)
        await trigger.wait()
        watchdog.cancel()

    asyncio.run(main())
    """
)


@pytest.fixture
def daemon(tmp_path: Path) -> Path:
    path = tmp_path / "daemon.py"
    path.write_text(DAEMON)
    return path


def _harness(daemon: Path, mode: str) -> NotifyHarness:
    pythonpath = os.pathsep.join(filter(None, [str(AGENTS_DIR), os.environ.get("PYTHONPATH")]))
    return NotifyHarness(
        [sys.executable, str(daemon), mode],
        env={"PYTHONPATH": pythonpath},
        watchdog_sec=WATCHDOG_SEC,
    )


def _wait_until(cond: object, timeout: float, what: str, h: NotifyHarness) -> None:
    assert callable(cond)
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}; output:\n{h.output()}")
        if h.returncode is not None:
            pytest.fail(f"daemon exited ({h.returncode}) waiting for {what}:\n{h.output()}")
        time.sleep(0.05)


def test_daemon_ready_status_watchdog_stopping(daemon: Path) -> None:
    with _harness(daemon, "healthy") as h:
        ready = h.wait_for("READY=1", timeout=TIMEOUT)
        assert ready.fields.get("STATUS") == "3 workers, round 1"
        _wait_until(lambda: len(h.watchdog_times()) >= 6, TIMEOUT, "6 watchdog pings", h)
        gaps = h.watchdog_gaps()
        assert gaps, h.messages
        # the watchdog contract: systemd kills the unit when a gap reaches WatchdogSec
        assert max(gaps) < WATCHDOG_SEC, gaps
        assert "3 workers, round 2" in h.status_lines()

        before = len(h.messages)
        assert h.terminate(timeout=TIMEOUT) == 0, h.output()
        stopping = h.wait_for("STOPPING=1", timeout=5, after=before)
        assert "drained" in h.output()
        # NotifyAccess=main: everything came from the main process
        assert {m.pid for m in h.messages} == {h.pid}
        assert stopping.time >= ready.time


def test_blocked_event_loop_stops_watchdog(daemon: Path) -> None:
    with _harness(daemon, "block") as h:
        h.wait_for("READY=1", timeout=TIMEOUT)

        def resumed_after_gap() -> bool:
            return any(g > WATCHDOG_SEC for g in h.watchdog_gaps())

        _wait_until(resumed_after_gap, TIMEOUT, "a watchdog gap beyond WatchdogSec", h)
        gap = max(h.watchdog_gaps())
        assert gap >= 2.0, h.watchdog_gaps()  # the loop was blocked for 2.5 s
        assert "event loop was blocked" in h.output()
        assert h.terminate(timeout=TIMEOUT) == 0


def test_harness_reports_daemon_without_ready(tmp_path: Path) -> None:
    with NotifyHarness([sys.executable, "-c", "print('no notify')"], watchdog_sec=1) as h:
        with pytest.raises(TimeoutError, match="exited with 0"):
            h.wait_for("READY=1", timeout=TIMEOUT)
        assert "no notify" in h.output()
    assert "no notify" in h.output()


def _alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (orphans may wait a while to be reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_harness_kills_process_group_on_exit(tmp_path: Path) -> None:
    script = (
        "import subprocess, time; p = subprocess.Popen(['sleep', '300']);"
        " print(p.pid, flush=True); time.sleep(300)"
    )
    with NotifyHarness([sys.executable, "-c", script]) as h:
        deadline = time.monotonic() + TIMEOUT
        while not h.output().strip() and time.monotonic() < deadline:
            time.sleep(0.05)
        child = int(h.output().split()[0])
        main = h.pid
        assert _alive(child)
    deadline = time.monotonic() + 10
    while (_alive(child) or _alive(main)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child)
    assert not _alive(main)


# -- Notifier ------------------------------------------------------------------------------


@pytest.fixture
def notify_socket(monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    d = tempfile.mkdtemp(dir="/tmp", prefix="nt-")
    path = str(Path(d) / "s")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    try:
        yield sock
    finally:
        sock.close()
        Path(path).unlink(missing_ok=True)
        Path(d).rmdir()


def test_notifier_noop_without_socket(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    n = Notifier()
    assert not n.enabled
    with caplog.at_level(logging.DEBUG):
        assert n.ready("x") is False
        assert n.status("x") is False
        assert n.watchdog() is False
        assert n.stopping() is False
        assert n.extend_timeout(5) is False
    assert caplog.records == []


def test_notifier_sends(notify_socket: socket.socket) -> None:
    n = Notifier()
    assert n.enabled
    assert n.ready("line one\nline two")
    assert notify_socket.recv(4096) == b"READY=1\nSTATUS=line one line two"
    assert n.status("42 workers, round 17 \u2713")
    assert notify_socket.recv(4096) == "STATUS=42 workers, round 17 \u2713".encode()
    assert n.watchdog()
    assert notify_socket.recv(4096) == b"WATCHDOG=1"
    assert n.extend_timeout(2.5)
    assert notify_socket.recv(4096) == b"EXTEND_TIMEOUT_USEC=2500000"
    assert n.stopping()
    assert notify_socket.recv(4096) == b"STOPPING=1"


def test_notifier_never_raises_and_warns_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "/tmp/nonexistent-byteleap-notify/s")
    with caplog.at_level(logging.WARNING, logger="byteleap.core.systemd"):
        n = Notifier()
        assert not n.enabled
        assert n.ready() is False
    assert len(caplog.records) == 1


def test_notifier_send_failure_warns_once(
    notify_socket: socket.socket, caplog: pytest.LogCaptureFixture
) -> None:
    n = Notifier()
    notify_socket.close()
    Path(os.environ["NOTIFY_SOCKET"]).unlink()  # the receiver went away (systemd restarted)
    with caplog.at_level(logging.WARNING, logger="byteleap.core.systemd"):
        assert n.watchdog() is False
        assert n.watchdog() is False
    assert len(caplog.records) == 1
    assert "further failures not logged" in caplog.records[0].getMessage()


# -- watchdog_interval -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "1000000"}, 0.5),
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "abc"}, None),
        ({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}, 1.0),
        ({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"}, None),
        ({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "x"}, None),
    ],
)
def test_watchdog_interval(env: dict[str, str], expected: float | None) -> None:
    assert watchdog_interval(env) == expected


def test_watchdog_interval_reads_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "4000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert watchdog_interval() == 2.0


# -- run_watchdog / signals ----------------------------------------------------------------


class _Counting(Notifier):
    def __init__(self) -> None:
        super().__init__()
        self.sent: list[str] = []

    def notify(self, *assignments: str) -> bool:
        self.sent.append("\n".join(assignments))
        return True


async def test_run_watchdog_pings_until_cancelled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    n = _Counting()
    task = asyncio.create_task(run_watchdog(n, 0.01))
    await asyncio.sleep(0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(n.sent) >= 3
    assert set(n.sent) == {"WATCHDOG=1"}


async def test_run_watchdog_off() -> None:
    await asyncio.wait_for(run_watchdog(Notifier(), None), timeout=1)
    with pytest.raises(ValueError, match="positive"):
        await run_watchdog(Notifier(), 0)


async def test_signal_handlers_stop_exactly_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    n = _Counting()
    loop = asyncio.get_running_loop()
    calls: list[list[str]] = []

    async def on_stop() -> None:
        calls.append(list(n.sent))  # what had been sent when shutdown began
        await asyncio.sleep(0.05)

    trigger = install_signal_handlers(loop, on_stop, n)
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(trigger.stopping.wait(), timeout=10)
        os.kill(os.getpid(), signal.SIGINT)
        await asyncio.sleep(0.05)
        trigger.trigger("again")
        await asyncio.wait_for(trigger.wait(), timeout=10)
    finally:
        loop.remove_signal_handler(signal.SIGTERM)
        loop.remove_signal_handler(signal.SIGINT)
    assert trigger.reason == "SIGTERM"
    assert len(calls) == 1
    assert calls[0] == ["STOPPING=1\nSTATUS=stopping (SIGTERM)"]
    assert n.sent.count("STOPPING=1\nSTATUS=stopping (SIGTERM)") == 1


async def test_shutdown_error_is_reraised_by_wait() -> None:
    async def on_stop() -> None:
        raise RuntimeError("drain failed")

    trigger = sd.ShutdownTrigger(asyncio.get_running_loop(), on_stop)
    trigger.trigger()
    with pytest.raises(RuntimeError, match="drain failed"):
        await trigger.wait()


async def test_cancelled_shutdown_is_not_logged_as_failure(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def on_stop() -> None:
        await asyncio.sleep(3600)

    trigger = sd.ShutdownTrigger(asyncio.get_running_loop(), on_stop)
    trigger.trigger()
    await asyncio.sleep(0)
    assert trigger.task is not None
    trigger.task.cancel()
    with caplog.at_level(logging.ERROR), pytest.raises(asyncio.CancelledError):
        await trigger.wait()
    assert "shutdown failed" not in caplog.text
