"""What the gateway views work with, gathered in one object built by ``streams.pipeline``."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from bridges.clients.notifications import NotificationHub
from bridges.clients.redis import CacheUnavailable, RedisClient
from bridges.clients.store import Requests
from inferstream.errors import StoreUnavailable, Unavailable
from inferstream.settings import Settings
from schemas.documents import request_doc
from streams import queue_eta
from streams.admission import AdmissionService
from streams.gateway.routing import OwnerRouter
from tables.keys import KeyCache
from tables.quota_book import QuotaBook

log = logging.getLogger(__name__)


@dataclass
class Gateway:
    settings: Settings
    quota: QuotaBook
    keys: KeyCache
    router: OwnerRouter
    store: Requests
    redis: RedisClient
    hub: NotificationHub
    admission: AdmissionService

    async def load_doc(self, user_id: str, request_id: str) -> dict[str, Any] | None:
        """The caller's document: Redis first, then PostgreSQL; None if absent or someone else's.

        A request still waiting (queued or dispatched) carries ``queue: {position, ahead, eta_s}``.
        """
        try:
            cached = await self.redis.get_doc(request_id)
        except CacheUnavailable:
            cached = None
        if cached is not None:
            owner, doc = cached
            return queue_eta.annotate(doc) if owner == user_id else None
        try:
            row = await self.store.get_request(user_id, request_id)
        except StoreUnavailable as exc:
            raise Unavailable("the request store is unavailable", retry_after=2) from exc
        return queue_eta.annotate(request_doc(row)) if row is not None else None

    async def list_rows(
        self, user_id: str, status: str | None, limit: int, after: str | None
    ) -> list[dict[str, Any]]:
        try:
            return await self.store.list_requests(user_id, status, limit, after)
        except StoreUnavailable as exc:
            raise Unavailable("the request store is unavailable", retry_after=2) from exc

    async def request_cancel(self, request_id: str) -> None:
        try:
            await self.redis.mark_cancelled(request_id)
        except CacheUnavailable as exc:
            raise Unavailable("cancellation cannot be recorded right now", retry_after=2) from exc
