"""The packages as an operator gets them: ``apt install`` in a booted Debian 12, run by systemd.

One container per module (systemd-nspawn ``--boot --volatile=overlay``, see container.py) gets
every package from the local apt repository that ``bin/build-debs`` makes (cached on a hash of
its inputs), then a devnet configured inside it by ``devnet_inside.py`` with the installed
venv's Python: a DevnetChain file, dev hotkeys as systemd credentials through drop-ins, and the
three agents pointed at each other on the container's loopback. The tests then drive the units
with systemctl and read what systemd and the journal say, in file order: install, start each
agent, weights on the chain from the three units together, a hung agent restarted by the
watchdog, and purge.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from .container import BootedContainer, booted
from .units import AGENTS, APT_ENV, REPO_INSIDE, SYSTEMD_DIR, VENV_BIN, AgentUnit

pytestmark = pytest.mark.system

SCRIPT_INSIDE = "/srv/byteleap-tests/devnet_inside.py"
PACKAGES = ("byteleap-common", *(agent.package for agent in AGENTS))
# What each agent's STATUS= line says once it is up on the devnet (agents' agent.py docstrings).
STATUS_PATTERNS = {
    "worker": r"connected to miner \S+ at ws://127\.0\.0\.1:7799/worker",
    "miner": r"1 worker online, 1/\d+ enrolled, 1/1 validator connected",
    "validator": r"1 miners, 1 workers online, round \d+",
    # No worker enrolls with the gateway here: its listeners are up and its store is open.
    "gateway": r"0 workers connected, 0 GPUs idle, 0 leases running",
}
# Short enough that a hung agent is noticed within the test, long enough for a loaded machine.
TEST_WATCHDOG_S = 10
T = TypeVar("T")


def eventually(
    probe: Callable[[], T | None],
    timeout: float,
    what: str,
    explain: Callable[[], str] = lambda: "",
) -> T:
    """Poll ``probe`` until it returns something other than None (synchronous twin of
    tests/support/fixtures.py ``eventually``: these tests drive subprocesses, not asyncio).
    ``explain`` adds what was seen last to the failure."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value is not None:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g} s: {what}\n{explain()}")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def container(
    debs: Path, image: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[BootedContainer]:
    log = tmp_path_factory.mktemp("container") / "console.log"
    binds = ((debs, REPO_INSIDE), (Path(__file__).with_name("devnet_inside.py"), SCRIPT_INSIDE))
    with booted(image, f"byteleap-agents-{os.getpid()}", log, binds=binds) as booted_container:
        # The local repository only: the test must not depend on (or reach) a Debian mirror.
        booted_container.use_apt_repository(REPO_INSIDE)
        booted_container.run(
            "apt-get", "install", "-y", "--no-install-recommends", *PACKAGES, env=APT_ENV
        )
        # apt started the units with the shipped (mainnet) configs and no hotkeys: stop them,
        # configure the devnet, and let each test start what it needs.
        units = [agent.unit for agent in AGENTS]
        booted_container.run("systemctl", "stop", *units, timeout=180)
        booted_container.run(str(VENV_BIN / "python"), SCRIPT_INSIDE, "configure")
        booted_container.run("systemctl", "daemon-reload")
        booted_container.run("systemctl", "reset-failed", *units, check=False)
        yield booted_container


def _active(container: BootedContainer, unit: str) -> bool:
    return container.show(unit, "ActiveState")["ActiveState"] == "active"


def _status_matching(container: BootedContainer, agent: AgentUnit) -> str | None:
    status = container.show(agent.unit, "StatusText")["StatusText"]
    return status if re.search(STATUS_PATTERNS[agent.agent], status) else None


def _start_all(container: BootedContainer) -> None:
    # Validator first: the miner finds it on chain, the worker needs the miner.
    for agent in reversed(AGENTS):
        container.run("systemctl", "start", agent.unit, timeout=180)


def test_packages_install_from_the_local_repository(container: BootedContainer) -> None:
    for package in PACKAGES:
        status = container.output("dpkg-query", "-W", "-f=${Status}", package)
        assert status == "install ok installed", f"{package}: {status}"
    version = container.output("byteleapctl", "version")
    assert re.fullmatch(r"byteleap \S+", version), version
    for agent in AGENTS:
        assert container.run("id", "-u", f"byteleap-{agent.agent}").returncode == 0
        assert container.output("systemctl", "is-enabled", agent.unit) == "enabled"
    # The miner's secret is generated at install (0600 root) and shared with the local worker,
    # whichever of the two apt configured first.
    for name in ("miner-enrollment.secret", "worker-enrollment.secret"):
        mode = container.output("stat", "-c", "%a %U", f"/etc/byteleap/{name}")
        assert mode == "600 root", f"{name}: {mode}"
    miner_secret = container.output("cat", "/etc/byteleap/miner-enrollment.secret")
    assert re.fullmatch(r"[0-9a-f]{64}", miner_secret)
    assert container.output("cat", "/etc/byteleap/worker-enrollment.secret") == miner_secret


@pytest.mark.parametrize("agent", AGENTS, ids=lambda a: a.agent)
def test_agent_runs_as_a_notify_service_with_status_and_watchdog(
    container: BootedContainer, agent: AgentUnit
) -> None:
    _start_all(container)  # every agent's STATUS names its peers
    assert container.output("systemctl", "is-active", agent.unit) == "active"
    status = eventually(
        lambda: _status_matching(container, agent),
        120,
        f"{agent.unit} STATUS matching {STATUS_PATTERNS[agent.agent]!r}",
        lambda: f"{container.show(agent.unit, 'StatusText')}\n{container.journal(agent.unit)}",
    )
    assert status
    shipped = re.search(r"^WatchdogSec=(\d+)s$", (SYSTEMD_DIR / agent.unit).read_text(), re.M)
    assert shipped is not None
    shown = container.show(agent.unit, "WatchdogUSec", "Type", "NRestarts", "User")
    assert shown["Type"] == "notify"
    assert shown["User"] == f"byteleap-{agent.agent}"
    assert shown["NRestarts"] == "0", container.journal(agent.unit)
    assert _seconds(shown["WatchdogUSec"]) == int(shipped.group(1)), shown
    journal = container.journal(agent.unit)
    assert re.search(r"Started byteleap-\w+\.service - ByteLeap", journal) or (
        "Started ByteLeap" in journal
    ), journal
    assert "Traceback" not in journal, journal


def _seconds(timespan: str) -> int:
    """systemd's timespan as ``systemctl show`` prints it (``1min``, ``45s``, ``1min 30s``)."""
    units = {"min": 60, "s": 1, "h": 3600}
    total = 0
    for number, unit in re.findall(r"(\d+)(min|s|h)\b", timespan):
        total += int(number) * units[unit]
    assert total, f"not a timespan: {timespan!r}"
    return total


def _weights_for_miner(container: BootedContainer) -> dict[str, int] | None:
    uids = json.loads(container.output(str(VENV_BIN / "python"), SCRIPT_INSIDE, "uids"))
    weights = json.loads(container.output(str(VENV_BIN / "python"), SCRIPT_INSIDE, "weights"))
    row = weights.get(str(uids["validator"]), {})
    if row.get(str(uids["miner"]), 0) > 0:
        return {"validator": uids["validator"], "miner": uids["miner"], **row}
    return None


def test_the_three_units_produce_weights_on_the_devnet_chain(
    container: BootedContainer,
) -> None:
    _start_all(container)
    found = eventually(
        lambda: _weights_for_miner(container),
        300,
        "the validator's weights for the miner on the devnet chain",
    )
    assert found
    for agent in AGENTS:
        assert _active(container, agent.unit), container.journal(agent.unit)
    validator_journal = container.journal("byteleap-validator.service")
    assert "Traceback" not in validator_journal, validator_journal


@pytest.mark.parametrize("agent", AGENTS, ids=lambda a: a.agent)
def test_a_hung_agent_is_restarted_by_the_watchdog(
    container: BootedContainer, agent: AgentUnit
) -> None:
    # The shipped 60 s watchdog would make this test wait minutes: a drop-in shortens it.
    container.write_file(
        f"/etc/systemd/system/{agent.unit}.d/zz-test-watchdog.conf",
        f"[Service]\nWatchdogSec={TEST_WATCHDOG_S}s\n",
    )
    container.run("systemctl", "daemon-reload")
    container.run("systemctl", "restart", agent.unit, timeout=180)
    before = container.show(agent.unit, "MainPID", "NRestarts", "WatchdogUSec")
    assert _seconds(before["WatchdogUSec"]) == TEST_WATCHDOG_S
    hung = int(before["MainPID"])
    assert hung > 0
    container.run("systemctl", "kill", "--kill-who=main", "--signal=SIGSTOP", agent.unit)
    state = container.output("cat", f"/proc/{hung}/stat").split(") ", 1)[1][0]
    assert state == "T", f"main PID {hung} is in state {state}, not stopped"

    def restarted() -> dict[str, str] | None:
        now = container.show(agent.unit, "MainPID", "NRestarts", "ActiveState")
        fresh = now["MainPID"] not in ("0", str(hung)) and now["ActiveState"] == "active"
        return now if fresh else None

    after = eventually(restarted, TEST_WATCHDOG_S + 120, f"{agent.unit} restarted")
    assert int(after["NRestarts"]) == int(before["NRestarts"]) + 1
    journal = container.journal(agent.unit)
    assert "Watchdog timeout" in journal, journal
    assert f"{agent.unit}: Failed with result 'watchdog'." in journal, journal
    container.run("rm", f"/etc/systemd/system/{agent.unit}.d/zz-test-watchdog.conf")
    container.run("systemctl", "daemon-reload")


def test_purge_stops_every_unit_and_removes_the_secrets(container: BootedContainer) -> None:
    _start_all(container)
    container.run("apt-get", "purge", "-y", *PACKAGES, env=APT_ENV, timeout=300)
    running = container.output(
        "systemctl", "list-units", "--all", "--plain", "--no-legend", "byteleap*"
    )
    assert " running " not in f" {running} ", running
    for agent in AGENTS:
        state = container.run("systemctl", "is-active", agent.unit, check=False).stdout.strip()
        assert state in ("inactive", "failed"), f"{agent.unit}: {state}"
    # No procps in the image: every process's command line straight from /proc.
    processes = container.output(
        "sh", "-c", 'for c in /proc/[0-9]*/cmdline; do tr "\\0" " " < "$c"; echo; done'
    )
    assert "/opt/venvs/byteleap" not in processes, processes
    for gone in (
        "/etc/byteleap/miner-enrollment.secret",
        "/etc/byteleap/worker-enrollment.secret",
        "/etc/byteleap/miner.yaml",
        "/opt/venvs/byteleap",
    ):
        assert container.run("test", "-e", gone, check=False).returncode == 1, gone
