"""The Ansible deployment (ansible/): ``molecule test`` on a booted systemd-nspawn container.

The scenario (ansible/molecule/default) boots the system tests' cached Debian 12 root, makes a
devnet chain and dev hotkeys with the project's Python, previews site.yml in check mode on the
fresh host, deploys it (GPU host role with the backports kernel and a static VFIO binding, then
validator, miner and worker from the local apt repository), runs it again to prove it changes
nothing, and verifies units, STATUS lines, secrets, kernel arguments and module files.

The connection plugin that reaches the container is also tested on its own: it must refuse a
PID that is not a container's, since a wrong PID would mean commands on the controller.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from .image import missing_tools
from .units import REPO

pytestmark = pytest.mark.system

ANSIBLE_DIR = REPO / "ansible"
VENV_BIN = REPO / ".venv" / "bin"
MOLECULE_TIMEOUT_S = 1800
RECAP = re.compile(
    r"^(\S+)\s+:\s+ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", re.M
)
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _env(**extra: str) -> dict[str, str]:
    # molecule and ansible-lint call ansible-playbook & co. by name: the venv's must come first.
    return {
        **os.environ,
        "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}",
        "ANSIBLE_FORCE_COLOR": "0",
        "NO_COLOR": "1",
        "PY_COLORS": "0",
        **extra,
    }


def _tool(name: str) -> str:
    path = VENV_BIN / name
    if not path.exists():
        pytest.skip(f"{path} is missing (make setup installs the dev dependencies)")
    return str(path)


def _tail(text: str, lines: int = 150) -> str:
    return "\n".join(text.splitlines()[-lines:])


def _step(output: str, step: str) -> str:
    """The part of molecule's output that one step printed."""
    start = output.find(f"[default > {step}] Executing")
    assert start >= 0, f"molecule never ran {step}:\n{_tail(output)}"
    end = output.find(f"[default > {step}] Executed", start)
    assert end >= 0, f"molecule's {step} did not finish:\n{_tail(output[start:])}"
    return output[start:end]


def test_molecule_converges_idempotently_and_verifies(debs: Path) -> None:
    if missing := missing_tools() + [t for t in ("nsenter",) if shutil.which(t) is None]:
        pytest.skip(f"missing {', '.join(missing)} (apt-get install debootstrap systemd-container)")
    molecule = _tool("molecule")
    result = subprocess.run(
        [molecule, "test"],
        cwd=ANSIBLE_DIR,
        env=_env(BYTELEAP_DEBS_DIR=str(debs)),
        # One stream: molecule logs its steps on stderr and the playbooks print on stdout.
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=MOLECULE_TIMEOUT_S,
        check=False,
    )
    output = ANSI.sub("", result.stdout)
    assert result.returncode == 0, f"molecule test exited {result.returncode}:\n{_tail(output)}"

    # check mode on the fresh host, converge, idempotence, verify: each ran and passed.
    for step in ("check", "converge", "idempotence", "verify"):
        assert f"[default > {step}] Executed: Successful" in output, _tail(output)
    converge = RECAP.findall(_step(output, "converge"))
    assert converge, _tail(output)
    assert all(int(changed) > 0 for _, _, changed, _, _ in converge), converge
    again = RECAP.findall(_step(output, "idempotence"))
    assert again, _tail(output)
    for host, _, changed, unreachable, failed in again:
        assert (changed, unreachable, failed) == ("0", "0", "0"), f"{host}: {again}"
    # The check step previewed a fresh host, where the apt modules cannot run yet.
    assert "check mode: python3-apt or python3-debian is not installed" in _step(output, "check")
    # The container cannot reboot: the run says so instead.
    assert "REBOOT REQUIRED" in _step(output, "converge"), _tail(output)


def _ping_through_nspawn(tmp_path: Path, host_vars: str) -> subprocess.CompletedProcess[str]:
    inventory = tmp_path / "hosts.yml"
    inventory.write_text(
        "all:\n  hosts:\n    target:\n      ansible_connection: nspawn\n"
        + "".join(f"      {line}\n" for line in host_vars.splitlines())
    )
    return subprocess.run(
        [_tool("ansible"), "-i", str(inventory), "target", "-m", "ansible.builtin.ping"],
        cwd=ANSIBLE_DIR,
        env=_env(ANSIBLE_CONNECTION_PLUGINS=str(ANSIBLE_DIR / "plugins" / "connection")),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_nspawn_connection_refuses_a_pid_in_the_controllers_namespace(tmp_path: Path) -> None:
    # Our own PID shares the controller's mount namespace: it must never be "entered".
    result = _ping_through_nspawn(tmp_path, f"ansible_nspawn_leader_pid: {os.getpid()}")
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "UNREACHABLE" in output, output
    assert "shares the controller's mount namespace" in output, output


@pytest.mark.parametrize(
    ("host_vars", "message"),
    [
        ("ansible_nspawn_leader_pid: 1", "refusing leader PID 1"),
        ("ansible_nspawn_leader_pid_file: /nonexistent/leader", "cannot read the leader PID"),
        ("ansible_python_interpreter: /usr/bin/python3", "set ansible_nspawn_leader_pid"),
    ],
    ids=["pid-1", "missing-file", "unset"],
)
def test_nspawn_connection_refuses_a_missing_or_unsafe_leader(
    tmp_path: Path, host_vars: str, message: str
) -> None:
    result = _ping_through_nspawn(tmp_path, host_vars)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert message in output, output


def test_nspawn_connection_rejects_a_pid_file_without_a_pid(tmp_path: Path) -> None:
    pid_file = tmp_path / "leader"
    pid_file.write_text("1; rm -rf /\n")
    result = _ping_through_nspawn(tmp_path, f"ansible_nspawn_leader_pid_file: {pid_file}")
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "does not hold a PID" in output, output


def test_site_yml_parses_with_the_example_inventory() -> None:
    result = subprocess.run(
        [_tool("ansible-playbook"), "--syntax-check", "site.yml", "-i", "inventories/example"],
        cwd=ANSIBLE_DIR,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # Every group the playbook names has hosts in the example, and every worker names a miner.
    listing = subprocess.run(
        [_tool("ansible-inventory"), "-i", "inventories/example", "--list"],
        cwd=ANSIBLE_DIR,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    inventory = json.loads(listing)
    for group in ("validators", "miners", "workers"):
        assert inventory.get(group, {}).get("hosts"), f"no hosts in {group}: {listing}"
    hostvars = inventory["_meta"]["hostvars"]
    for worker in inventory["workers"]["hosts"]:
        assert hostvars[worker]["byteleap_agent_worker_miner"] in inventory["miners"]["hosts"]
