"""Runs *inside* the booted container with the installed venv's Python (not under pytest).

``configure`` turns the freshly installed packages into a one-box devnet the way an operator
would configure a real host: a DevnetChain file (the chain), dev hotkeys written as keyfiles
under /etc/byteleap/keys and handed to the units as the systemd credential ``hotkey`` through
drop-ins (docs/packaging.md), and the three /etc/byteleap/*.yaml edited to point at the devnet
and at each other on loopback. The enrollment secrets are the packages' own (postinst).

``weights`` prints the weights on the devnet chain as JSON: ``{validator uid: {uid: u16}}``.
``uids`` prints ``{"validator": uid, "miner": uid}``.

The Ansible scenario (ansible/molecule/default/devnet_chain.py) makes the same devnet with
:func:`create_chain`, :func:`keyfile` and :func:`agent_settings`.

The miner and validator write the chain file (endpoint, weights) from their own users and
``PrivateUsers=yes`` sandboxes, so the file and its directory are open to every user: this is a
test chain on a throw-away container, never a pattern for real key material.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import bittensor_core
import yaml

from byteleap.chain.devnet import DevnetChain
from byteleap.core.identity import HotkeySigner
from byteleap.devnet.network import (
    BLOCK_TIME_S,
    NETUID,
    VALIDATOR_STAKE_RAO,
    WEIGHTS_RATE_LIMIT_BLOCKS,
    DevnetPlan,
)

CHAIN_DIR = Path("/var/lib/byteleap-devnet")
CHAIN = CHAIN_DIR / "chain.db"
ETC = Path("/etc/byteleap")
UNIT_DIR = Path("/etc/systemd/system")
URIS = {"validator": "//byteleap-system/validator", "miner": "//byteleap-system/miner"}
MINER_PORT = 7799
VALIDATOR_PORT = 7800
PLAN = DevnetPlan(rounds=2, round_interval_s=4, n=256)


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)


def _yaml(path: Path, data: dict[str, Any]) -> None:
    _write(path, yaml.safe_dump(data, sort_keys=False))


def keyfile(uri: str) -> bytes:
    """The dev hotkey of ``uri`` as a bittensor keyfile."""
    keypair = bittensor_core.Keypair.create_from_uri(uri, crypto_type=1)
    return bytes(bittensor_core.serialized_keypair_to_keyfile_data(keypair))


def create_chain(path: Path, *, overwrite: bool = False) -> dict[str, str]:
    """A DevnetChain file at ``path`` with the validator (stake, permit) and the miner
    registered; their hotkeys' ss58 addresses by agent."""
    chain = DevnetChain.create(
        path,
        netuid=NETUID,
        block_time=BLOCK_TIME_S,
        weights_rate_limit=WEIGHTS_RATE_LIMIT_BLOCKS,
        overwrite=overwrite,
    )
    hotkeys = {agent: HotkeySigner.from_uri(uri).ss58_address for agent, uri in URIS.items()}
    chain.register(
        NETUID, hotkeys["validator"], stake_rao=VALIDATOR_STAKE_RAO, validator_permit=True
    )
    chain.register(NETUID, hotkeys["miner"])
    return hotkeys


def agent_settings(miner_port: int, validator_port: int) -> dict[str, dict[str, Any]]:
    """Each agent's devnet settings: the chain at CHAIN, loopback ports, short rounds and
    heartbeats (the worker's miner URL and hotkey are the caller's)."""
    chain_section = {
        "network": "devnet",
        "devnet_path": str(CHAIN),
        "netuid": NETUID,
        "snapshot_refresh_s": 2.0,
    }
    return {
        "validator": {
            "listen": {"host": "127.0.0.1", "port": validator_port, "public_ip": "127.0.0.1"},
            "chain": chain_section,
            "rounds": {
                "interval_s": float(PLAN.round_interval_s),
                "cpu_n": PLAN.n,
                "commit_deadline_s": 30.0,
                "reveal_deadline_s": 30.0,
            },
            "scoring": PLAN.scoring(),
            "weights": {"interval_s": 0.0},
        },
        "miner": {
            "workers": {"host": "127.0.0.1", "port": miner_port},
            "policy": {"heartbeat_interval_s": 1.0, "heartbeat_timeout_s": 10.0},
            "chain": chain_section,
        },
        "worker": {
            "miner": {"reconnect_initial_s": 0.5, "reconnect_max_s": 2.0},
            "heartbeat_interval_s": 1.0,
            "challenge": {"backend": "numpy"},
        },
    }


def configure() -> None:
    CHAIN_DIR.mkdir(exist_ok=True)
    CHAIN_DIR.chmod(0o777)
    hotkeys = create_chain(CHAIN)
    CHAIN.chmod(0o666)

    for agent, uri in URIS.items():
        key = ETC / "keys" / f"{agent}-hotkey"
        key.parent.mkdir(mode=0o700, exist_ok=True)
        key.write_bytes(keyfile(uri))
        key.chmod(0o600)
        _write(
            UNIT_DIR / f"byteleap-{agent}.service.d" / "devnet.conf",
            f"[Service]\nLoadCredential=hotkey:{key}\nReadWritePaths={CHAIN_DIR}\n",
        )

    settings = agent_settings(MINER_PORT, VALIDATOR_PORT)
    for agent in ("validator", "miner"):
        _yaml(
            ETC / f"{agent}.yaml",
            {"state_dir": f"/var/lib/byteleap/{agent}", **settings[agent]},
        )
    worker = settings["worker"]
    miner = {
        "url": f"ws://127.0.0.1:{MINER_PORT}/worker",
        "hotkey": hotkeys["miner"],
        **worker["miner"],
    }
    _yaml(
        ETC / "worker.yaml",
        {
            "state_dir": "/var/lib/byteleap/worker",
            **worker,
            "miner": miner,
            "gpu": {"mode": "host"},
        },
    )


def weights() -> dict[int, dict[int, int]]:
    return DevnetChain(CHAIN).weights_sync(NETUID)


def uids() -> dict[str, int]:
    by_hotkey = {n.hotkey: n.uid for n in DevnetChain(CHAIN).snapshot_sync(NETUID).neurons}
    return {
        agent: by_hotkey[HotkeySigner.from_uri(uri).ss58_address] for agent, uri in URIS.items()
    }


def main(argv: list[str]) -> int:
    command = argv[1] if len(argv) == 2 else ""
    if command == "configure":
        os.umask(0o022)
        configure()
    elif command == "weights":
        print(json.dumps(weights()))
    elif command == "uids":
        print(json.dumps(uids()))
    else:
        print(f"usage: {argv[0]} configure|weights|uids", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
