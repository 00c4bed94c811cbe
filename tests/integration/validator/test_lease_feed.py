"""The lease feed reader against a fake gateway: an aiohttp HTTPS server on loopback whose
certificate comes from a test CA, serving signed pages. Every test runs on SQLite and PostgreSQL.

What a validator must never do: store a record that does not verify with that gateway's key, skip
or repeat a sequence number, trust another CA, or stop reading one gateway because another fails.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import msgspec
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from byteleap.core.lease import SIGNATURE_DOMAIN, FeedPage, SignedLeaseRecord
from byteleap.validator.config import GatewaySettings
from byteleap.validator.db import AsyncStore
from byteleap.validator.leases import FeedError, GatewayFeed, gateway_ssl_context
from byteleap.validator.store import open_store
from byteleap.validator.store_sql import SqlStore
from tests.support.fixtures import eventually, free_port
from tests.support.postgres import postgres_url
from tests.unit.validator.lease_helpers import CertAuthority, SigningGateway, lease_id

API_KEY = "blk_0123456789abcdef0123456789abcdef"
T0 = 1_800_000_000.0
LOGGER = "byteleap.validator.leases"
Serve = Callable[[int], list[SignedLeaseRecord]]


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SqlStore]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'state' / 'validator.db'}"
    else:
        url = postgres_url(request)
    opened = open_store(url, timeout_s=10)
    assert isinstance(opened, SqlStore)
    opened.upgrade()
    try:
        yield opened
    finally:
        opened.close()


class FakeGateway:
    """The gateway's feed endpoint: bearer check, paging, and hooks to misbehave."""

    def __init__(self, signer: SigningGateway, ca: CertAuthority, directory: Path) -> None:
        self.signer = signer
        self.tls = ca.server_context(directory)
        self.page_size = 2
        self.requests: list[int] = []
        self.serve: Serve | None = None
        """Replaces the honest page for ``after`` (a forged, gapped or replayed page)."""
        self.raw: bytes | None = None
        """A body sent instead of any page."""
        self.redirect_to: str | None = None
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if request.headers.get("Authorization") != f"Bearer {API_KEY}":
            return web.json_response(
                {"error": "unauthorized", "message": "unknown API key"}, status=401
            )
        if self.redirect_to is not None:
            raise web.HTTPFound(self.redirect_to)
        after = int(request.query["after"])
        self.requests.append(after)
        if self.raw is not None:
            return web.Response(body=self.raw, content_type="application/json")
        if self.serve is not None:
            records = self.serve(after)
        else:
            records = self.signer.feed[after : after + self.page_size]
        page = FeedPage(
            gateway_id=self.signer.gateway_id,
            records=records,
            next_after=after + len(records),
        )
        return web.Response(body=msgspec.json.encode(page), content_type="application/json")

    async def start(self, port: int = 0) -> None:
        app = web.Application()
        app.router.add_get("/v1/lease-feed", self.handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port, ssl_context=self.tls)
        await site.start()
        self.port = int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


class Setup:
    def __init__(self, store: SqlStore, tmp_path: Path) -> None:
        self.store = store
        self.db = AsyncStore(store, initial_backoff_s=0.01, max_backoff_s=0.05)
        self.tmp = tmp_path
        self.ca = CertAuthority("gateway CA")
        self.ca_file = self.ca.write_ca(tmp_path / "gateway-ca.pem")
        self.key_file = tmp_path / "gateway.key"
        self.key_file.write_text(API_KEY)
        self.key_file.chmod(0o600)

    def gateway(self, signer: SigningGateway | None = None) -> FakeGateway:
        return FakeGateway(signer or SigningGateway(), self.ca, self.tmp / "server")

    def feed(
        self,
        gateway: FakeGateway,
        *,
        name: str = "market",
        api_key: str = API_KEY,
        ca_file: Path | None = None,
        host: str = "127.0.0.1",
        port: int | None = None,
    ) -> GatewayFeed:
        settings = GatewaySettings(
            name=name,
            url=f"https://{host}:{gateway.port if port is None else port}",
            ca_file=str(ca_file or self.ca_file),
            api_key_file=str(self.key_file),
            signing_public_key=gateway.signer.public_hex,
            poll_interval_s=0.05,
        )
        return GatewayFeed(
            settings,
            self.db,
            api_key=api_key,
            ssl_context=gateway_ssl_context(settings.ca_file),
            retry_max_s=0.2,
        )


@pytest.fixture
async def setup(store: SqlStore, tmp_path: Path) -> AsyncIterator[Setup]:
    yield Setup(store, tmp_path)


@pytest.fixture
async def gateway(setup: Setup) -> AsyncIterator[FakeGateway]:
    fake = setup.gateway()
    await fake.start()
    try:
        yield fake
    finally:
        await fake.stop()


async def poll(feed: GatewayFeed) -> int:
    async with feed.client() as http:
        return await feed.poll(http)


def seqs(store: SqlStore, gateway: FakeGateway) -> dict[str, int]:
    return {v.record.lease_id: v.record.seq for v in store.leases(gateway.signer.gateway_id)}


# ---- the honest feed -----------------------------------------------------------------------------


async def test_pages_until_empty_and_stores_every_record(
    setup: Setup, gateway: FakeGateway
) -> None:
    signer = gateway.signer
    a, b = lease_id(), lease_id()
    signer.sign(a, start=T0)
    signer.sign(b, start=T0 + 1)
    signer.sign(a, start=T0, active_until=T0 + 60)
    signer.sign(b, start=T0 + 1, active_until=T0 + 61)
    signer.sign(a, start=T0, active_until=T0 + 90, ended=True)
    feed = setup.feed(gateway)

    assert await poll(feed) == 5
    assert gateway.requests == [0, 2, 4, 5]  # pages of 2, then the empty page
    assert feed.cursor == 5 and setup.store.lease_cursor(signer.gateway_id) == 5
    assert seqs(setup.store, gateway) == {a: 5, b: 4}

    gateway.requests.clear()
    assert await poll(feed) == 0
    assert gateway.requests == [5]
    signer.sign(b, start=T0 + 1, active_until=T0 + 120, ended=True)
    assert await poll(feed) == 1
    assert seqs(setup.store, gateway) == {a: 5, b: 6}


# ---- records that are refused --------------------------------------------------------------------


async def test_a_forged_record_stops_the_page_and_keeps_the_cursor(
    setup: Setup, gateway: FakeGateway
) -> None:
    signer = gateway.signer
    for k in range(4):
        signer.sign(lease_id(), start=T0 + k)
    forger = Ed25519PrivateKey.generate()
    genuine = msgspec.json.decode(signer.feed[2].record)
    genuine["active_until"] = genuine["issued_at"] = T0 + 10**6  # a week of free credit
    data = msgspec.json.encode(genuine)
    forged = SignedLeaseRecord(record=data, signature=forger.sign(SIGNATURE_DOMAIN + data))
    gateway.serve = lambda after: [*signer.feed[after:2], forged, signer.feed[3]]
    feed = setup.feed(gateway)

    with pytest.raises(FeedError, match="bad signature") as raised:
        await poll(feed)
    assert "cursor stays at 2" in str(raised.value)
    assert setup.store.lease_cursor(signer.gateway_id) == 2
    assert sorted(seqs(setup.store, gateway).values()) == [1, 2]

    gateway.serve = None  # the gateway serves its real records again
    assert await poll(feed) == 2
    assert sorted(seqs(setup.store, gateway).values()) == [1, 2, 3, 4]


async def test_a_record_naming_another_gateway_is_refused(
    setup: Setup, gateway: FakeGateway
) -> None:
    other = SigningGateway()
    # Genuinely signed by the other gateway, served in this gateway's feed.
    other.sign(lease_id(), start=T0)
    gateway.serve = lambda after: other.feed if after == 0 else []
    with pytest.raises(FeedError, match="untrusted gateway"):
        await poll(setup.feed(gateway))
    assert setup.store.leases() == []
    assert setup.store.lease_cursor(gateway.signer.gateway_id) == 0


async def test_a_gap_stops_the_page_and_keeps_the_cursor(
    setup: Setup, gateway: FakeGateway
) -> None:
    signer = gateway.signer
    for k in range(4):
        signer.sign(lease_id(), start=T0 + k)
    gateway.page_size = 10
    gateway.serve = lambda after: [r for i, r in enumerate(signer.feed) if i != 2][after:]
    with pytest.raises(FeedError, match="a gap: seq 4 where 3 was due"):
        await poll(setup.feed(gateway))
    assert setup.store.lease_cursor(signer.gateway_id) == 2
    assert len(setup.store.leases()) == 2


async def test_a_replayed_old_page_changes_nothing(setup: Setup, gateway: FakeGateway) -> None:
    signer = gateway.signer
    a = lease_id()
    signer.sign(a, start=T0)
    signer.sign(a, start=T0, active_until=T0 + 60)
    signer.sign(a, start=T0, active_until=T0 + 120, ended=True)
    feed = setup.feed(gateway)
    assert await poll(feed) == 3
    # Valid signatures, old sequence numbers: replaying them must not reopen the lease.
    gateway.serve = lambda after: signer.feed[:2]
    with pytest.raises(FeedError, match="seq 1 again after 3"):
        await poll(feed)
    assert setup.store.lease_cursor(signer.gateway_id) == 3
    (stored,) = setup.store.leases()
    assert (stored.record.seq, stored.record.ended) == (3, True)


async def test_a_malformed_page_or_one_of_another_gateway_is_refused(
    setup: Setup, gateway: FakeGateway
) -> None:
    feed = setup.feed(gateway)
    gateway.raw = b'{"gateway_id": "' + b"0" * 32 + b'", "records": [], "next_after": 0}'
    with pytest.raises(FeedError, match="calls itself gateway 0000"):
        await poll(feed)
    for raw in (b"<html>maintenance</html>", b'{"gateway_id": "\xff"}', b"{}"):
        gateway.raw = raw
        with pytest.raises(FeedError, match="malformed page") as raised:
            await poll(feed)
        assert raised.value.kind == "protocol"


# ---- transport -----------------------------------------------------------------------------------


async def test_a_gateway_whose_certificate_another_ca_issued_is_refused(
    setup: Setup, gateway: FakeGateway
) -> None:
    gateway.signer.sign(lease_id(), start=T0)
    stranger = CertAuthority("some other CA").write_ca(setup.tmp / "other-ca.pem")
    with pytest.raises(FeedError, match="does not verify against ca_file") as raised:
        await poll(setup.feed(gateway, ca_file=stranger))
    assert raised.value.kind == "tls"
    assert gateway.requests == []  # the key never left the validator
    assert setup.store.leases() == []


async def test_a_certificate_for_another_host_is_refused(setup: Setup) -> None:
    fake = setup.gateway()
    fake.tls = setup.ca.server_context(setup.tmp / "server", host="gateway.example")
    await fake.start()
    try:
        with pytest.raises(FeedError) as raised:
            await poll(setup.feed(fake))
        assert raised.value.kind == "tls"
        assert fake.requests == []
    finally:
        await fake.stop()


async def test_a_wrong_api_key_is_one_clear_log_line(
    setup: Setup, gateway: FakeGateway, caplog: pytest.LogCaptureFixture
) -> None:
    gateway.signer.sign(lease_id(), start=T0)
    feed = setup.feed(gateway, api_key="blk_" + "f" * 32)
    with pytest.raises(FeedError) as raised:
        await poll(feed)
    assert raised.value.kind == "http_401"
    message = str(raised.value)
    assert "refused the validator's API key (HTTP 401: unauthorized unknown API key)" in message
    assert str(setup.key_file) in message and "f" * 32 not in message

    caplog.set_level(logging.INFO, logger=LOGGER)
    task = asyncio.create_task(feed.run())
    try:
        await eventually(lambda: feed.failed_polls >= 4)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    lines = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert len(lines) == 1 and "API key" in lines[0] and "f" * 32 not in lines[0]
    assert setup.store.leases() == []


async def test_redirects_are_not_followed(setup: Setup, gateway: FakeGateway) -> None:
    gateway.redirect_to = "https://127.0.0.1:1/elsewhere"
    with pytest.raises(FeedError, match="HTTP 302: redirects are not followed"):
        await poll(setup.feed(gateway))


async def test_an_outage_logs_once_when_it_starts_and_once_when_it_ends(
    setup: Setup, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    fake = setup.gateway()
    for k in range(3):
        fake.signer.sign(lease_id(), start=T0 + k)
    port = free_port()
    feed = setup.feed(fake, port=port)
    task = asyncio.create_task(feed.run())
    try:
        await eventually(lambda: feed.failed_polls >= 3)  # the gateway is down
        assert not feed.healthy and feed.last_error is not None
        assert "cannot reach" in feed.last_error
        await fake.start(port)
        await eventually(lambda: feed.healthy and feed.cursor == 3)
        fake.signer.sign(lease_id(), start=T0 + 9)
        await eventually(lambda: feed.cursor == 4)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await fake.stop()
    assert task.cancelled()
    lines = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert len(lines) == 2, lines
    assert "cannot reach" in lines[0] and "works again" in lines[1]
    assert setup.store.lease_cursor(fake.signer.gateway_id) == 4


async def test_one_failing_gateway_does_not_hold_up_another(setup: Setup) -> None:
    good, bad = setup.gateway(), setup.gateway()
    good.signer.sign(lease_id(), start=T0)
    bad.signer.sign(lease_id(), start=T0)
    bad.redirect_to = "https://127.0.0.1:1/"
    await good.start()
    await bad.start()
    feeds = [setup.feed(good, name="good"), setup.feed(bad, name="bad")]
    tasks = [asyncio.create_task(f.run()) for f in feeds]
    try:
        await eventually(lambda: feeds[0].cursor == 1 and feeds[1].failed_polls >= 2)
        good.signer.sign(lease_id(), start=T0 + 1)
        await eventually(lambda: feeds[0].cursor == 2)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await good.stop()
        await bad.stop()
    assert setup.store.lease_cursor(good.signer.gateway_id) == 2
    assert setup.store.lease_cursor(bad.signer.gateway_id) == 0


async def test_the_reader_stops_cleanly_when_cancelled_mid_request(setup: Setup) -> None:
    hanging, release = asyncio.Event(), asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        hanging.set()
        await release.wait()
        return web.Response(status=503)

    fake = setup.gateway()
    app = web.Application()
    app.router.add_get("/v1/lease-feed", slow)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=fake.tls).start()
    fake.port = int(runner.addresses[0][1])
    feed = setup.feed(fake)
    task = asyncio.create_task(feed.run())
    try:
        await asyncio.wait_for(hanging.wait(), 10)
        task.cancel()
        results = await asyncio.gather(task, return_exceptions=True)
        assert isinstance(results[0], asyncio.CancelledError)
        assert feed.failed_polls == 0 and feed.polls == 0  # cancelled, not counted as a fault
    finally:
        release.set()
        await runner.cleanup()
