"""Gateway enrollment through the miner relay, end to end on loopback.

Everything is a real server or client: the gateway (its CA, API, worker listener and store), the
validator's miner endpoint (``MinerHub``) asking that gateway with its API key and the pinned CA
(``EnrollmentTokens``), the miner (``MinerServer`` and ``ValidatorUplinks`` dialing the validator
it finds on a devnet chain) and the worker's own ``WorkerLink`` and ``gateway_enroll.enroll``. The
worker ends with a certificate from the gateway's CA and opens the mTLS session with it; each
adversarial case ends with one clear error at the worker instead of a hang.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from byteleap.chain.devnet import DevnetChain
from byteleap.core import wire
from byteleap.core.challenge.prover import NumpyBackend
from byteleap.core.identity import HotkeySigner, WorkerKey
from byteleap.gateway.ca import GatewayCA
from byteleap.gateway.keys import secret_hash
from byteleap.miner.config import MinerConfig, WorkerPolicy
from byteleap.miner.registry import WorkerRegistry
from byteleap.miner.relay import WorkerConnections
from byteleap.miner.server import MinerServer
from byteleap.miner.uplink import UplinkSettings, ValidatorUplinks, client_session, worker_roster
from byteleap.validator.config import GatewaySettings, MinerListen, MinerPolicy
from byteleap.validator.enrollment import EnrollmentError, EnrollmentTokens, GatewayAccess
from byteleap.validator.gateway_client import gateway_ssl_context
from byteleap.validator.miners import MinerHub
from byteleap.worker.challenges import ChallengeRunner, Device
from byteleap.worker.gateway_enroll import (
    GatewayEnrollError,
    GatewayEnrollment,
    enroll,
    enroll_with_grant,
)
from byteleap.worker.link import LinkSettings, LinkState, MinerRequestError, WorkerLink
from tests.support.fixtures import WAIT, agent_command, eventually, free_port, write_secret
from tests.support.notify_harness import NotifyHarness
from tests.unit.miner.builders import inventory

from .conftest import Gw
from .worker_double import FakeWorker

NETUID = 7
SECRET = b"0123456789abcdef0123456789abcdef"
MINER = HotkeySigner.from_uri("//Alice")
VALIDATOR = HotkeySigner.from_uri("//Bob")
OTHER_VALIDATOR = HotkeySigner.from_uri("//Charlie")
TAO = 10**9


@dataclass
class Relay:
    """A validator, a miner and its workers around the ``gw`` gateway."""

    gw: Gw
    home: Path
    chain: DevnetChain
    connections: WorkerConnections
    server: MinerServer
    uplinks: ValidatorUplinks
    hubs: list[MinerHub] = field(default_factory=list)
    issuers: list[EnrollmentTokens] = field(default_factory=list)
    links: list[tuple[WorkerLink, asyncio.Task[None]]] = field(default_factory=list)

    def access(self, **settings: Any) -> GatewayAccess:
        """What a validator configures for the ``gw`` gateway (``settings`` override it)."""
        ca_file = self.home / "gateway-ca.pem"
        if not ca_file.exists():
            ca_file.write_text(self.gw.gateway.ca.cert_pem)
        options: dict[str, Any] = {
            "name": "market",
            "url": self.gw.api,
            "ca_file": str(ca_file),
            "signing_public_key": self.gw.gateway.signer.public_key.hex(),
        }
        options.update(settings)
        config = GatewaySettings(**options)
        return GatewayAccess(config, self.gw.validator_key, gateway_ssl_context(config.ca_file))

    async def validator(
        self,
        gateways: list[GatewayAccess] | None = None,
        *,
        signer: HotkeySigner = VALIDATOR,
        stake_tao: int = 2000,
    ) -> MinerHub:
        """A validator endpoint on the chain; ``gateways`` None: the ``gw`` gateway."""
        issuer = EnrollmentTokens([self.access()] if gateways is None else gateways)
        self.issuers.append(issuer)
        hub = MinerHub(
            MinerListen(path="/v1/miner"),
            MinerPolicy(handshake_timeout_s=WAIT),
            signer=signer,
            snapshot=lambda: self.chain.snapshot_sync(NETUID),
            tokens=issuer,
            close_timeout_s=1.0,
        )
        await hub.start(host="127.0.0.1", port=0)
        self.hubs.append(hub)
        self.chain.register(
            NETUID, signer.ss58_address, stake_rao=stake_tao * TAO, validator_permit=True
        )
        port = hub.addresses[0][1]
        await self.chain.as_hotkey(signer.ss58_address).publish_endpoint(NETUID, "127.0.0.1", port)
        await eventually(lambda: hub.get(MINER.ss58_address) is not None)
        return hub

    async def worker(self, key: WorkerKey | None = None) -> tuple[WorkerLink, WorkerKey, Path]:
        """A worker registered with the miner through its real link."""
        key = key or WorkerKey.generate()
        state = self.home / f"worker-{key.worker_id[:8]}"
        state.mkdir()
        host, port = self.server.addresses[0]
        link = WorkerLink(
            LinkSettings(
                url=f"ws://{host}:{port}/worker",
                miner_hotkey=MINER.ss58_address,
                reconnect_initial_s=0.05,
                reconnect_max_s=0.2,
            ),
            key=key,
            secret=SECRET,
            runner=ChallengeRunner(
                key.worker_id,
                [Device("cpu-0", NumpyBackend(), frozenset({"fp32"}))],
                max_n=256,
                result_ttl_s=60.0,
            ),
            state_dir=state,
            collect_inventory=inventory,
            collect_live=lambda: wire.Heartbeat(uptime_s=1.0, load1=0.0, mem_used_bytes=0),
        )
        task = asyncio.create_task(link.run())
        self.links.append((link, task))
        await eventually(lambda: link.status.state is LinkState.CONNECTED)
        return link, key, state


@pytest.fixture
async def relay(gw: Gw, tmp_path: Path) -> AsyncIterator[Relay]:
    chain = DevnetChain.create(tmp_path / "chain.db", netuid=NETUID)
    chain.register(NETUID, MINER.ss58_address)
    registry = WorkerRegistry(tmp_path / "workers.db", max_workers=10)
    connections = WorkerConnections()
    server = MinerServer(
        MinerConfig(state_dir=str(tmp_path), policy=WorkerPolicy(handshake_timeout_s=WAIT)),
        signer=MINER,
        registry=registry,
        enrollment_secret=SECRET,
        connections=connections,
        close_timeout_s=1.0,
    )
    await server.start(host="127.0.0.1", port=0)
    async with client_session() as http:
        uplinks = ValidatorUplinks(
            chain=chain.as_hotkey(MINER.ss58_address),
            signer=MINER,
            relay=connections,
            roster=lambda: worker_roster(registry, connections),
            http=http,
            settings=UplinkSettings(
                netuid=NETUID,
                snapshot_refresh_s=0.1,
                reconnect_min_s=0.05,
                reconnect_max_s=0.4,
                connect_timeout_s=WAIT,
                close_timeout_s=1.0,
                token_timeout_s=5.0,
                token_total_s=8.0,
            ),
        )
        uplinks.start()
        running = Relay(gw, tmp_path, chain, connections, server, uplinks)
        try:
            yield running
        finally:
            for link, task in running.links:
                await link.stop()
                await asyncio.gather(task, return_exceptions=True)
            await uplinks.stop()
            await server.stop()
            for hub in running.hubs:
                await hub.stop()
            for issuer in running.issuers:
                await issuer.close()
            registry.close()


def issued_by(cert_path: Path, ca_pem: str) -> bool:
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    ca = x509.load_pem_x509_certificate(ca_pem.encode())
    with contextlib.suppress(Exception):
        cert.verify_directly_issued_by(ca)
        return True
    return False


async def failure(coro: Awaitable[Any]) -> GatewayEnrollError:
    with pytest.raises(GatewayEnrollError) as info:
        async with asyncio.timeout(3 * WAIT):  # an error, never a hang
            await coro
    return info.value


# ------------------------------------------------------------------------------------------------
# The way it works


async def test_a_worker_enrolls_through_miner_and_validator_and_opens_the_mtls_session(
    relay: Relay,
) -> None:
    await relay.validator()
    link, key, state = await relay.worker()

    enrollment = await enroll(state, key, link.request_gateway_grant)

    gateway = relay.gw.gateway
    assert enrollment.worker_id == key.worker_id
    assert enrollment.gateway_id == gateway.signer.gateway_id
    assert enrollment.ws_url == gateway.config.ws_url
    assert issued_by(state / "gateway" / "cert.pem", gateway.ca.cert_pem)
    assert (state / "gateway" / "key.pem").stat().st_mode & 0o777 == 0o600
    stored = gateway.store.worker(key.worker_id)
    assert stored is not None and stored.revoked_at is None
    # the state survives a restart
    loaded = GatewayEnrollment.load(state, worker_id=key.worker_id)
    assert loaded is not None and loaded.not_after == enrollment.not_after

    fake = FakeWorker(relay.home / "mtls", key=key)
    fake.ws_url = enrollment.ws_url
    conn = await fake.connect(context=loaded.ssl_context())
    relay.gw.connections.append(conn)
    welcome = await conn.hello(gpus=[])
    assert welcome.cert_not_after == pytest.approx(enrollment.not_after, abs=1)


async def test_the_token_is_bound_to_the_session_hotkey_and_the_worker(relay: Relay) -> None:
    await relay.validator()
    link, key, _state = await relay.worker()
    grant = await link.request_gateway_grant()
    assert grant.worker_id == key.worker_id
    row = relay.gw.gateway.store.token(secret_hash(grant.grant.token))
    assert row is not None
    assert (row.worker_id, row.miner_hotkey) == (key.worker_id, MINER.ss58_address)
    assert grant.grant.ca_pem.strip() == relay.gw.gateway.ca.cert_pem.strip()


async def test_the_miner_tries_the_next_validator_when_one_has_no_gateway(relay: Relay) -> None:
    await relay.validator([], signer=OTHER_VALIDATOR, stake_tao=5000)  # asked first: more stake
    await relay.validator()
    link, key, state = await relay.worker()
    enrollment = await enroll(state, key, link.request_gateway_grant)
    assert enrollment.gateway_id == relay.gw.gateway.signer.gateway_id


async def test_the_validator_daemon_asks_the_gateway_of_its_config(relay: Relay) -> None:
    """byteleap-validator as a real process: its ``gateways:`` section (API key file, pinned CA)
    is what the worker's enrollment goes through."""
    relay.chain.register(
        NETUID, VALIDATOR.ss58_address, stake_rao=2000 * TAO, validator_permit=True
    )
    gateway = relay.gw.gateway
    with tempfile.TemporaryDirectory(prefix="ble-", dir="/tmp") as name:
        home = Path(name)
        (home / "gateway-ca.pem").write_text(gateway.ca.cert_pem)
        key_file = write_secret(home / "market.key", relay.gw.validator_key.encode())
        config = home / "validator.yaml"
        config.write_text(
            f"state_dir: {home / 'state'}\n"
            f"listen: {{host: 127.0.0.1, port: {free_port()}, public_ip: 127.0.0.1}}\n"
            f"chain: {{network: devnet, devnet_path: {relay.chain.path}, netuid: {NETUID}, "
            "snapshot_refresh_s: 0.5}\n"
            f"store: {{url: 'sqlite:///{home / 'state' / 'validator.db'}'}}\n"
            "rounds: {interval_s: 2, cpu_n: 256}\n"
            "scoring: {challenge_interval_seconds: 2}\n"
            "gateways:\n"
            "  - name: market\n"
            f"    url: {relay.gw.api}\n"
            f"    ca_file: {home / 'gateway-ca.pem'}\n"
            f"    api_key_file: {key_file}\n"
            f"    signing_public_key: {gateway.signer.public_key.hex()}\n"
        )
        command = agent_command("validator", config, "--hotkey-uri", "//Bob")
        with NotifyHarness(command, env={"PYTHONUNBUFFERED": "1"}) as daemon:
            await asyncio.to_thread(daemon.wait_for, "READY=1", 60.0)
            link, key, state = await relay.worker()
            await eventually(lambda: relay.uplinks.connected_count == 1, within=30.0)
            enrollment = await enroll(state, key, link.request_gateway_grant)
            assert await asyncio.to_thread(daemon.terminate) == 0
            assert relay.gw.validator_key not in daemon.output()
    assert issued_by(enrollment.cert_path, gateway.ca.cert_pem)
    stored = gateway.store.worker(key.worker_id)
    assert stored is not None and stored.miner_hotkey == MINER.ss58_address


# ------------------------------------------------------------------------------------------------
# Every hop says why


async def test_a_validator_without_gateways_is_a_clear_error_at_the_worker(relay: Relay) -> None:
    await relay.validator([])
    link, key, state = await relay.worker()
    error = await failure(enroll(state, key, link.request_gateway_grant))
    assert error.code == "no_grant" and error.wire_code is wire.ErrorCode.NO_GATEWAY
    assert "has no gateway configured" in str(error)
    assert GatewayEnrollment.load(state) is None


async def test_no_validator_connected_to_the_miner(relay: Relay) -> None:
    link, key, state = await relay.worker()
    error = await failure(enroll(state, key, link.request_gateway_grant))
    assert error.wire_code is wire.ErrorCode.NO_VALIDATOR
    assert "no validator is connected" in str(error)


async def test_a_gateway_that_is_down(relay: Relay) -> None:
    await relay.validator([relay.access(url=f"https://127.0.0.1:{free_port()}")])
    link, key, state = await relay.worker()
    error = await failure(enroll(state, key, link.request_gateway_grant))
    assert error.wire_code is wire.ErrorCode.GATEWAY_UNAVAILABLE
    assert "cannot reach" in str(error)


async def test_a_gateway_refusing_the_validator_key_is_gateway_refused(relay: Relay) -> None:
    access = relay.access()
    wrong = GatewayAccess(access.settings, "blv_" + "x" * 43, access.ssl_context)
    await relay.validator([wrong])
    link, key, state = await relay.worker()
    error = await failure(enroll(state, key, link.request_gateway_grant))
    assert error.wire_code is wire.ErrorCode.GATEWAY_REFUSED
    assert "refused this validator's API key" in str(error)


async def test_a_revoked_worker_gets_no_token(relay: Relay) -> None:
    await relay.validator()
    link, key, state = await relay.worker()
    await enroll(state, key, link.request_gateway_grant)
    relay.gw.gateway.store.revoke_worker(key.worker_id, time.time())
    error = await failure(enroll(state, key, link.request_gateway_grant))
    assert error.wire_code is wire.ErrorCode.GATEWAY_REFUSED
    assert "worker_revoked" in str(error)


async def test_a_validator_pinning_another_ca_refuses_the_gateway(relay: Relay) -> None:
    other_ca = relay.home / "other-ca.pem"
    other_ca.write_text(GatewayCA.create().cert_pem)
    await relay.validator([relay.access(ca_file=str(other_ca))])
    link, key, state = await relay.worker()
    error = await failure(enroll(state, key, link.request_gateway_grant))
    assert error.wire_code is wire.ErrorCode.GATEWAY_UNAVAILABLE
    assert "does not verify against ca_file" in str(error)


async def test_a_token_that_expired_before_use_is_refused_by_the_gateway(relay: Relay) -> None:
    await relay.validator()
    link, key, state = await relay.worker()
    grant = await link.request_gateway_grant()
    relay.gw.clock.advance(relay.gw.gateway.config.tokens.ttl_s + 1)
    error = await failure(enroll_with_grant(state, key, grant))
    assert error.code == "token_expired"
    assert GatewayEnrollment.load(state) is None


async def test_a_forged_worker_id_yields_a_token_no_other_worker_can_use(relay: Relay) -> None:
    """A miner asks for a token naming a worker it does not hold: the validator binds it to
    the session's hotkey, the gateway to that worker id, and the token is useless to anyone
    without the worker's key."""
    await relay.validator()
    _link, attacker, state = await relay.worker()
    victim = WorkerKey.generate()
    forged = await relay.uplinks.gateway_token(victim.worker_id)  # what a forging miner gets
    row = relay.gw.gateway.store.token(secret_hash(forged.token))
    assert row is not None
    assert (row.worker_id, row.miner_hotkey) == (victim.worker_id, MINER.ss58_address)

    relabelled = wire.GatewayEnrollGrant(worker_id=attacker.worker_id, grant=forged)
    error = await failure(enroll_with_grant(state, attacker, relabelled))
    assert error.code == "token_wrong_worker"
    mislabelled = wire.GatewayEnrollGrant(worker_id=victim.worker_id, grant=forged)
    error = await failure(enroll_with_grant(state, attacker, mislabelled))
    assert error.code == "bad_answer" and "not this one" in str(error)
    assert relay.gw.gateway.store.worker(attacker.worker_id) is None


async def test_a_grant_with_another_ca_fails_tls_and_leaves_the_token_unused(
    relay: Relay,
) -> None:
    await relay.validator()
    link, key, state = await relay.worker()
    grant = await link.request_gateway_grant()
    foreign = wire.GatewayGrant(
        **{
            **{f: getattr(grant.grant, f) for f in wire.GatewayGrant.__struct_fields__},
            "ca_pem": GatewayCA.create().cert_pem,
        }
    )
    error = await failure(
        enroll_with_grant(
            state, key, wire.GatewayEnrollGrant(worker_id=key.worker_id, grant=foreign)
        )
    )
    assert error.code == "tls"
    assert "does not chain to the grant's CA" in str(error)
    enrollment = await enroll_with_grant(state, key, grant)  # the token was never sent
    assert issued_by(enrollment.cert_path, relay.gw.gateway.ca.cert_pem)


async def test_a_worker_not_connected_to_its_miner_times_out_clearly(tmp_path: Path) -> None:
    key = WorkerKey.generate()
    link = WorkerLink(
        LinkSettings(
            url=f"ws://127.0.0.1:{free_port()}/worker",
            reconnect_initial_s=0.05,
            reconnect_max_s=0.2,
        ),
        key=key,
        secret=SECRET,
        runner=ChallengeRunner(key.worker_id, [], max_n=256, result_ttl_s=60.0),
        state_dir=tmp_path,
        collect_inventory=inventory,
    )
    task = asyncio.create_task(link.run())
    request: Callable[[], Awaitable[wire.GatewayEnrollGrant]] = lambda: (  # noqa: E731
        link.request_gateway_grant(timeout_s=0.3)
    )
    try:
        error = await failure(enroll(tmp_path, key, request))
    finally:
        await link.stop()
        await asyncio.gather(task, return_exceptions=True)
    assert error.code == "no_grant" and error.wire_code is None
    assert "no registered session with the miner within 0.3 s" in str(error)
    with pytest.raises(MinerRequestError):
        await link.request_gateway_grant(timeout_s=0.05)


# ------------------------------------------------------------------------------------------------
# The validator's token broker on its own


async def test_the_broker_falls_back_to_the_next_gateway_and_checks_each_answer(
    relay: Relay,
) -> None:
    worker = WorkerKey.generate().worker_id
    good = relay.access()
    down = relay.access(name="down", url=f"https://127.0.0.1:{free_port()}")
    impostor = relay.access(name="other", signing_public_key="11" * 32)
    broker = EnrollmentTokens([down, impostor, good])
    relay.issuers.append(broker)
    grant = await broker.issue(worker, MINER.ss58_address)
    assert grant.gateway_id == good.settings.gateway_id
    assert broker.issued == 1

    broker = EnrollmentTokens([down, impostor])
    relay.issuers.append(broker)
    with pytest.raises(EnrollmentError) as info:
        await broker.issue(worker, MINER.ss58_address)
    assert info.value.code is wire.ErrorCode.GATEWAY_UNAVAILABLE
    assert "down: cannot reach" in info.value.message
    assert "other: " in info.value.message and "calls itself gateway" in info.value.message
    assert relay.gw.validator_key not in info.value.message
    assert relay.gw.validator_key not in repr(broker) + repr(good)


async def test_a_gateway_refusal_outranks_an_outage_in_the_brokers_answer(relay: Relay) -> None:
    revoked = (await relay.gw.enroll(FakeWorker(relay.home / "revoked"))).worker_id
    assert relay.gw.gateway.store.revoke_worker(revoked, time.time())
    down = relay.access(name="down", url=f"https://127.0.0.1:{free_port()}")
    broker = EnrollmentTokens([down, relay.access()])
    relay.issuers.append(broker)
    with pytest.raises(EnrollmentError) as info:
        await broker.issue(revoked, MINER.ss58_address)
    assert info.value.code is wire.ErrorCode.GATEWAY_REFUSED
    assert "worker_revoked" in info.value.message
    with pytest.raises(EnrollmentError) as info:
        await EnrollmentTokens([]).issue(revoked, MINER.ss58_address)
    assert info.value.code is wire.ErrorCode.NO_GATEWAY
