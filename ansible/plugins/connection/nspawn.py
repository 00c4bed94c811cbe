"""Ansible connection into a booted systemd-nspawn container through ``nsenter``.

The molecule scenario boots Debian in ``systemd-nspawn --boot`` on a host that has no systemd as
PID 1 (so no machined, no ``machinectl shell``), no sshd in the image and no Ansible collections;
``nsenter --target <container PID 1> --all`` is the one way in. Files travel through the same
door, as the standard input or output of ``cat`` inside the container.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

from ansible.errors import AnsibleConnectionFailure, AnsibleError, AnsibleFileNotFound
from ansible.plugins.connection import ConnectionBase
from ansible.utils.display import Display

DOCUMENTATION = """
    name: nspawn
    short_description: Run tasks inside a booted systemd-nspawn container through nsenter
    description:
        - Commands run as root in every namespace of the container's PID 1
          (C(nsenter --target PID --all)), with a clean environment.
        - Files are copied through the standard input and output of C(cat) inside the container.
        - The leader PID must live in another mount namespace than the controller; anything else
          is refused, so a wrong or stale PID never turns into commands on the controller.
    author: ByteLeap
    extends_documentation_fragment:
        - connection_pipelining
    options:
        leader_pid:
            description: PID (as the controller numbers it) of the container's PID 1.
            type: int
            vars:
                - name: ansible_nspawn_leader_pid
        leader_pid_file:
            description: File holding the leader PID (read when the connection opens).
            type: path
            vars:
                - name: ansible_nspawn_leader_pid_file
        nsenter:
            description: The controller's nsenter executable (name or path).
            type: str
            default: nsenter
            vars:
                - name: ansible_nspawn_nsenter
    notes:
        - Runs as root; O(remote_user) is ignored. Become methods that prompt are not supported.
        - With pipelining on, modules reach the container's Python on its standard input.
"""

display = Display()

# The container's own view: nothing of the controller's environment (virtualenv PATH,
# ANSIBLE_*, MOLECULE_*) leaks into the commands.
CONTAINER_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
}
SHELL = "/bin/sh"
# put_file: the destination is an argument of sh, never parsed as shell text.
WRITE_STDIN = 'cat > "$1"'


def read_leader(pid: int | None, pid_file: str | None) -> int:
    """The leader PID from the option or the file, checked to be a live process."""
    if pid is None:
        if not pid_file:
            raise AnsibleConnectionFailure(
                "nspawn connection: set ansible_nspawn_leader_pid or ansible_nspawn_leader_pid_file"
            )
        try:
            text = Path(pid_file).read_text().strip()
        except OSError as exc:
            raise AnsibleConnectionFailure(
                f"nspawn connection: cannot read the leader PID file {pid_file}: {exc.strerror}"
                " (is the container running? molecule create writes it)"
            ) from None
        if not text.isdigit():
            raise AnsibleConnectionFailure(
                f"nspawn connection: {pid_file} does not hold a PID: {text[:40]!r}"
            )
        pid = int(text)
    if pid <= 1:
        raise AnsibleConnectionFailure(f"nspawn connection: refusing leader PID {pid}")
    if not Path(f"/proc/{pid}").is_dir():
        raise AnsibleConnectionFailure(
            f"nspawn connection: no process {pid}: the container is not running"
        )
    return pid


def check_foreign_mount_namespace(pid: int) -> None:
    """Refuse a PID that shares the controller's mount namespace: it is not in a container."""
    try:
        theirs = Path(f"/proc/{pid}/ns/mnt").readlink()
        ours = Path("/proc/self/ns/mnt").readlink()
    except OSError as exc:
        raise AnsibleConnectionFailure(
            f"nspawn connection: cannot read the mount namespace of PID {pid}: {exc.strerror}"
            " (nsenter needs root)"
        ) from None
    if theirs == ours:
        raise AnsibleConnectionFailure(
            f"nspawn connection: PID {pid} shares the controller's mount namespace ({ours}); "
            "it is not a container's PID 1, refusing to run commands on the controller"
        )


class Connection(ConnectionBase):  # type: ignore[misc]  # ansible ships no type information
    """Commands and files through ``nsenter`` into a booted container."""

    transport = "nspawn"
    has_pipelining = True
    _connected: bool

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._leader: int | None = None
        self._nsenter = ""

    def _connect(self) -> Connection:
        if self._connected:
            return self
        nsenter = shutil.which(self.get_option("nsenter"))
        if nsenter is None:
            raise AnsibleConnectionFailure(
                f"nspawn connection: {self.get_option('nsenter')} not found on the controller "
                "(Debian package util-linux)"
            )
        leader = read_leader(self.get_option("leader_pid"), self.get_option("leader_pid_file"))
        check_foreign_mount_namespace(leader)
        self._nsenter = nsenter
        self._leader = leader
        self._play_context.remote_user = "root"
        display.vvv(f"NSPAWN CONNECT leader PID {leader}", host=self._play_context.remote_addr)
        self._connected = True
        return self

    def _argv(self, *command: str) -> list[str]:
        assert self._leader is not None, "_connect() sets the leader"
        return [self._nsenter, "--target", str(self._leader), "--all", *command]

    def _run(self, argv: list[str], stdin: bytes | None) -> tuple[int, bytes, bytes]:
        try:
            # argv is nsenter's fixed prefix plus what Ansible runs; no shell on the controller.
            result = subprocess.run(  # noqa: S603
                argv,
                input=stdin if stdin is not None else b"",
                capture_output=True,
                env=CONTAINER_ENV,
                check=False,
            )
        except OSError as exc:
            raise AnsibleConnectionFailure(
                f"nspawn connection: cannot run {argv[0]}: {exc.strerror}"
            ) from None
        return result.returncode, result.stdout, result.stderr

    def exec_command(
        self, cmd: str, in_data: bytes | None = None, sudoable: bool = True
    ) -> tuple[int, bytes, bytes]:
        super().exec_command(cmd, in_data=in_data, sudoable=sudoable)
        if sudoable and self.become and self.become.expect_prompt():
            raise AnsibleError("nspawn connection: become methods that ask for a password")
        display.vvv(f"NSPAWN EXEC {cmd}", host=self._play_context.remote_addr)
        return self._run(self._argv(SHELL, "-c", cmd), in_data)

    def put_file(self, in_path: str, out_path: str) -> None:
        super().put_file(in_path, out_path)
        display.vvv(f"NSPAWN PUT {in_path} TO {out_path}", host=self._play_context.remote_addr)
        try:
            data = Path(in_path).read_bytes()
        except FileNotFoundError:
            raise AnsibleFileNotFound(f"file or module does not exist: {in_path}") from None
        except OSError as exc:
            raise AnsibleError(
                f"nspawn connection: cannot read {in_path}: {exc.strerror}"
            ) from None
        rc, _, stderr = self._run(self._argv(SHELL, "-c", WRITE_STDIN, SHELL, out_path), data)
        if rc != 0:
            raise AnsibleError(
                f"nspawn connection: writing {out_path} in the container failed ({rc}): "
                f"{stderr.decode(errors='replace').strip()}"
            )

    def fetch_file(self, in_path: str, out_path: str) -> None:
        super().fetch_file(in_path, out_path)
        display.vvv(f"NSPAWN FETCH {in_path} TO {out_path}", host=self._play_context.remote_addr)
        rc, stdout, stderr = self._run(self._argv("cat", "--", in_path), None)
        if rc != 0:
            raise AnsibleError(
                f"nspawn connection: reading {in_path} in the container failed ({rc}): "
                f"{stderr.decode(errors='replace').strip()}"
            )
        try:
            Path(out_path).write_bytes(stdout)
        except OSError as exc:
            raise AnsibleError(
                f"nspawn connection: cannot write {out_path}: {exc.strerror}"
            ) from None

    def close(self) -> None:
        self._connected = False
        self._leader = None
