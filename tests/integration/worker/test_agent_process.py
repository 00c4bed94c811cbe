"""byteleap-worker as a real process under a fake systemd notify socket (NotifyHarness)."""

from __future__ import annotations

import importlib.util
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import pytest

from byteleap.core import wire
from byteleap.core.challenge.device_process import DeviceProcess
from byteleap.core.config import load_config
from byteleap.worker.agent import CPU_DEVICE, build_devices
from byteleap.worker.config import ENV_PREFIX, ChallengeSettings, GpuSettings, WorkerConfig
from tests.support.fixtures import agent_command, free_port, write_secret
from tests.support.notify_harness import NotifyHarness

START_TIMEOUT = 30.0  # interpreter start-up and imports on a loaded 2-core machine


def _write_config(tmp_path: Path, extra: str = "") -> Path:
    secret = write_secret(tmp_path / "enrollment.secret", b"0123456789abcdef0123456789abcdef")
    config = tmp_path / "worker.yaml"
    config.write_text(
        f"state_dir: {tmp_path / 'state'}\n"
        "heartbeat_interval_s: 1\n"
        "miner:\n"
        f"  url: ws://127.0.0.1:{free_port()}/worker\n"
        f"  enrollment_secret_file: {secret}\n"
        "  reconnect_initial_s: 0.1\n"
        "  reconnect_max_s: 0.5\n"
        "  connect_timeout_s: 2\n" + extra
    )
    return config


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BYTELEAP_WORKER")}
    env.pop("CREDENTIALS_DIRECTORY", None)
    return env


def test_ready_watchdog_and_clean_stop_with_the_miner_unreachable(tmp_path: Path) -> None:
    config = _write_config(tmp_path)
    with NotifyHarness(agent_command("worker", config), env=_env(), watchdog_sec=1) as h:
        ready = h.wait_for("READY=1", timeout=START_TIMEOUT)
        assert "miner unreachable" in ready.fields.get("STATUS", ""), ready.raw
        assert "connection refused" in ready.fields["STATUS"]
        assert ready.pid == h.pid

        time.sleep(2.0)  # reconnect attempts keep failing meanwhile
        gaps = h.watchdog_gaps()
        assert len(h.watchdog_times()) >= 4, h.messages
        assert max(gaps) < 1.0, gaps  # WatchdogSec=1: pings every ~0.5 s from the loop
        assert any("miner unreachable" in line for line in h.status_lines()[1:])

        assert h.terminate(timeout=20) == 0, h.output()
        assert h.find("STOPPING=1")
        output = h.output()
    assert "retrying in" in output and "attempt 1 failed: connection refused" in output

    state = tmp_path / "state"
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert stat.S_IMODE((state / "worker.key").stat().st_mode) == 0o600


@pytest.mark.parametrize(
    ("extra", "env", "expected"),
    [
        ("heartbeat_interval_s: 0\n", {}, "heartbeat_interval_s"),
        ("", {"BYTELEAP_WORKER__MINER__URL": "http://miner:7799"}, "miner.url"),
        ("", {"BYTELEAP_WORKER__MINER__TLS_FINGERPRINT": "ab" * 32}, "miner.tls_fingerprint"),
        ("", {"BYTELEAP_WORKER__MINER__ENROLLMENT_SECRET_FILE": "/nonexistent"}, "/nonexistent"),
    ],
)
def test_bad_configuration_exits_2_with_one_line(
    tmp_path: Path, extra: str, env: dict[str, str], expected: str
) -> None:
    config = _write_config(tmp_path)
    if extra:
        config.write_text(config.read_text().replace("heartbeat_interval_s: 1\n", extra))
    result = subprocess.run(
        agent_command("worker", config),
        env={**_env(), **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("byteleap-worker: ") and expected in lines[0]
    assert "0123456789abcdef" not in result.stderr  # never the secret


def _gpu(uuid: str, address: str, *, capability: str = "9.0", vfio: bool = False) -> wire.GpuInfo:
    return wire.GpuInfo(
        uuid=uuid,
        name="NVIDIA H100 80GB HBM3",
        mem_bytes=80 << 30,
        pci_bus_id=address,
        compute_capability=capability,
        vfio_bound=vfio,
    )


H100 = _gpu("GPU-11111111-2222-3333-4444-555555555555", "0000:1B:00.0")
A10 = _gpu("GPU-aaaaaaaa-2222-3333-4444-555555555555", "0000:3b:00.0", capability="8.6")
V100 = _gpu("GPU-bbbbbbbb-2222-3333-4444-555555555555", "0000:5e:00.0", capability="7.0")
LEASED = _gpu("PCI-0000:81:00.0", "0000:81:00.0", vfio=True)


def _cpu_prover(gpu: wire.GpuInfo, cache_dir: Path) -> DeviceProcess:
    """A real prover process on the CPU, standing in for CuPy where no GPU is."""
    return DeviceProcess("numpy", gpu.uuid, cache_dir=cache_dir)


def test_challenge_devices_are_cpu_only_without_cuda_or_in_passthrough(tmp_path: Path) -> None:
    cfg = load_config(None, WorkerConfig, env_prefix=ENV_PREFIX, environ={})
    cfg = msgspec.structs.replace(cfg, state_dir=str(tmp_path))
    bare = wire.Inventory(cpu_model="Test CPU", cpu_cores=2, mem_bytes=1 << 30)
    devices = build_devices(cfg, bare)
    assert [(d.uuid, d.precisions) for d in devices] == [(CPU_DEVICE, frozenset({"fp32"}))]

    # With GPUs that could prove, passthrough GPUs belong to VMs and numpy means CPU only.
    inv = msgspec.structs.replace(bare, gpus=[H100])
    for changed in (
        msgspec.structs.replace(cfg, gpu=GpuSettings(mode="passthrough")),
        msgspec.structs.replace(cfg, challenge=ChallengeSettings(backend="numpy")),
    ):
        assert [d.uuid for d in build_devices(changed, inv, make_prover=_cpu_prover)] == [
            CPU_DEVICE
        ]


def test_each_gpu_on_the_nvidia_driver_proves_in_a_process_of_its_own(tmp_path: Path) -> None:
    cfg = load_config(None, WorkerConfig, env_prefix=ENV_PREFIX, environ={})
    cfg = msgspec.structs.replace(cfg, state_dir=str(tmp_path))
    inv = wire.Inventory(
        cpu_model="Test CPU", cpu_cores=2, mem_bytes=1 << 30, gpus=[H100, A10, V100, LEASED]
    )
    devices = build_devices(cfg, inv, make_prover=_cpu_prover)
    try:
        assert [d.uuid for d in devices] == [CPU_DEVICE, H100.uuid, A10.uuid, V100.uuid]
        precisions = {d.uuid: d.precisions for d in devices}
        assert precisions[A10.uuid] == {"fp32", "fp16", "tf32", "bf16"}
        assert precisions[V100.uuid] == {"fp32", "fp16"}  # no tf32/bf16 before Ampere
        provers = [d.backend for d in devices[1:]]
        assert all(isinstance(p, DeviceProcess) for p in provers)
        pids = {p.pid for p in provers if isinstance(p, DeviceProcess)}
        assert None not in pids and len(pids) == 3 and os.getpid() not in pids
    finally:
        for device in devices[1:]:
            if isinstance(device.backend, DeviceProcess):
                device.backend.stop()


def test_a_gpu_whose_prover_fails_is_left_out_and_the_others_carry_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = load_config(None, WorkerConfig, env_prefix=ENV_PREFIX, environ={})
    cfg = msgspec.structs.replace(cfg, state_dir=str(tmp_path))
    inv = wire.Inventory(cpu_model="Test CPU", cpu_cores=2, mem_bytes=1 << 30, gpus=[H100, A10])
    broken = tmp_path / "broken-python"
    broken.write_text(f"#!{sys.executable}\nimport sys\nsys.exit(3)\n")
    broken.chmod(0o755)

    def one_broken(gpu: wire.GpuInfo, cache_dir: Path) -> DeviceProcess:
        if gpu is A10:
            return DeviceProcess("numpy", gpu.uuid, python=str(broken))
        return _cpu_prover(gpu, cache_dir)

    devices = build_devices(cfg, inv, make_prover=one_broken)
    try:
        assert [d.uuid for d in devices] == [CPU_DEVICE, H100.uuid]
        assert f"GPU {A10.uuid}" in caplog.text and "exit status 3" in caplog.text
    finally:
        for device in devices[1:]:
            if isinstance(device.backend, DeviceProcess):
                device.backend.stop()


@pytest.mark.skipif(
    importlib.util.find_spec("cupy") is not None, reason="CuPy is installed on this host"
)
def test_without_cupy_every_gpu_says_why_and_cpu_0_carries_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = load_config(None, WorkerConfig, env_prefix=ENV_PREFIX, environ={})
    cfg = msgspec.structs.replace(cfg, state_dir=str(tmp_path))
    inv = wire.Inventory(cpu_model="Test CPU", cpu_cores=2, mem_bytes=1 << 30, gpus=[H100])
    assert [d.uuid for d in build_devices(cfg, inv)] == [CPU_DEVICE]
    assert "CuPy is not installed" in caplog.text and H100.uuid in caplog.text
