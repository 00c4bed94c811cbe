"""A pure-Python stand-in for systemd's side of ``sd_notify(3)`` (stdlib only).

Runs a daemon with ``NOTIFY_SOCKET`` pointing at a private ``AF_UNIX``/``SOCK_DGRAM`` socket
(and ``WATCHDOG_USEC`` when ``watchdog_sec`` is given; ``WATCHDOG_PID`` is removed so the daemon
takes the watchdog as its own), and records every notification with its arrival time
(``time.monotonic()``) and sender pid (``SO_PASSCRED``), so tests can check the ``Type=notify``
contract without PID 1::

    with NotifyHarness([sys.executable, "-m", "byteleap.worker"], watchdog_sec=1) as h:
        h.wait_for("READY=1", timeout=30)
        time.sleep(3)
        assert max(h.watchdog_gaps()) < 1.0
        assert h.terminate() == 0
        assert h.find("STOPPING=1")

The daemon runs in its own session/process group; leaving the ``with`` block kills that whole group
(SIGKILL), so no daemon outlives a test. Its stdout and stderr go to a file: :meth:`output`.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

__all__ = ["NotifyHarness", "NotifyMessage"]

_UCRED = struct.Struct("iII")  # struct ucred: pid_t pid, uid_t uid, gid_t gid


@dataclass(frozen=True)
class NotifyMessage:
    """One datagram: arrival time (monotonic), sender pid (None if unknown), text, assignments."""

    time: float
    pid: int | None
    raw: str
    fields: dict[str, str] = field(default_factory=dict)

    def matches(self, pattern: str) -> bool:
        """``KEY=VALUE`` matches that exact assignment; a bare ``KEY`` matches any value."""
        key, sep, value = pattern.partition("=")
        if key not in self.fields:
            return False
        return not sep or self.fields[key] == value


def _parse(raw: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in raw.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            out[key] = value
    return out


class NotifyHarness:
    def __init__(
        self,
        cmd: Sequence[str],
        env: Mapping[str, str] | None = None,
        watchdog_sec: float | None = None,
        cwd: str | os.PathLike[str] | None = None,
    ) -> None:
        self.cmd = list(cmd)
        self.extra_env = dict(env or {})
        self.watchdog_sec = watchdog_sec
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at: float | None = None
        self._messages: list[NotifyMessage] = []
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._dir: str | None = None
        self._sock: socket.socket | None = None
        self._reader: threading.Thread | None = None
        self._log_path: Path | None = None
        self._final_output = ""

    # -- lifecycle ---------------------------------------------------------------------------
    def __enter__(self) -> NotifyHarness:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def socket_path(self) -> str:
        assert self._dir is not None, "harness not started"
        return str(Path(self._dir) / "notify")

    def start(self) -> None:
        self._dir = tempfile.mkdtemp(prefix="nh-", dir="/tmp")  # AF_UNIX paths max ~107 bytes
        self._log_path = Path(self._dir) / "output.log"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock = sock
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)  # before any datagram arrives
        sock.bind(self.socket_path)
        sock.settimeout(0.1)
        self._reader = threading.Thread(target=self._read_loop, name="notify-harness", daemon=True)
        self._reader.start()

        env = dict(os.environ)
        for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "JOURNAL_STREAM"):
            env.pop(name, None)
        env.update(self.extra_env)
        env["NOTIFY_SOCKET"] = self.socket_path
        if self.watchdog_sec is not None:
            env["WATCHDOG_USEC"] = str(int(self.watchdog_sec * 1_000_000))
        with self._log_path.open("wb") as out:
            self.proc = subprocess.Popen(
                self.cmd,
                env=env,
                cwd=self.cwd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.started_at = time.monotonic()

    def close(self) -> None:
        """Kill the daemon's process group (whatever is left), stop reading, remove the socket."""
        proc = self.proc
        if proc is not None:
            # The group id is the daemon's pid; it cannot be reused while any member is alive.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):  # unkillable (D state)
                proc.wait(timeout=10)
        self._stop.set()
        if self._reader is not None:
            self._reader.join(timeout=5)
            self._reader = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._dir is not None:
            # keep the output readable after close: load it first
            self._final_output = self._read_output()
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def _read_loop(self) -> None:
        sock = self._sock
        assert sock is not None
        anc_size = socket.CMSG_SPACE(_UCRED.size)
        while not self._stop.is_set():
            try:
                data, ancdata, _flags, _addr = sock.recvmsg(65536, anc_size)
            except TimeoutError:
                continue
            except OSError:
                return
            now = time.monotonic()
            pid: int | None = None
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = _UCRED.unpack(payload[: _UCRED.size])[0]
            raw = data.decode("utf-8", errors="replace")
            with self._cond:
                self._messages.append(NotifyMessage(now, pid, raw, _parse(raw)))
                self._cond.notify_all()

    # -- observations ------------------------------------------------------------------------
    @property
    def messages(self) -> list[NotifyMessage]:
        """A snapshot of every message received so far, in arrival order."""
        with self._cond:
            return list(self._messages)

    def find(self, pattern: str) -> list[NotifyMessage]:
        """Messages that match ``pattern`` (see :meth:`NotifyMessage.matches`)."""
        return [m for m in self.messages if m.matches(pattern)]

    def wait_for(self, pattern: str, timeout: float = 30.0, after: int = 0) -> NotifyMessage:
        """The first message (index ``after`` on) matching ``pattern``, waiting up to ``timeout``.

        Raises ``TimeoutError`` (with the messages and the daemon's output) when none arrives in
        time, or as soon as the daemon has exited without sending it.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for msg in self._messages[after:]:
                    if msg.matches(pattern):
                        return msg
                exited = self.proc is not None and self.proc.poll() is not None
                remaining = deadline - time.monotonic()
                if remaining <= 0 or exited:
                    break
                self._cond.wait(min(remaining, 0.1))
        if exited:  # a datagram sent just before exit may still be in flight
            time.sleep(0.2)
            for msg in self.messages[after:]:
                if msg.matches(pattern):
                    return msg
        why = f"daemon exited with {self.returncode}" if exited else f"no message in {timeout}s"
        raise TimeoutError(
            f"{pattern!r} not received ({why}); messages: {[m.raw for m in self.messages]!r}\n"
            f"--- daemon output ---\n{self.output()}"
        )

    def status_lines(self) -> list[str]:
        """Every ``STATUS=`` value, in order."""
        return [m.fields["STATUS"] for m in self.messages if "STATUS" in m.fields]

    def watchdog_times(self) -> list[float]:
        return [m.time for m in self.messages if m.fields.get("WATCHDOG") == "1"]

    def watchdog_gaps(self, include_open: bool = False) -> list[float]:
        """Seconds between consecutive ``WATCHDOG=1`` pings.

        With ``include_open``, the time from the last ping (or from the start, if none came) until
        now is appended while the daemon is still running: what systemd's watchdog timer would see.
        """
        times = self.watchdog_times()
        gaps = [b - a for a, b in itertools.pairwise(times)]
        if include_open and self.proc is not None and self.proc.poll() is None:
            since = times[-1] if times else self.started_at
            if since is not None:
                gaps.append(time.monotonic() - since)
        return gaps

    @property
    def pid(self) -> int:
        assert self.proc is not None, "harness not started"
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def _read_output(self) -> str:
        if self._log_path is None or not self._log_path.exists():
            return ""
        return self._log_path.read_text(errors="replace")

    def output(self) -> str:
        """The daemon's stdout and stderr so far (also available after :meth:`close`)."""
        if self._dir is None:
            return self._final_output
        return self._read_output()

    # -- control -----------------------------------------------------------------------------
    def send_signal(self, sig: int) -> None:
        assert self.proc is not None, "harness not started"
        self.proc.send_signal(sig)

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM to the main process (like systemd's stop), wait, return its exit code.

        If it has not exited within ``timeout``, the process group is killed and ``TimeoutError``
        raised (a daemon that ignores SIGTERM fails the test rather than hanging it).
        """
        assert self.proc is not None, "harness not started"
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
            raise TimeoutError(
                f"daemon did not exit within {timeout}s of SIGTERM\n"
                f"--- daemon output ---\n{self.output()}"
            ) from None
