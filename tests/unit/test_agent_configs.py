"""Worker and miner configs: defaults are usable, bad values name the key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from byteleap.core.config import ConfigError, load_config
from byteleap.miner.config import ENV_PREFIX as MINER_ENV
from byteleap.miner.config import MinerConfig
from byteleap.worker.config import ENV_PREFIX as WORKER_ENV
from byteleap.worker.config import GatewaySection, WorkerConfig
from byteleap.worker.vm.config import VmSettings


def test_defaults_load_without_a_file() -> None:
    worker = load_config(None, WorkerConfig, env_prefix=WORKER_ENV, environ={})
    miner = load_config(None, MinerConfig, env_prefix=MINER_ENV, environ={})
    assert worker.miner.url.startswith("ws://")
    assert miner.policy.max_workers == 100


def test_env_override_and_bad_values(tmp_path: Path) -> None:
    cfg = tmp_path / "worker.yaml"
    cfg.write_text("miner:\n  url: wss://miner.example:7799/worker\nheartbeat_interval_s: 10\n")
    env = {"BYTELEAP_WORKER__GPU__MODE": "host"}
    worker = load_config(cfg, WorkerConfig, env_prefix=WORKER_ENV, environ=env)
    assert worker.gpu.mode == "host" and worker.heartbeat_interval_s == 10

    cfg.write_text("miner:\n  url: http://nope\n")
    with pytest.raises(ConfigError, match=r"miner\.url"):
        load_config(cfg, WorkerConfig, env_prefix=WORKER_ENV, environ={})
    with pytest.raises(ConfigError, match=r"policy\.max_workers"):
        load_config(
            None,
            MinerConfig,
            env_prefix=MINER_ENV,
            environ={"BYTELEAP_MINER__POLICY__MAX_WORKERS": "101"},
        )


def test_worker_vm_section_needs_a_gpu_mode_that_can_lease(tmp_path: Path) -> None:
    digest = "a" * 64
    vm = f"vm:\n  base_image: /var/lib/byteleap/base.qcow2\n  base_image_sha256: {digest}\n"
    host = tmp_path / "host.yaml"
    host.write_text("gpu:\n  mode: host\n" + vm)
    with pytest.raises(ConfigError, match=r"vm: leases need gpu\.mode auto or passthrough"):
        load_config(host, WorkerConfig, env_prefix=WORKER_ENV, environ={})
    auto = tmp_path / "auto.yaml"
    auto.write_text("gpu:\n  mode: auto\n" + vm)
    cfg = load_config(auto, WorkerConfig, env_prefix=WORKER_ENV, environ={})
    assert cfg.vm is not None and cfg.vm.base_image_sha256 == digest
    assert load_config(None, WorkerConfig, env_prefix=WORKER_ENV, environ={}).vm is None


PACKAGED_WORKER = Path(__file__).parents[2] / "debian" / "config" / "worker.yaml"


def test_packaged_worker_config_takes_no_leases_and_its_lease_example_is_valid(
    tmp_path: Path,
) -> None:
    packaged = load_config(PACKAGED_WORKER, WorkerConfig, env_prefix=WORKER_ENV, environ={})
    assert packaged.vm is None and not packaged.gateway.enabled

    # Uncommented (with a real digest and a gpu.mode that can lease), the example loads and
    # shows exactly the defaults for every optional key.
    text = PACKAGED_WORKER.read_text()
    example = re.sub(r"(?m)^#(gateway:|vm:|  )", r"\1", text)
    assert example.count("\ngateway:\n") == 1 and example.count("\nvm:\n") == 1
    example = re.sub(r"base_image_sha256: <[^>]*>", "base_image_sha256: " + "a" * 64, example)
    example = example.replace("  mode: host\n", "  mode: auto\n")
    path = tmp_path / "worker.yaml"
    path.write_text(example)
    cfg = load_config(path, WorkerConfig, env_prefix=WORKER_ENV, environ={})
    assert cfg.vm == VmSettings(
        base_image="/var/lib/byteleap/images/debian-12-genericcloud-amd64.qcow2",
        base_image_sha256="a" * 64,
    )
    assert cfg.gateway == GatewaySection(enabled=True, ssh_host="gpu7.example.org")
