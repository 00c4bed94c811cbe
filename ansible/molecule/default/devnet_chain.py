"""The scenario's devnet, made on the controller with the project's Python (molecule prepare).

``devnet_chain.py OUT_DIR`` writes into OUT_DIR what an operator's inventory would hold for a
one-host deployment on a devnet chain:

- ``chain.db``: a DevnetChain file with the validator (stake, permit) and the miner registered;
  prepare copies it to /var/lib/byteleap-devnet/chain.db in the container;
- ``validator-hotkey``, ``miner-hotkey``: dev hotkeys as bittensor keyfiles (0600), the files
  the inventory names as ``byteleap_agent_*_hotkey_file``;
- ``enrollment.secret``: a fresh random miner enrollment secret (0600);
- ``devnet.json``: the agents' config overrides (devnet chain, loopback ports, short rounds)
  and the miner's URL, read by the scenario's inventory.

The hotkeys, chain constants and round plan are the system tests' (tests/system/devnet_inside.py)
so both deployments run the same devnet. Ports differ from theirs: this container shares the
host's network, so they are picked away from the agents' defaults.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO))

from tests.system.devnet_inside import CHAIN, PLAN, URIS, _keyfile  # noqa: E402

from byteleap.chain.devnet import DevnetChain  # noqa: E402
from byteleap.core.identity import HotkeySigner  # noqa: E402
from byteleap.devnet.network import (  # noqa: E402
    BLOCK_TIME_S,
    NETUID,
    VALIDATOR_STAKE_RAO,
    WEIGHTS_RATE_LIMIT_BLOCKS,
)

MINER_PORT = 27799
VALIDATOR_PORT = 27800


def _private(path: Path, data: bytes) -> None:
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)


def make(out: Path) -> dict[str, object]:
    out.mkdir(parents=True, exist_ok=True)
    chain = DevnetChain.create(
        out / "chain.db",
        netuid=NETUID,
        block_time=BLOCK_TIME_S,
        weights_rate_limit=WEIGHTS_RATE_LIMIT_BLOCKS,
        overwrite=True,
    )
    hotkeys = {agent: HotkeySigner.from_uri(uri).ss58_address for agent, uri in URIS.items()}
    chain.register(
        NETUID, hotkeys["validator"], stake_rao=VALIDATOR_STAKE_RAO, validator_permit=True
    )
    chain.register(NETUID, hotkeys["miner"])
    for agent, uri in URIS.items():
        _private(out / f"{agent}-hotkey", _keyfile(uri))
    _private(out / "enrollment.secret", f"{secrets.token_hex(32)}\n".encode())

    chain_section = {
        "network": "devnet",
        "devnet_path": str(CHAIN),
        "netuid": NETUID,
        "snapshot_refresh_s": 2.0,
    }
    devnet = {
        "chain_path": str(CHAIN),
        "hotkeys": hotkeys,
        "miner_url": f"ws://127.0.0.1:{MINER_PORT}/worker",
        "validator": {
            "listen": {"host": "127.0.0.1", "port": VALIDATOR_PORT, "public_ip": "127.0.0.1"},
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
            "workers": {"host": "127.0.0.1", "port": MINER_PORT},
            "policy": {"heartbeat_interval_s": 1.0, "heartbeat_timeout_s": 10.0},
            "chain": chain_section,
        },
        "worker": {
            "miner": {"reconnect_initial_s": 0.5, "reconnect_max_s": 2.0},
            "heartbeat_interval_s": 1.0,
            "challenge": {"backend": "numpy"},
        },
    }
    (out / "devnet.json").write_text(json.dumps(devnet, indent=2) + "\n")
    return {"changed": True, "hotkeys": hotkeys}


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(f"usage: {argv[0]} OUT_DIR", file=sys.stderr)
        return 2
    print(json.dumps(make(Path(argv[1]))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
