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

The chain, hotkeys and agent settings are the system tests' (tests/system/devnet_inside.py) so
both deployments run the same devnet. Ports differ from theirs: this container shares the host's
network, so they are picked away from the agents' defaults.
"""

from __future__ import annotations

import json
import secrets
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO))

from tests.system.devnet_inside import (  # noqa: E402
    CHAIN,
    URIS,
    agent_settings,
    create_chain,
    keyfile,
)

from byteleap.core.files import replace_private_file  # noqa: E402

MINER_PORT = 27799
VALIDATOR_PORT = 27800


def make(out: Path) -> dict[str, object]:
    out.mkdir(parents=True, exist_ok=True)
    hotkeys = create_chain(out / "chain.db", overwrite=True)
    for agent, uri in URIS.items():
        replace_private_file(out / f"{agent}-hotkey", keyfile(uri))
    replace_private_file(out / "enrollment.secret", f"{secrets.token_hex(32)}\n".encode())
    devnet = {
        "chain_path": str(CHAIN),
        "hotkeys": hotkeys,
        "miner_url": f"ws://127.0.0.1:{MINER_PORT}/worker",
        **agent_settings(MINER_PORT, VALIDATOR_PORT),
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
