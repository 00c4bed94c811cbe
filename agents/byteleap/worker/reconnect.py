"""The frame the worker's two links share: attempts until stopped, status reports, sessions.

:class:`~.link.WorkerLink` (to the miner) and :class:`~.gateway_link.GatewayLink` (to the
gateway) are each a loop of attempts (connect, serve, wait, again) that runs until ``stop()``.
:class:`ReconnectLoop` is that loop: :meth:`~ReconnectLoop.run` wraps the attempts in the link's
own set-up and clean-up, :meth:`~ReconnectLoop.stop` may be called from any task and waits for
that clean-up, and every status change goes to ``on_status``. :func:`first_to_end` runs a
session's concurrent tasks until one of them ends.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
from collections.abc import Callable, Collection
from typing import Generic, TypeVar

import aiohttp

__all__ = ["ReconnectLoop", "first_to_end"]

log = logging.getLogger(__name__)

StatusT = TypeVar("StatusT")


class ReconnectLoop(abc.ABC, Generic[StatusT]):
    """Run :meth:`_attempt` again and again until :meth:`stop`; report status snapshots."""

    def __init__(self, status: StatusT, on_status: Callable[[StatusT], None] | None) -> None:
        self._status = status
        self._on_status = on_status
        self._task: asyncio.Task[None] | None = None
        self._finished = asyncio.Event()
        self._stopping = False

    @property
    def status(self) -> StatusT:
        return self._status

    async def run(self) -> None:
        """Attempt, wait, attempt again... until :meth:`stop`. Returns after a clean shutdown."""
        if self._task is not None:
            raise RuntimeError(f"{type(self).__name__}.run() is already running")
        self._task = asyncio.current_task()
        try:
            async with self._around_attempts(), aiohttp.ClientSession() as http:
                while not self._stopping:
                    await self._attempt(http)
        except asyncio.CancelledError:
            if not self._stopping:
                raise
            current = asyncio.current_task()
            if current is not None:  # the cancel came from stop(): it is handled here
                current.uncancel()
        finally:
            self._emit(self._stopped_status())
            self._task = None
            self._finished.set()

    async def stop(self) -> None:
        """End the current session and make :meth:`run` return (after its clean-up)."""
        self._stopping = True
        task = self._task
        if task is not None and task is not asyncio.current_task() and not task.done():
            task.cancel()
            # Wait for run()'s clean-up, not for its task: that task may go on to wait for us.
            await self._finished.wait()

    @abc.abstractmethod
    def _around_attempts(self) -> contextlib.AbstractAsyncContextManager[None]:
        """Set-up before the first attempt and clean-up after the last (also on failure)."""

    @abc.abstractmethod
    async def _attempt(self, http: aiohttp.ClientSession) -> None:
        """One attempt: connect, serve until the session ends, then wait before the next."""

    @abc.abstractmethod
    def _stopped_status(self) -> StatusT:
        """The status reported when :meth:`run` returns."""

    def _emit(self, status: StatusT) -> None:
        self._status = status
        if self._on_status is not None:
            try:
                self._on_status(status)
            except Exception:
                log.exception("%s status callback failed", type(self).__name__)


async def first_to_end(tasks: Collection[asyncio.Task[None]]) -> asyncio.Task[None]:
    """Wait until one of ``tasks`` ends, then cancel the others and wait for them; returns the
    one that ended (its exception says why). Cancelled itself, it cancels them all."""
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return done.pop()
