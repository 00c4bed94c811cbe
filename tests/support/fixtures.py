"""Helpers shared by the integration tests: ports, secret files, configs, polling."""

from __future__ import annotations

import asyncio
import socket
import sys
from collections.abc import Callable
from pathlib import Path

from byteleap.core.files import write_new_file

WAIT = 10.0  # generous: the suite runs on a loaded 2-core machine


def free_port() -> int:
    """A loopback TCP port nobody listens on (at the time of the call)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_secret(path: Path, secret: bytes) -> Path:
    """A 0600 secret file, as an operator would create it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    write_new_file(path, secret + b"\n")
    return path


def agent_command(agent: str, config: Path, *extra: str) -> list[str]:
    """``python -m byteleap.<agent>.agent --config CONFIG ...`` with this interpreter."""
    return [sys.executable, "-m", f"byteleap.{agent}.agent", "--config", str(config), *extra]


async def eventually(
    check: Callable[[], bool], within: float = WAIT, interval: float = 0.02
) -> None:
    """Wait until ``check()`` is true (fails the test after ``within`` seconds)."""
    deadline = asyncio.get_running_loop().time() + within
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not reached within {within} s")
        await asyncio.sleep(interval)
