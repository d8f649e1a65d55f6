"""PostgreSQL, the system of record: keys and plans, requests, dead letters, webhooks, files and batches over one pool."""

from __future__ import annotations

from typing import Any

import asyncpg
from mode import Service

from bridges.clients.store.batches import Batches
from bridges.clients.store.dead_letters import DeadLetters
from bridges.clients.store.files import Files
from bridges.clients.store.keys import Keys
from bridges.clients.store.pool import Pool
from bridges.clients.store.requests import Requests
from bridges.clients.store.webhooks import Webhooks
from inferstream.settings import Settings

__all__ = ["Batches", "DeadLetters", "Files", "Keys", "Pool", "Requests", "Store", "Webhooks"]


class Store(Service):
    """The aggregates sharing one pool; hand each part only the aggregate it uses.

    Usable before ``connect()`` (the pool opens on first use); after ``close()``
    a further call opens a new pool, so stop the users of the store first. As a
    service it closes the pool on stop.
    """

    def __init__(
        self, settings: Settings, *, dsn: str | None = None, min_size: int = 1, max_size: int = 10, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.settings = settings
        self.pool = Pool(settings, dsn=dsn, min_size=min_size, max_size=max_size)
        self.keys = Keys(self.pool, settings)
        self.requests = Requests(self.pool)
        self.dead_letters = DeadLetters(self.pool)
        self.webhooks = Webhooks(self.pool)
        self.files = Files(self.pool)
        self.batches = Batches(self.pool)

    async def connect(self) -> asyncpg.Pool:
        return await self.pool.connect()

    async def reset(self) -> None:
        await self.pool.reset()

    async def close(self) -> None:
        await self.pool.close()

    async def on_stop(self) -> None:
        await self.close()

    async def migrate(self) -> list[str]:
        return await self.pool.migrate()
