"""Key and plan changes pushed to every worker: one PostgreSQL LISTEN connection, kept open across outages."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import asyncpg

from bridges.clients.store.pool import translated
from inferstream.errors import StoreUnavailable
from inferstream.retrying import POSTGRES_LISTEN, failure

log = logging.getLogger(__name__)

PING_TIMEOUT_S = 5.0


class KeyEvents:
    """Calls ``on_key(digest)`` / ``on_plan(name)`` per notification, and ``on_connected()`` after each (re)connect.

    ``on_connected`` must reload everything: notifications sent while no connection
    was listening are lost (PostgreSQL queues them only for listening sessions).
    A connection that dies is noticed at once (termination listener) or, if the
    network drops silently, by a ping every ``ping_s``.
    """

    def __init__(
        self,
        dsn: str,
        channel: str,
        *,
        on_key: Callable[[str], None],
        on_plan: Callable[[str], None],
        on_connected: Callable[[], Awaitable[None]],
        ping_s: float = 10.0,
    ) -> None:
        self.dsn = dsn
        self.channel = channel
        self._on_key = on_key
        self._on_plan = on_plan
        self._on_connected = on_connected
        self._ping_s = ping_s
        self.connected = False
        self.received = 0

    def _dispatch(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        self.received += 1
        kind, _, value = payload.partition(":")
        if kind == "key":
            self._on_key(value)
        elif kind == "plan":
            self._on_plan(value)
        else:
            # Only the kind: a payload may carry a key digest, which is never logged.
            log.warning("ignoring key notification of unknown kind %r on %s", kind[:40], self.channel)

    async def _connect(self) -> asyncpg.Connection:
        async for attempt in POSTGRES_LISTEN.retrying(
            StoreUnavailable,
            before_sleep=lambda state: log.warning("key notifications: connecting failed (%r); retrying", failure(state)),
        ):
            with attempt, translated():
                return await asyncpg.connect(self.dsn, timeout=PING_TIMEOUT_S)
        raise AssertionError("unreachable")

    async def run(self) -> None:
        """Listen until cancelled, reconnecting (and reloading) after every lost connection."""
        while True:
            conn = await self._connect()
            lost = asyncio.Event()
            conn.add_termination_listener(lambda _conn, lost=lost: lost.set())
            try:
                with translated():
                    await conn.add_listener(self.channel, self._dispatch)
                    self.connected = True
                    await self._on_connected()
                    while not lost.is_set():
                        try:
                            await asyncio.wait_for(lost.wait(), self._ping_s)
                        except TimeoutError:
                            await conn.fetchval("SELECT 1", timeout=PING_TIMEOUT_S)
            except StoreUnavailable as exc:
                log.warning("key notifications: connection lost (%r); reconnecting", exc)
            finally:
                self.connected = False
                if not conn.is_closed():
                    conn.terminate()
            if lost.is_set():
                log.warning("key notifications: connection to PostgreSQL closed; reconnecting")
