"""A booted systemd container over the cached Debian 12 root (research/infra.md §2).

``systemd-nspawn --boot --volatile=overlay`` runs systemd as PID 1 of a throw-away container:
every write lands in a tmpfs and vanishes at power-off, so the cached root stays pristine and
tests never see each other's leftovers. Commands run inside through ``nsenter`` into the
container's PID 1, because the host has no systemd (no machined, no ``machinectl shell``); that
is also why nspawn runs with ``--register=no --keep-unit``. Each container gets its own host
cgroup (the host's hierarchies are v1 plus an empty unified one): without it, two containers'
services would share one host cgroup. ``--private-network`` leaves only ``lo`` inside, so the
agents' fixed ports never meet anything on the host; :func:`start_detached` (the molecule scenario's
create and destroy, two processes) may share the host's network instead, like a real host.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

CGROUP_HIERARCHIES = (Path("/sys/fs/cgroup/systemd"), Path("/sys/fs/cgroup/unified"))
BOOT_TIMEOUT_S = 120.0
POWEROFF_TIMEOUT_S = 60.0
# Runs before nspawn: joins the container's own cgroups, then becomes nspawn.
_JOIN_CGROUPS = 'for procs in $BYTELEAP_CGROUP_PROCS; do echo $$ > "$procs"; done; exec "$@"'


class ContainerError(Exception):
    """The container did not boot, or a command inside it failed; the message says which."""


class BootedContainer:
    """One running container; use :func:`booted` to get one that is always powered off."""

    def __init__(self, nspawn: subprocess.Popen[bytes], leader: int, log: Path) -> None:
        self.nspawn = nspawn
        self.leader = leader
        """The container's PID 1 (systemd), as the host numbers it."""
        self.log = log

    def run(
        self,
        *command: str,
        check: bool = True,
        timeout: float = 300,
        env: dict[str, str] | None = None,
        stdin: str = "",
    ) -> subprocess.CompletedProcess[str]:
        """``command`` inside the container as root; ``check``: a non-zero exit raises."""
        prefix = ["env", *(f"{key}={value}" for key, value in (env or {}).items())]
        argv = ["nsenter", "-t", str(self.leader), "-a", *prefix, *command]
        result = subprocess.run(
            argv, input=stdin, capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and result.returncode != 0:
            raise ContainerError(
                f"{' '.join(command)} exited with {result.returncode}:\n"
                f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
            )
        return result

    def output(self, *command: str, timeout: float = 300) -> str:
        return self.run(*command, timeout=timeout).stdout.strip()

    def show(self, unit: str, *properties: str) -> dict[str, str]:
        """``systemctl show -p ...`` as a mapping (every property asked for is present)."""
        text = self.output("systemctl", "show", unit, *(f"--property={p}" for p in properties))
        values = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
        return {name: values.get(name, "") for name in properties}

    def journal(self, unit: str) -> str:
        return self.output("journalctl", "--no-pager", "-o", "cat", "-u", unit)

    def write_file(self, path: str, content: str, mode: str = "0644") -> None:
        """A root-owned file inside the container (parent directories created)."""
        self.run("mkdir", "-p", str(Path(path).parent))
        # Positional arguments and stdin: neither the path nor the content is ever parsed by sh.
        self.run(
            "sh",
            "-c",
            'umask 077 && cat > "$1" && chmod "$2" "$1"',
            "sh",
            path,
            mode,
            stdin=content,
        )

    def use_apt_repository(self, directory: str) -> None:
        """apt takes packages only from the flat repository at ``directory`` inside (no mirror)."""
        self.write_file("/etc/apt/sources.list", "")
        self.write_file(
            "/etc/apt/sources.list.d/byteleap.list", f"deb [trusted=yes] file:{directory} ./\n"
        )
        self.run("apt-get", "update")


def _children(pid: int) -> list[int]:
    children: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            children += [int(c) for c in (task / "children").read_text().split()]
    return children


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _wait_for_leader(nspawn: subprocess.Popen[bytes], log: Path) -> int:
    deadline = time.monotonic() + BOOT_TIMEOUT_S
    while time.monotonic() < deadline:
        for child in _children(nspawn.pid):
            if _comm(child) == "systemd":
                return child
        if nspawn.poll() is not None:
            raise ContainerError(f"systemd-nspawn exited with {nspawn.returncode}:\n{_tail(log)}")
        time.sleep(0.1)
    raise ContainerError(f"no systemd inside the container after {BOOT_TIMEOUT_S:g} s")


def _wait_until_running(container: BootedContainer) -> None:
    deadline = time.monotonic() + BOOT_TIMEOUT_S
    state = ""
    while time.monotonic() < deadline:
        result = container.run("systemctl", "is-system-running", "--wait", check=False, timeout=60)
        state = result.stdout.strip()
        if state in ("running", "degraded"):
            return
        time.sleep(0.2)
    raise ContainerError(
        f"container did not finish booting (state {state!r}):\n{_tail(container.log)}"
    )


def _tail(log: Path) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(log.read_text(errors="replace").splitlines()[-40:])
    return ""


def _make_cgroups(name: str) -> list[Path]:
    made = []
    for hierarchy in CGROUP_HIERARCHIES:
        if hierarchy.is_dir():
            (hierarchy / name).mkdir(exist_ok=True)
            made.append(hierarchy / name)
    return made


def _remove_cgroups(cgroups: Sequence[Path]) -> None:
    # Deepest first: a cgroup directory goes only when it is empty of children.
    for cgroup in cgroups:
        if not cgroup.is_dir():
            continue
        for directory in sorted(
            (p for p in cgroup.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)
        ):
            with contextlib.suppress(OSError):
                directory.rmdir()
        with contextlib.suppress(OSError):
            cgroup.rmdir()


def _kill(nspawn: subprocess.Popen[bytes]) -> None:
    if nspawn.poll() is None:
        nspawn.send_signal(signal.SIGKILL)
        nspawn.wait(timeout=30)


def _poweroff(container: BootedContainer) -> None:
    nspawn = container.nspawn
    if nspawn.poll() is None:
        container.run("systemctl", "poweroff", "--no-block", check=False, timeout=60)
        try:
            nspawn.wait(timeout=POWEROFF_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            _kill(nspawn)


def _nspawn_args(
    root: Path,
    machine: str,
    *,
    binds: Sequence[tuple[Path, str]],
    binds_rw: Sequence[tuple[Path, str]],
    private_network: bool,
) -> list[str]:
    return [
        "systemd-nspawn",
        "--quiet",
        f"--directory={root}",
        f"--machine={machine}",
        "--register=no",
        "--keep-unit",
        "--console=passive",
        "--volatile=overlay",
        *(["--private-network"] if private_network else []),
        *(f"--bind-ro={host}:{inside}" for host, inside in binds),
        *(f"--bind={host}:{inside}" for host, inside in binds_rw),
        "--boot",
    ]


def _spawn(nspawn_args: list[str], cgroups: Sequence[Path], log: Path) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "BYTELEAP_CGROUP_PROCS": " ".join(str(c / "cgroup.procs") for c in cgroups),
    }
    with log.open("wb") as console:
        return subprocess.Popen(
            ["/bin/sh", "-c", _JOIN_CGROUPS, "sh", *nspawn_args],
            stdin=subprocess.DEVNULL,
            stdout=console,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )


def _boot(
    root: Path,
    machine: str,
    log: Path,
    *,
    binds: Sequence[tuple[Path, str]],
    binds_rw: Sequence[tuple[Path, str]] = (),
    private_network: bool = True,
) -> tuple[BootedContainer, list[Path]]:
    """A container booted to ``running`` and its host cgroups. One that does not get there is
    killed (its root is a throw-away overlay) and its cgroups removed."""
    cgroups = _make_cgroups(f"byteleap-{machine}")
    args = _nspawn_args(
        root, machine, binds=binds, binds_rw=binds_rw, private_network=private_network
    )
    nspawn = _spawn(args, cgroups, log)
    try:
        container = BootedContainer(nspawn, _wait_for_leader(nspawn, log), log)
        _wait_until_running(container)
    except BaseException:
        _kill(nspawn)
        _remove_cgroups(cgroups)
        raise
    return container, cgroups


@contextlib.contextmanager
def booted(
    root: Path, machine: str, log: Path, *, binds: Sequence[tuple[Path, str]] = ()
) -> Iterator[BootedContainer]:
    """Boot ``root`` as machine ``machine`` (console log in ``log``), power it off at exit.

    ``binds``: host paths mounted read-only at the given paths inside.
    """
    container, cgroups = _boot(root, machine, log, binds=binds)
    try:
        yield container
    finally:
        _poweroff(container)
        _remove_cgroups(cgroups)


# Containers that outlive the process that booted them (molecule's create and destroy are two
# processes): everything the stopping process needs is in a Detached, which is JSON-friendly.


@dataclass(frozen=True)
class Detached:
    """A running container booted by :func:`start_detached`."""

    nspawn_pid: int
    nspawn_start_ticks: int
    """Start time of the nspawn process (/proc/PID/stat): a recycled PID is never signalled."""
    leader: int
    cgroups: tuple[str, ...]
    log: str


def _start_ticks(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks, None once it is gone (or a zombie)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return None if fields[0] == "Z" else int(fields[19])


def start_detached(
    root: Path,
    machine: str,
    log: Path,
    *,
    binds: Sequence[tuple[Path, str]] = (),
    binds_rw: Sequence[tuple[Path, str]] = (),
    private_network: bool = True,
) -> Detached:
    """Boot ``root`` like :func:`booted` and leave it running; :func:`stop_detached` ends it.

    ``binds_rw``: host paths mounted read-write. ``private_network=False`` shares the host's
    network (apt inside reaches the mirror like a real host).
    """
    container, cgroups = _boot(
        root, machine, log, binds=binds, binds_rw=binds_rw, private_network=private_network
    )
    start = _start_ticks(container.nspawn.pid)
    if start is None:
        _kill(container.nspawn)
        _remove_cgroups(cgroups)
        raise ContainerError(f"systemd-nspawn exited right after booting:\n{_tail(log)}")
    return Detached(
        nspawn_pid=container.nspawn.pid,
        nspawn_start_ticks=start,
        leader=container.leader,
        cgroups=tuple(str(c) for c in cgroups),
        log=str(log),
    )


def _alive(detached: Detached) -> bool:
    return _start_ticks(detached.nspawn_pid) == detached.nspawn_start_ticks


def stop_detached(detached: Detached, timeout: float = POWEROFF_TIMEOUT_S) -> bool:
    """Power the container off (SIGKILL after ``timeout``) and remove its cgroups.

    True: it powered off cleanly or was already gone; False: it had to be killed.
    """
    clean = True
    if _alive(detached):
        subprocess.run(
            ["nsenter", "-t", str(detached.leader), "-a", "systemctl", "poweroff", "--no-block"],
            capture_output=True,
            timeout=60,
            check=False,
        )
        deadline = time.monotonic() + timeout
        while _alive(detached) and time.monotonic() < deadline:
            time.sleep(0.2)
        if _alive(detached):
            clean = False
            with contextlib.suppress(ProcessLookupError):
                os.kill(detached.nspawn_pid, signal.SIGKILL)
            deadline = time.monotonic() + 30
            while _alive(detached) and time.monotonic() < deadline:
                time.sleep(0.2)
    _remove_cgroups([Path(c) for c in detached.cgroups])
    return clean
