"""DevnetChain specifics: the shared file, the clock, the outage switch, failure modes, admin API.

What every adapter must do is in the contract suite (test_devnet_contract.py); this module covers
what only the devnet has.
"""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from byteleap.chain.devnet import DevnetChain
from byteleap.chain.port import (
    ChainRejected,
    ChainUnavailable,
    Endpoint,
    NotRegistered,
    RateLimited,
)
from tests.contract.chain_contract import DEV_URIS, ManualClock, dev_hotkey
from tests.support.fixtures import WAIT

NETUID = 128
BLOCK_TIME = 0.25
ALICE, BOB, CHARLIE = (dev_hotkey(uri) for uri in DEV_URIS[:3])


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "chain.sqlite"


def make_chain(path: Path, clock: ManualClock, **params: object) -> DevnetChain:
    return DevnetChain.create(path, clock=clock, block_time=BLOCK_TIME, **params)  # type: ignore[arg-type]


def advance(clock: ManualClock, blocks: int) -> None:
    clock.advance(blocks * BLOCK_TIME)


# --- the clock ----------------------------------------------------------------------------------


async def test_block_height_follows_the_clock(path: Path, clock: ManualClock) -> None:
    chain = make_chain(path, clock)
    assert await chain.head_block() == 0
    clock.advance(BLOCK_TIME * 0.99)
    assert await chain.head_block() == 0
    clock.advance(BLOCK_TIME * 0.01)
    assert await chain.head_block() == 1
    advance(clock, 9999)
    assert await chain.head_block() == 10000
    assert await chain.block_time() == BLOCK_TIME


async def test_other_processes_clock_decides_their_head(path: Path, clock: ManualClock) -> None:
    make_chain(path, clock)
    behind = ManualClock(clock.now - 100)  # a clock before genesis
    ahead = ManualClock(clock.now + 10 * BLOCK_TIME)

    assert await DevnetChain(path, clock=behind).head_block() == 0
    assert await DevnetChain(path, clock=ahead).head_block() == 10


async def test_a_clock_stepped_back_does_not_move_the_head_back(
    path: Path, clock: ManualClock
) -> None:
    chain = make_chain(path, clock)
    advance(clock, 50)
    assert await chain.head_block() == 50

    advance(clock, -20)  # NTP step

    assert await chain.head_block() == 50


# --- creation -----------------------------------------------------------------------------------


async def test_create_refuses_to_overwrite_a_chain(path: Path, clock: ManualClock) -> None:
    chain = make_chain(path, clock)
    chain.register(NETUID, ALICE)

    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        make_chain(path, clock)

    assert await chain.uid_of(NETUID, ALICE) == 0, "the existing chain is intact"
    fresh = make_chain(path, clock, overwrite=True)
    assert await fresh.uid_of(NETUID, ALICE) is None


def test_create_in_a_missing_directory_says_so(tmp_path: Path, clock: ManualClock) -> None:
    with pytest.raises(FileNotFoundError, match="no directory"):
        make_chain(tmp_path / "nope" / "chain.sqlite", clock)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"block_time": 0}, "block_time"),
        ({"block_time": float("nan")}, "block_time"),
        ({"netuid": 65536}, "netuid"),
        ({"tempo": 0}, "tempo"),
        ({"weights_rate_limit": -1}, "weights_rate_limit"),
        ({"max_uids": 257}, "max_uids"),
        ({"max_uids": 4, "min_allowed_weights": 5}, "min_allowed_weights"),
        ({"max_weight_limit": 0}, "max_weight_limit"),
        ({"max_weight_limit": 65536}, "max_weight_limit"),
        ({"tempo": True}, "tempo"),
    ],
)
def test_create_validates_parameters(
    path: Path, clock: ManualClock, params: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        DevnetChain.create(path, clock=clock, **params)  # type: ignore[arg-type]
    assert not path.exists()


# --- failure modes ------------------------------------------------------------------------------


def exists(path: Path) -> bool:
    return path.exists()


def write_foreign_file(path: Path, content: bytes | None) -> None:
    """``content`` as the file, or (None) an empty SQLite database without the chain tables."""
    if content is None:
        sqlite3.connect(path).close()
        path.touch()
    else:
        path.write_bytes(content)


async def test_missing_file_is_unavailable_and_not_created(path: Path) -> None:
    chain = DevnetChain(path, hotkey=ALICE)

    with pytest.raises(ChainUnavailable, match=r"does not exist.*create it first") as caught:
        await chain.subnet(NETUID)

    assert str(path) in str(caught.value)
    assert not exists(path)


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"this is not a database" * 100, "corrupt"), (None, "not a devnet chain")],
    ids=["garbage", "empty-sqlite"],
)
async def test_foreign_or_corrupt_file_is_unavailable(
    path: Path, content: bytes | None, message: str
) -> None:
    write_foreign_file(path, content)

    with pytest.raises(ChainUnavailable, match=message):
        await DevnetChain(path).head_block()


async def test_a_locked_database_is_unavailable_and_reads_go_on(
    path: Path, clock: ManualClock
) -> None:
    admin = make_chain(path, clock)
    admin.register(NETUID, ALICE, validator_permit=True)
    admin.register(NETUID, BOB)
    validator = DevnetChain(path, hotkey=ALICE, clock=clock, busy_timeout_s=0.05)
    holder = sqlite3.connect(path, isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")  # another process in the middle of a write

        with pytest.raises(ChainUnavailable, match="locked"):
            await validator.set_weights(NETUID, {1: 1.0})
        # WAL: readers are not blocked by a writer
        assert (await validator.subnet(NETUID)).neurons[0].last_update == 0
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    outcome = await validator.set_weights(NETUID, {1: 1.0})
    assert outcome.path == "direct"


async def test_outage_switch_takes_every_process_down_and_back(
    path: Path, clock: ManualClock
) -> None:
    admin = make_chain(path, clock)
    admin.register(NETUID, ALICE, validator_permit=True)
    port = DevnetChain(path, hotkey=ALICE, clock=clock)

    run_python(f"DevnetChain({str(path)!r}).set_available(False)")

    with pytest.raises(ChainUnavailable, match="outage switch"):
        await port.uid_of(NETUID, ALICE)
    with pytest.raises(ChainUnavailable):
        admin.snapshot_sync(NETUID)
    admin.register(NETUID, BOB)  # the operator's hand still works during an outage
    admin.set_available(True)
    assert await port.uid_of(NETUID, BOB) == 1


async def test_closed_port_refuses_calls(path: Path, clock: ManualClock) -> None:
    chain = make_chain(path, clock)
    await chain.close()
    await chain.close()  # idempotent

    with pytest.raises(ChainUnavailable, match="closed"):
        await chain.head_block()


# --- sharing the file ---------------------------------------------------------------------------


def run_python(code: str) -> str:
    """Run ``code`` in a fresh interpreter with DevnetChain imported; return its stdout."""
    script = "from byteleap.chain.devnet import DevnetChain\n" + textwrap.dedent(code)
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


async def test_processes_see_each_others_writes(path: Path) -> None:
    admin = DevnetChain.create(path, block_time=BLOCK_TIME)  # real clock: another process reads it
    admin.register(NETUID, ALICE, validator_permit=True)

    out = run_python(
        f"""
        import asyncio
        chain = DevnetChain({str(path)!r})
        chain.register({NETUID}, {BOB!r}, stake_rao=7)
        miner = chain.as_hotkey({BOB!r})
        asyncio.run(miner.publish_endpoint({NETUID}, "127.0.0.1", 8091))
        print(asyncio.run(chain.uid_of({NETUID}, {ALICE!r})))
        """
    )

    assert out.strip() == "0", "the child saw the parent's registration"
    bob = (await admin.subnet(NETUID)).by_hotkey(BOB)
    assert bob is not None
    assert (bob.uid, bob.stake_rao, bob.endpoint) == (1, 7, Endpoint(ip="127.0.0.1", port=8091))

    await admin.as_hotkey(ALICE).set_weights(NETUID, {1: 1.0})
    out = run_python(f"print(DevnetChain({str(path)!r}).weights_sync({NETUID}))")
    assert out.strip() == "{0: {1: 65535}}"


def test_concurrent_registrations_from_many_threads_get_distinct_uids(
    path: Path, clock: ManualClock
) -> None:
    make_chain(path, clock)
    hotkeys = [dev_hotkey(f"//Thread{i}") for i in range(16)]
    uids: dict[str, int] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(len(hotkeys))

    def register(hotkey: str) -> None:
        chain = DevnetChain(path, clock=clock)  # one instance per thread, like separate processes
        start.wait()
        try:
            uids[hotkey] = chain.register(NETUID, hotkey)
        except BaseException as exc:  # reported below with the others
            errors.append(exc)

    threads = [threading.Thread(target=register, args=(hk,)) for hk in hotkeys]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT)

    assert errors == []
    assert sorted(uids.values()) == list(range(16))
    snap = DevnetChain(path, clock=clock).snapshot_sync(NETUID)
    assert {n.hotkey: n.uid for n in snap.neurons} == uids


async def test_concurrent_weight_submissions_are_all_rate_limited_but_one(
    path: Path, clock: ManualClock
) -> None:
    admin = make_chain(path, clock, weights_rate_limit=5)
    admin.register(NETUID, ALICE, validator_permit=True)
    admin.register(NETUID, BOB)
    ports = [DevnetChain(path, hotkey=ALICE, clock=clock) for _ in range(8)]

    results = await asyncio.gather(
        *(p.set_weights(NETUID, {1: 1.0}) for p in ports), return_exceptions=True
    )

    accepted = [r for r in results if not isinstance(r, BaseException)]
    assert len(accepted) == 1
    assert all(
        isinstance(r, RateLimited) and r.retry_in_blocks == 5 for r in results if r not in accepted
    )


# --- rules the devnet adds or models ------------------------------------------------------------


async def test_read_only_port_cannot_write(path: Path, clock: ManualClock) -> None:
    admin = make_chain(path, clock)
    admin.register(NETUID, ALICE, validator_permit=True)

    with pytest.raises(ChainRejected) as caught:
        await admin.set_weights(NETUID, {0: 1.0})
    assert caught.value.code == "NOT_AUTHORIZED"
    with pytest.raises(ChainRejected, match="read-only"):
        await admin.publish_endpoint(NETUID, "127.0.0.1", 1)


def test_acting_hotkey_must_be_an_ss58_address(path: Path) -> None:
    with pytest.raises(ValueError, match="not an SS58 address"):
        DevnetChain(path, hotkey="alice")


def test_registration_rules(path: Path, clock: ManualClock) -> None:
    admin = make_chain(path, clock, max_uids=2)
    assert admin.register(NETUID, ALICE) == 0

    cases: list[tuple[Callable[[], object], str]] = [
        (lambda: admin.register(NETUID, ALICE), "ALREADY_EXISTS"),
        (lambda: admin.register(NETUID, "alice"), "INVALID_ARGUMENT"),
        (lambda: admin.register(NETUID, BOB, coldkey="0xdeadbeef"), "INVALID_ARGUMENT"),
        (lambda: admin.register(NETUID, BOB, stake_rao=-1), "INVALID_ARGUMENT"),
        (lambda: admin.register(NETUID + 1, BOB), "SUBNET_NOT_EXISTS"),
    ]
    for call, code in cases:
        with pytest.raises(ChainRejected) as caught:
            call()
        assert caught.value.code == code

    assert admin.register(NETUID, BOB) == 1
    with pytest.raises(ChainRejected, match="full") as full:
        admin.register(NETUID, CHARLIE)
    assert full.value.code == "SUBNET_FULL"
    assert [n.coldkey for n in admin.snapshot_sync(NETUID).neurons] == [ALICE, BOB]


def test_stake_and_permit_are_set_by_the_operator(path: Path, clock: ManualClock) -> None:
    admin = make_chain(path, clock)
    admin.register(NETUID, ALICE)

    admin.set_stake(NETUID, ALICE, 10**12)
    admin.set_permit(NETUID, ALICE, True)

    alice = admin.snapshot_sync(NETUID).neurons[0]
    assert (alice.stake_rao, alice.validator_permit) == (10**12, True)
    with pytest.raises(NotRegistered):
        admin.set_stake(NETUID, BOB, 1)
    with pytest.raises(NotRegistered):
        admin.set_permit(NETUID, BOB, True)
    with pytest.raises(ChainRejected, match="stake"):
        admin.set_stake(NETUID, ALICE, 2**63)


@pytest.mark.parametrize(
    ("ip", "stored"),
    [
        ("2001:DB8:0:0::7", "2001:db8::7"),
        ("::ffff:127.0.0.1", "::ffff:7f00:1"),
        ("127.0.0.1", "127.0.0.1"),
    ],
)
async def test_endpoint_ip_is_stored_canonically(
    path: Path, clock: ManualClock, ip: str, stored: str
) -> None:
    admin = make_chain(path, clock)
    admin.register(NETUID, BOB)

    await admin.as_hotkey(BOB).publish_endpoint(NETUID, ip, 8091)

    assert admin.snapshot_sync(NETUID).neurons[0].endpoint == Endpoint(ip=stored, port=8091)


@pytest.mark.parametrize("ip", ["0.0.0.0", "::", "224.0.0.1"])
async def test_undiallable_endpoint_is_rejected(path: Path, clock: ManualClock, ip: str) -> None:
    admin = make_chain(path, clock)
    admin.register(NETUID, BOB)

    with pytest.raises(ChainRejected, match="cannot be dialled"):
        await admin.as_hotkey(BOB).publish_endpoint(NETUID, ip, 8091)


async def test_a_submission_at_block_zero_still_counts_for_the_rate_limit(
    path: Path, clock: ManualClock
) -> None:
    admin = make_chain(path, clock, weights_rate_limit=3)
    admin.register(NETUID, ALICE, validator_permit=True)
    validator = admin.as_hotkey(ALICE)

    await validator.set_weights(NETUID, {0: 1.0})

    with pytest.raises(RateLimited) as caught:
        await validator.set_weights(NETUID, {0: 1.0})
    assert caught.value.retry_in_blocks == 3


async def test_without_a_rate_limit_a_resubmission_in_the_same_block_replaces(
    path: Path, clock: ManualClock
) -> None:
    admin = make_chain(path, clock, weights_rate_limit=0)
    for hotkey in (ALICE, BOB, CHARLIE):
        admin.register(NETUID, hotkey, validator_permit=hotkey == ALICE)
    validator = admin.as_hotkey(ALICE)

    await validator.set_weights(NETUID, {1: 1.0, 2: 1.0})
    await validator.set_weights(NETUID, {2: 1.0})

    assert await validator.weights(NETUID) == {0: {2: 65535}}


async def test_newest_revealed_commit_wins(path: Path, clock: ManualClock) -> None:
    admin = make_chain(path, clock, commit_reveal=True, tempo=20, weights_rate_limit=10)
    for hotkey in (ALICE, BOB, CHARLIE):
        admin.register(NETUID, hotkey, validator_permit=hotkey == ALICE)
    validator = admin.as_hotkey(ALICE)

    first = await validator.set_weights(NETUID, {1: 1.0})  # block 0, visible at 20
    advance(clock, 10)
    second = await validator.set_weights(NETUID, {2: 1.0})  # block 10, visible at 30
    assert (first.reveal_round, second.reveal_round) == (20, 30)

    advance(clock, 10)
    assert admin.weights_sync(NETUID) == {0: {1: 65535}}
    advance(clock, 5)
    third = await validator.set_weights(NETUID, {1: 1.0, 2: 1.0})  # block 25, visible at 45
    assert admin.weights_sync(NETUID) == {0: {1: 65535}}, "pending commits stay hidden"
    advance(clock, 5)
    assert admin.weights_sync(NETUID) == {0: {2: 65535}}
    assert third.reveal_round is not None
    advance(clock, third.reveal_round - 30)
    assert admin.weights_sync(NETUID) == {0: {1: 65535, 2: 65535}}


async def test_activity_cutoff(path: Path, clock: ManualClock) -> None:
    admin = make_chain(path, clock, activity_cutoff=100, weights_rate_limit=0)
    admin.register(NETUID, ALICE, validator_permit=True)
    validator = admin.as_hotkey(ALICE)

    advance(clock, 100)
    assert admin.snapshot_sync(NETUID).neurons[0].active, "registered 100 blocks ago"
    advance(clock, 1)
    assert not admin.snapshot_sync(NETUID).neurons[0].active
    await validator.set_weights(NETUID, {0: 1.0})
    assert admin.snapshot_sync(NETUID).neurons[0].active, "setting weights is activity"


@pytest.mark.parametrize("version_key", [-1, 2**64, True])
async def test_version_key_must_be_u64(path: Path, clock: ManualClock, version_key: int) -> None:
    admin = make_chain(path, clock)
    admin.register(NETUID, ALICE, validator_permit=True)

    with pytest.raises(ChainRejected, match="version_key"):
        await admin.as_hotkey(ALICE).set_weights(NETUID, {0: 1.0}, version_key=version_key)
