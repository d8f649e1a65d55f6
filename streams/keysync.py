"""Keeps this worker's key cache in step with PostgreSQL: pushed changes (LISTEN/NOTIFY) and a periodic full reload.

Key and plan changes are notified in the statement that makes them, and reach
the cache within milliseconds; a full reload runs after every (re)connect of
the listener (notifications sent meanwhile are lost) and every
``KEY_REFRESH_S`` as a safety net. A PostgreSQL outage keeps the last good
cache: it must not lock every client out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from mode import Service

from bridges.clients.key_events import KeyEvents
from bridges.clients.store.keys import Keys
from inferstream.errors import StoreUnavailable
from inferstream.settings import Settings
from tables.keys import KeyCache

log = logging.getLogger(__name__)


class KeySync(Service):
    """Fills ``cache`` from ``keys`` and applies pushed invalidations; ``postgres_ok`` reflects the last reload."""

    def __init__(self, settings: Settings, keys: Keys, cache: KeyCache, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.settings = settings
        self.keys = keys
        self.cache = cache
        self.postgres_ok = False
        # One full reload at a time: each leaves out what was invalidated after it began.
        self._reload = asyncio.Lock()
        self._plan_changed = asyncio.Event()
        self.events = KeyEvents(
            settings.postgres_dsn,
            keys.channel,
            on_key=cache.invalidate,
            on_plan=lambda _name: self._plan_changed.set(),
            on_connected=self.reload,
        )

    async def reload(self) -> None:
        async with self._reload:
            as_of = self.cache.epoch
            try:
                loaded, plans = await asyncio.gather(self.keys.load_keys(), self.keys.load_plans())
            except StoreUnavailable as exc:
                self.postgres_ok = False
                state = "the last" if self.cache.loaded else "an empty"
                log.warning("key refresh failed, keeping %s cache: %r", state, exc)
                return
            self.cache.replace({h: (k.user_id, k.plan) for h, k in loaded.items()}, plans, as_of=as_of)
            self.postgres_ok = True

    @Service.task
    async def _sync(self) -> None:
        listening = asyncio.ensure_future(self.events.run())
        try:
            while not self.should_stop:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._plan_changed.wait(), self.settings.key_refresh_s)
                self._plan_changed.clear()
                await self.reload()
                if listening.done():
                    # Not transient (a bad DSN, refused credentials): keep trying, loudly, on the reload's beat.
                    log.error("key notifications stopped (%r); restarting the listener", listening.exception())
                    listening = asyncio.ensure_future(self.events.run())
        finally:
            listening.cancel()
