"""systemd glue for the agents (all of them run as ``Type=notify`` services).

Typical use in an agent's ``main``::

    notifier = Notifier()
    loop = asyncio.get_running_loop()
    install_signal_handlers(loop, agent.shutdown, notifier)   # SIGTERM/SIGINT -> STOPPING=1, drain
    await agent.start()                                       # bind, connect: able to serve
    notifier.ready("listening on :8443")
    watchdog = asyncio.create_task(run_watchdog(notifier, watchdog_interval()))
    ...
    notifier.status("42 workers, round 17")                  # one human line, any time

Contract (DESIGN.md §8, research/infra.md §2):

* ``READY=1`` only once the agent can serve; ``EXTEND_TIMEOUT_USEC``
  (:meth:`Notifier.extend_timeout`) while a slow start is still making progress.
* ``WATCHDOG=1`` is sent **from the event loop** (:func:`run_watchdog`). A loop blocked for longer
  than ``WatchdogSec`` stops the pings and systemd kills and restarts the unit. That is deliberate:
  heavy or blocking work (challenges, GPU, disk, libvirt calls) must run in threads or processes
  (``asyncio.to_thread``, executors), never on the loop.
* ``STOPPING=1`` is sent before the graceful drain that SIGTERM starts.
* ExecStart must ``exec`` the interpreter (``NotifyAccess=main``): messages from child processes are
  dropped by systemd.

Without ``NOTIFY_SOCKET`` (in a shell, in tests) every :class:`Notifier` call is a silent no-op.
Notification failures are never raised into the caller; the first one is logged at warning level.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

import sdnotify

__all__ = [
    "Notifier",
    "ShutdownTrigger",
    "install_signal_handlers",
    "run_watchdog",
    "watchdog_interval",
]

log = logging.getLogger(__name__)


def _one_line(text: str) -> str:
    """STATUS= must be a single line: fold newlines and other control characters into spaces."""
    return " ".join("".join(c if c.isprintable() else " " for c in text).split())


class Notifier:
    """``sd_notify(3)`` through the ``sdnotify`` package; a no-op when ``NOTIFY_SOCKET`` is unset.

    Safe to call from any thread (each call is one datagram ``send``).
    """

    def __init__(self) -> None:
        self.socket_path: str | None = os.environ.get("NOTIFY_SOCKET") or None
        self._warned = False
        self._sd: Any = None
        if self.socket_path is None:
            return
        try:  # sdnotify connects here (reading NOTIFY_SOCKET itself, abstract '@' included)
            self._sd = sdnotify.SystemdNotifier(debug=True)
        except Exception as exc:  # bad path, socket gone, ...
            self._warn(exc)

    @property
    def enabled(self) -> bool:
        """True when a notification socket is connected (we run under systemd)."""
        return self._sd is not None

    def _warn(self, exc: BaseException) -> None:
        if not self._warned:
            self._warned = True
            log.warning(
                "systemd notification to %s failed (further failures not logged): %s",
                self.socket_path,
                exc,
            )

    def notify(self, *assignments: str) -> bool:
        """Send ``KEY=VALUE`` assignments in one datagram; True when it was sent."""
        if self._sd is None or not assignments:
            return False
        # systemd expects UTF-8; sdnotify encodes latin-1: hand it the UTF-8 bytes as latin-1 text.
        payload = "\n".join(assignments).encode("utf-8").decode("latin-1")
        try:
            self._sd.notify(payload)
        except Exception as exc:
            self._warn(exc)
            return False
        return True

    @staticmethod
    def _with_status(first: str, status: str | None) -> list[str]:
        lines = [first]
        if status is not None:
            lines.append(f"STATUS={_one_line(status)}")
        return lines

    def ready(self, status: str | None = None) -> bool:
        """``READY=1`` (plus ``STATUS=``): the agent can serve now."""
        return self.notify(*self._with_status("READY=1", status))

    def status(self, line: str) -> bool:
        """``STATUS=`` one human line, e.g. ``42 workers, round 17, weights @ 4411``."""
        return self.notify(f"STATUS={_one_line(line)}")

    def stopping(self, status: str | None = None) -> bool:
        """``STOPPING=1`` (plus ``STATUS=``): graceful shutdown has begun."""
        return self.notify(*self._with_status("STOPPING=1", status))

    def watchdog(self) -> bool:
        """``WATCHDOG=1``: one keep-alive ping. Normally sent by :func:`run_watchdog` only."""
        return self.notify("WATCHDOG=1")

    def extend_timeout(self, seconds: float) -> bool:
        """``EXTEND_TIMEOUT_USEC``: ask for ``seconds`` more before start/stop times out."""
        return self.notify(f"EXTEND_TIMEOUT_USEC={max(0, int(seconds * 1_000_000))}")


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings: half of ``WATCHDOG_USEC`` (as
    ``sd_watchdog_enabled(3)`` recommends), or None when the watchdog is off, the value is invalid,
    or ``WATCHDOG_PID`` names another process (the watchdog is then meant for our parent, not us).
    """
    env = os.environ if environ is None else environ
    raw_usec = env.get("WATCHDOG_USEC", "").strip()
    if not raw_usec:
        return None
    try:
        usec = int(raw_usec)
    except ValueError:
        return None
    if usec <= 0:
        return None
    raw_pid = env.get("WATCHDOG_PID", "").strip()
    if raw_pid:
        try:
            pid = int(raw_pid)
        except ValueError:
            return None
        if pid != os.getpid():
            return None
    return usec / 2 / 1_000_000


async def run_watchdog(notifier: Notifier, interval: float | None) -> None:
    """Ping ``WATCHDOG=1`` every ``interval`` seconds from the running event loop, until cancelled.

    Returns at once when ``interval`` is None (watchdog off). The first ping goes out immediately.
    A ping that comes more than 1.5 intervals late means the loop was blocked; it is logged at
    warning level (systemd restarts the unit when the lag reaches ``WatchdogSec``).
    """
    if interval is None:
        return
    if interval <= 0:
        raise ValueError(f"watchdog interval must be positive, got {interval}")
    last: float | None = None
    while True:
        now = time.monotonic()
        if last is not None and now - last > 1.5 * interval:
            log.warning(
                "event loop was blocked: watchdog ping %.2fs late (interval %.2fs)",
                now - last - interval,
                interval,
            )
        notifier.watchdog()
        last = now
        await asyncio.sleep(interval)


class ShutdownTrigger:
    """Runs the async shutdown exactly once, whatever asks first (a signal or :meth:`trigger`).

    ``STOPPING=1`` is sent before the shutdown coroutine starts. :attr:`stopping` is set at that
    moment; :attr:`task` is the shutdown task (None until triggered).
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        on_stop: Callable[[], Awaitable[None]],
        notifier: Notifier | None = None,
    ) -> None:
        self._loop = loop
        self._on_stop = on_stop
        self._notifier = notifier
        self.stopping = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.reason: str | None = None

    def trigger(self, reason: str = "requested") -> None:
        """Begin shutdown (must be called on the loop's thread); later calls are ignored."""
        if self.task is not None:
            log.info("shutdown already in progress; ignoring %s", reason)
            return
        self.reason = reason
        log.info("shutting down (%s)", reason)
        if self._notifier is not None:
            self._notifier.stopping(f"stopping ({reason})")
        self.stopping.set()
        self.task = self._loop.create_task(self._run(), name="byteleap-shutdown")

    async def _run(self) -> None:
        try:
            await self._on_stop()
        except Exception:  # CancelledError is a BaseException: it propagates untouched
            log.exception("shutdown failed")
            raise

    async def wait(self) -> None:
        """Wait until shutdown has been triggered and has finished (errors are re-raised)."""
        await self.stopping.wait()
        assert self.task is not None
        await self.task


def install_signal_handlers(
    loop: asyncio.AbstractEventLoop,
    on_stop: Callable[[], Awaitable[None]],
    notifier: Notifier | None = None,
    signals: Iterable[signal.Signals] = (signal.SIGTERM, signal.SIGINT),
) -> ShutdownTrigger:
    """On SIGTERM/SIGINT send ``STOPPING=1``, then run ``on_stop()`` once (repeats are ignored).

    Returns the :class:`ShutdownTrigger`; ``await trigger.wait()`` in ``main`` to learn when the
    drain is done. Must be called from the loop's thread (``loop.add_signal_handler``).
    """
    trigger = ShutdownTrigger(loop, on_stop, notifier)
    for sig in signals:
        loop.add_signal_handler(sig, trigger.trigger, sig.name)
    return trigger
