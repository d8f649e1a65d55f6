"""Sends a request to the worker that owns the user's quota partition.

This replaces ``app.table_route``/``Router.route_req`` of faust-streaming
0.15.3, which forward neither the request body nor the response headers
(``Router._route_req`` sends ``method``, ``headers`` and ``url`` only and
answers ``web.text`` of the peer's body): a POST would reach the owner empty
and the ``X-RateLimit-*``/``Retry-After``/``Location`` headers would be lost.
Ownership is still Faust's: the partition assignor's key store for the
table's changelog topic.
"""

from __future__ import annotations

import logging
from typing import Any

import aiohttp
import faust
from aiohttp import web
from faust.types import TableT
from mode import Service
from yarl import URL

from inferstream import tracing
from inferstream.errors import Unavailable
from streams.quirks import known_to_producer, tables_recovered
from tables.acked import changelog_partition

log = logging.getLogger(__name__)

FORWARDED_HEADER = "X-Inferstream-Forwarded"
# Hop-by-hop headers must not be copied between connections (RFC 9110 7.6.1).
_HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        "Connection",
        "Keep-Alive",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
        "Host",
        "Content-Length",
        "Content-Encoding",
    )
)


class OwnerRouter(Service):
    """Finds the owner of a user's partition and forwards whole HTTP exchanges to it."""

    def __init__(self, app: faust.App, table: TableT, timeout_s: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.app = app
        self.table = table
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None
        self._own: tuple[str, int] | None = None  # this worker's (host, port): canonical_url is fixed at start

    def _ident(self, url: URL) -> tuple[str, int]:
        return (url.host or "", int(url.port or 80))

    def owner(self, user_id: str) -> URL | None:
        """The owner's URL, or None when this worker owns ``user_id`` and may decide now."""
        app = self.app
        if app.rebalancing or not tables_recovered(app):
            raise Unavailable("partitions are being rebalanced or recovered", retry_after=1)
        if not known_to_producer(app, self.table.changelog_topic.get_topic_name()):
            raise Unavailable("partition metadata is loading", retry_after=1)
        try:
            url = app.router.key_store(self.table.name, user_id)
        except (KeyError, IndexError):
            raise Unavailable("no worker owns this user's partition yet", retry_after=1) from None
        if self._own is None:
            self._own = self._ident(URL(app.conf.canonical_url))
        if self._ident(url) != self._own:
            return url
        if not app.assignor.is_active(changelog_partition(self.table, user_id)):
            raise Unavailable("this worker is taking over the user's partition", retry_after=1)
        return None

    async def forward(self, request: web.Request, owner: URL, body: bytes) -> web.Response:
        if request.headers.get(FORWARDED_HEADER):
            # Ownership moved while the request was in flight; do not bounce it around.
            raise Unavailable("the owner of this user's partition changed", retry_after=1)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP}
        headers[FORWARDED_HEADER] = str(self.app.conf.canonical_url)
        if tracing.ENABLED:  # the owner's spans are children of this gateway's, not its siblings
            headers[tracing.HEADER] = tracing.traceparent(tracing.current_span())
        url = request.url.with_scheme(owner.scheme or "http").with_host(owner.host or "").with_port(owner.port)
        try:
            async with self._client().request(request.method, url, headers=headers, data=body) as resp:
                payload = await resp.read()
                out_headers = {k: v for k, v in resp.headers.items() if k.lower() not in _HOP_BY_HOP}
                return web.Response(body=payload, status=resp.status, headers=out_headers)
        except (TimeoutError, aiohttp.ClientError) as exc:
            log.warning("forwarding to owner %s failed: %r", owner, exc)
            raise Unavailable("the owner of this user's partition is unreachable", retry_after=1) from exc

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=self.timeout, connector=aiohttp.TCPConnector(limit=256)
            )
        return self._session

    async def on_stop(self) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
