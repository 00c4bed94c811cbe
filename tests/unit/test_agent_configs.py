"""Worker and miner configs: defaults are usable, bad values name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from byteleap.core.config import ConfigError, load_config
from byteleap.miner.config import ENV_PREFIX as MINER_ENV
from byteleap.miner.config import MinerConfig
from byteleap.worker.config import ENV_PREFIX as WORKER_ENV
from byteleap.worker.config import WorkerConfig


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
