"""Reading the gateways' signed lease feeds (docs/validator.md, Leases).

One :class:`GatewayFeed` per configured gateway polls ``GET {url}/v1/lease-feed?after=<cursor>``
every ``poll_interval_s``, with the validator's API key as a bearer token, over HTTPS whose only
trust root is that gateway's CA (``ca_file``; the host name is checked against its certificate,
redirects are not followed, so the key goes nowhere else). It pages until a page is empty.

Every record must verify with that gateway's signing key alone (:func:`~byteleap.core.lease.
verify_record` with one trusted key, so a record naming another gateway's id is refused too) and
carry the next sequence number after the cursor. The verified records before the first one that
fails either check are stored, and the cursor moved to the last of them, in one transaction
(:meth:`~byteleap.validator.store.Store.record_lease_page`); the page stops there and the problem
is logged (a forged record, a gap, a duplicate, a replayed or rewound feed). The reader never
skips a sequence number: the next poll asks again from the cursor. The page's ``next_after`` is
not signed and is not used.

Faults (the gateway unreachable, a TLS failure, an HTTP error such as 401 for a wrong API key, a
malformed page, a refused record) are logged once when they start or change and once when the
feed works again; meanwhile the reader retries with :class:`~byteleap.core.backoff.Backoff`.
Each gateway has its own reader, so one gateway's trouble never delays another's.

Rounds keep the devices of a lease that has not ended out of the challenges while its newest
``active_until`` is within the gateway's grace (:func:`leased_devices`).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Final

import aiohttp
import msgspec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ..core.backoff import Backoff
from ..core.lease import MAX_FEED_PAGE, FeedPage, LeaseRecord, LeaseRecordError, verify_record
from ..core.logs import log_fields
from .config import GatewaySettings
from .db import AsyncStore
from .gateway_client import (
    TRANSPORT_ERRORS,
    bearer_headers,
    error_detail,
    gateway_client,
    gateway_ssl_context,
    read_bounded,
    shown,
    transport_failure,
)
from .store import StoreError, VerifiedLease

__all__ = [
    "MAX_PAGE_BYTES",
    "FeedError",
    "GatewayFeed",
    "gateway_ssl_context",
    "leased_devices",
    "verify_page",
]

log = logging.getLogger(__name__)

_MAX_SIGNED_RECORD_JSON: Final = 4 * ((16 * 1024 + 2) // 3) + 4 * ((64 + 2) // 3) + 64
"""One ``SignedLeaseRecord`` in JSON at most: base64 of a 16 KiB record and of a signature."""
MAX_PAGE_BYTES: Final = MAX_FEED_PAGE * (_MAX_SIGNED_RECORD_JSON + 2) + 4096
"""The largest feed page a reader accepts (a full page of the largest records)."""
REQUEST_TIMEOUT_S: Final = 30.0
MAX_RETRY_S: Final = 300.0
"""Longest wait between attempts while a gateway is failing (at least its poll interval)."""

_PAGE_DECODER: Final = msgspec.json.Decoder(FeedPage)


class FeedError(Exception):
    """One failed poll. ``kind`` groups causes for logging (a new kind is logged again)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def verify_page(
    page: FeedPage, after: int, gateway_id: str, key: Ed25519PublicKey
) -> tuple[list[VerifiedLease], str | None]:
    """The records of ``page`` that verify with ``key`` and follow ``after`` without a gap, up
    to the first that does not; and why that one was refused (None when all were taken)."""
    trusted = {gateway_id: key}
    taken: list[VerifiedLease] = []
    expected = after + 1
    for signed in page.records:
        try:
            record = verify_record(signed, trusted)
        except LeaseRecordError as exc:  # not UTF-8 JSON included
            return taken, f"record after seq {expected - 1} refused: {exc}"
        if record.seq != expected:
            if record.seq > expected:
                what = f"a gap: seq {record.seq} where {expected} was due"
            else:
                what = f"seq {record.seq} again after {expected - 1} (a duplicate or replayed page)"
            return taken, f"the feed is out of sequence, {what}"
        taken.append(VerifiedLease(record, signed))
        expected += 1
    return taken, None


def leased_devices(
    records: Iterable[LeaseRecord], now: float, grace_s: Mapping[str, float]
) -> dict[tuple[str, str], set[str]]:
    """(miner, worker) -> devices of every lease that has not ended and whose ``active_until``
    is within its gateway's grace of ``now``; leases of gateways not in ``grace_s`` are ignored.
    """
    out: dict[tuple[str, str], set[str]] = {}
    for record in records:
        grace = grace_s.get(record.gateway_id)
        if grace is None or record.ended or record.active_until < now - grace:
            continue
        out.setdefault((record.miner_hotkey, record.worker_id), set()).update(record.device_uuids)
    return out


class GatewayFeed:
    """Reads one gateway's lease feed into the store (see the module docstring)."""

    def __init__(
        self,
        settings: GatewaySettings,
        db: AsyncStore,
        *,
        api_key: str,
        ssl_context: ssl.SSLContext,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        request_timeout_s: float = REQUEST_TIMEOUT_S,
        retry_max_s: float = MAX_RETRY_S,
    ) -> None:
        self.settings = settings
        self.name = settings.name
        self.gateway_id = settings.gateway_id
        self._key = settings.public_key
        self._db = db
        self._headers = bearer_headers(api_key)
        self._ssl = ssl_context
        self._clock = clock
        self._monotonic = monotonic
        self._request_timeout_s = request_timeout_s
        poll = settings.poll_interval_s
        self._backoff = Backoff(poll, max(poll, retry_max_s))
        self._fault_since: float | None = None
        self._fault_kind: str | None = None
        self.cursor: int | None = None
        """The cursor after the last poll (None before the first)."""
        self.polls = 0
        """Polls that succeeded."""
        self.failed_polls = 0
        """Polls that failed (each waits its backoff before the next)."""
        self.last_error: str | None = None
        """Why the feed is failing now (None while it works)."""

    def __repr__(self) -> str:  # the headers hold the API key: never show them
        return f"GatewayFeed({self.name!r}, {self.gateway_id})"

    @property
    def healthy(self) -> bool:
        """The last poll succeeded."""
        return self.polls > 0 and self.last_error is None

    def _fields(self) -> dict[str, object]:
        return log_fields(gateway=self.name, gateway_id=self.gateway_id)

    # ------------------------------------------------------------------ loop

    def client(self) -> aiohttp.ClientSession:
        """An HTTP client for :meth:`poll`: this gateway's TLS context, bounded waits."""
        return gateway_client(self._ssl, self._request_timeout_s)

    async def run(self) -> None:
        """Poll forever (until cancelled): every poll interval, or with backoff while failing."""
        async with self.client() as http:
            while True:
                delay = await self.poll_and_report(http)
                await asyncio.sleep(delay)

    async def poll_and_report(self, http: aiohttp.ClientSession) -> float:
        """One poll with its logging; returns the seconds to wait before the next one."""
        try:
            stored = await self.poll(http)
        except FeedError as exc:
            self._failed(exc.kind, str(exc))
        except StoreError as exc:  # not transient (AsyncStore retries those): a bug or schema
            self._failed("store", f"the store refused the records: {exc}")
        except Exception as exc:
            log.exception("lease feed poll failed unexpectedly", extra=self._fields())
            self._failed("bug", f"{type(exc).__name__}: {exc}")
        else:
            self._succeeded(stored)
            return self.settings.poll_interval_s
        return self._backoff.next_delay()

    def _failed(self, kind: str, message: str) -> None:
        self.failed_polls += 1
        self.last_error = message
        if self._fault_since is None:
            self._fault_since = self._monotonic()
        elif kind == self._fault_kind:
            return
        self._fault_kind = kind
        log.warning(
            "lease feed of gateway %s: %s; retrying",
            self.name,
            message,
            extra=log_fields(gateway=self.name, gateway_id=self.gateway_id, fault=kind),
        )

    def _succeeded(self, stored: int) -> None:
        self.polls += 1
        self.last_error = None
        self._backoff.reset()
        if self._fault_since is not None:
            lasted = self._monotonic() - self._fault_since
            self._fault_since = None
            self._fault_kind = None
            log.info(
                "lease feed of gateway %s works again after %.0f s (cursor %s)",
                self.name,
                lasted,
                self.cursor,
                extra=self._fields(),
            )
        if stored:
            log.debug(
                "stored %d lease record(s) of gateway %s, cursor %s",
                stored,
                self.name,
                self.cursor,
                extra=self._fields(),
            )

    # ------------------------------------------------------------------ one poll

    async def poll(self, http: aiohttp.ClientSession) -> int:
        """Page from the stored cursor until an empty page; returns the records stored.

        Raises :class:`FeedError` for a transport, HTTP or protocol fault and for a refused
        record (after storing the good records before it).
        """
        cursor = await self._db.lease_cursor(self.gateway_id)
        self.cursor = cursor
        stored = 0
        while True:
            page = await self._fetch(http, cursor)
            if not page.records:
                return stored
            taken, problem = verify_page(page, cursor, self.gateway_id, self._key)
            if taken:
                cursor = await self._db.record_lease_page(
                    self.gateway_id, cursor, taken, self._clock()
                )
                self.cursor = cursor
                stored += len(taken)
            if problem is not None:
                raise FeedError(
                    "refused:" + problem,
                    f"{problem}; {stored} record(s) stored, cursor stays at {cursor}",
                )

    async def _fetch(self, http: aiohttp.ClientSession, after: int) -> FeedPage:
        url = self.settings.feed_url
        try:
            # Headers per request, never session defaults: the key goes to this URL only.
            async with http.get(
                url, params={"after": str(after)}, headers=self._headers, allow_redirects=False
            ) as response:
                if response.status != 200:
                    raise await self._http_error(response)
                body = await read_bounded(response, MAX_PAGE_BYTES)
        except TRANSPORT_ERRORS as exc:
            kind, message = transport_failure(
                exc, url, self.settings.ca_file, self._request_timeout_s
            )
            raise FeedError(kind, message) from None
        try:
            page = _PAGE_DECODER.decode(body)
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:
            raise FeedError("protocol", f"{url} sent a malformed page: {shown(str(exc))}") from None
        if page.gateway_id != self.gateway_id:
            raise FeedError(
                "protocol",
                f"{url} calls itself gateway {shown(page.gateway_id)}, but the configured "
                f"signing key is gateway {self.gateway_id}'s",
            )
        return page

    async def _http_error(self, response: aiohttp.ClientResponse) -> FeedError:
        status = response.status
        detail = await error_detail(response)
        if status in (401, 403):
            return FeedError(
                f"http_{status}",
                f"the gateway refused the validator's API key (HTTP {status}{detail}); "
                f"check the key in {self.settings.api_key_source}",
            )
        if 300 <= status < 400:
            return FeedError(f"http_{status}", f"HTTP {status}: redirects are not followed")
        return FeedError(f"http_{status}", f"HTTP {status}{detail}")
