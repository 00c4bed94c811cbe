"""Wire messages the miner tests build: one inventory and one challenge-request builder."""

from __future__ import annotations

import secrets

from byteleap.core import wire

HOTKEY = "5GrwvaEF5zXb26Fz9rcQpDWS57CtERHpNehXCPcNoHGKutQY"  # //Alice, the tests' miner
N = 128


def inventory(*gpus: str) -> wire.Inventory:
    """A worker inventory with these GPU uuids (the CPU prover is always there)."""
    return wire.Inventory(
        cpu_model="Test CPU",
        cpu_cores=2,
        mem_bytes=8 << 30,
        gpus=[
            wire.GpuInfo(
                uuid=uuid, name="Test GPU", mem_bytes=16 << 30, pci_bus_id=f"0000:{i + 1:02x}:00.0"
            )
            for i, uuid in enumerate(gpus)
        ],
    )


def challenge_request(
    device: str = "cpu-0", *, n: int = N, deadline_ms: int = 30_000
) -> wire.ChallengeRequest:
    """A fresh fp32 challenge for ``device`` (random id and seed)."""
    return wire.ChallengeRequest(
        challenge_id=secrets.token_bytes(16),
        seed=secrets.token_bytes(32),
        miner_hotkey=HOTKEY,
        device_uuid=device,
        n=n,
        precision="fp32",
        deadline_ms=deadline_ms,
    )
