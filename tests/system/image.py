"""The cached Debian 12 root that system tests boot or run commands in (research/infra.md §1-§2).

``debootstrap`` takes about a minute, so the root is built once per set of inputs and kept under
``$BYTELEAP_SYSTEM_CACHE`` (default ``/var/cache/byteleap-system-tests``). Tests never write to it:
every container runs with ``--volatile=overlay`` (writes go to a tmpfs and vanish).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
# libvirt0: byteleap-common links libvirt-python against it, and the containers have no mirror.
INCLUDE = ("systemd", "systemd-sysv", "dbus", "python3", "udev", "libvirt0")
CACHE_DIR = Path(os.environ.get("BYTELEAP_SYSTEM_CACHE", "/var/cache/byteleap-system-tests"))


class ImageError(Exception):
    """The root could not be built; the message says which command failed and why."""


def image_key() -> str:
    return hashlib.sha256(f"{SUITE} {MIRROR} {' '.join(INCLUDE)}".encode()).hexdigest()[:16]


def missing_tools() -> list[str]:
    return [tool for tool in ("debootstrap", "systemd-nspawn") if shutil.which(tool) is None]


def ensure_image() -> Path:
    """The cached root, built first if absent (atomically: a half-built root is never used)."""
    root = CACHE_DIR / f"root-{image_key()}"
    if (root / "usr/lib/systemd/systemd").exists():
        return root
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    partial = CACHE_DIR / f"partial-{image_key()}-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    result = subprocess.run(
        [
            "debootstrap",
            "--variant=minbase",
            f"--include={','.join(INCLUDE)}",
            SUITE,
            str(partial),
            MIRROR,
        ],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    if result.returncode != 0:
        shutil.rmtree(partial, ignore_errors=True)
        raise ImageError(f"debootstrap failed ({result.returncode}): {result.stderr[-2000:]}")
    (partial / "etc/hostname").write_text("byteleap-test\n")
    partial.rename(root)
    return root


def run_in_image(
    root: Path, *command: str, binds: tuple[tuple[Path, str], ...] = (), timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """One command in a throw-away (non-booted) container over ``root``."""
    args = [
        "systemd-nspawn",
        "-q",
        "-D",
        str(root),
        "--register=no",
        "--keep-unit",
        "--volatile=overlay",
    ]
    args += [f"--bind-ro={host}:{inside}" for host, inside in binds]
    return subprocess.run(
        [*args, *command], capture_output=True, text=True, timeout=timeout, check=False
    )
