"""The API-key and plan cache every gateway reads: a full load, a bounded PostgreSQL lookup on a miss, pushed invalidations.

A key is looked up by its HMAC-SHA256 digest (the raw key is never stored). The
lookup is a dict access, not a constant-time comparison, and needs none: what
its timing could reveal is how a digest of the caller's own guess compares with
stored digests, and without the server secret no guess can be steered towards
a stored digest. A digest the cache has not seen is looked up in PostgreSQL at
once, so a key works on the very next request after ``keys create``; answers
are cached (unknown digests for ``INFERSTREAM_KEY_NEGATIVE_TTL_S``). Lookups are
single-flight per digest and bounded by a token bucket, so a flood of bad keys
costs at most ``burst + rate * seconds`` queries; past the bound an unknown key is 503, not
401, because admission cannot be decided. Revocations and plan changes arrive
by LISTEN/NOTIFY (``bridges/clients/key_events.py``) and call :meth:`KeyCache.invalidate`;
the periodic full reload stays as a safety net.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from prometheus_client import Counter

from inferstream.apikeys import hash_key
from inferstream.errors import StoreUnavailable, Unauthorized, Unavailable
from inferstream.settings import Settings
from schemas.plans import DEFAULT_PLAN, KeyRecord, Plan
from workers.ratelimit import TokenBucket

LOOKUPS = Counter("inferstream_key_lookups_total", "PostgreSQL lookups of key digests missing from the cache", ["outcome"])
LOOKUPS_REFUSED = Counter("inferstream_key_lookups_refused_total", "Cache misses answered 503: lookup rate bound reached")

# A lookup answers the key's record and its plan's row (None when the plan is gone), or None when
# no active key has that digest. It raises StoreUnavailable (an Unavailable) when PostgreSQL cannot answer.
Lookup = Callable[[str], Awaitable[tuple[KeyRecord, Plan | None] | None]]


@dataclass(frozen=True)
class Principal:
    user_id: str
    plan: Plan


class KeyCache:
    def __init__(
        self,
        secret: str,
        lookup: Lookup | None = None,
        *,
        negative_ttl_s: float = 10.0,
        lookups_per_s: float = 20.0,
        lookup_burst: float = 20.0,
        lookup_timeout_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._secret = secret
        self._lookup = lookup
        self._negative_ttl_s = negative_ttl_s
        self._timeout_s = lookup_timeout_s
        self._clock = clock
        # At least one token: a rate of 0 would refuse every miss, not lift the bound.
        self._bucket = TokenBucket(max(lookups_per_s, 1e-9), max(lookup_burst, 1.0), clock=clock)
        # Live misses are bounded by the bucket (burst + rate * ttl); expired ones are swept past twice that.
        self._misses_cap = 2 * int(self._bucket.burst + self._bucket.rate * negative_ttl_s) + 64
        self._keys: dict[str, tuple[str, str]] = {}  # digest -> (user_id, plan)
        self._plans: dict[str, Plan] = {}
        self._misses: dict[str, float] = {}  # digest -> when the "unknown" answer expires
        self._inflight: dict[str, asyncio.Future[tuple[str, str] | None]] = {}
        # Bumped by every invalidation: an answer read before one is served but not cached, and a
        # full load that started before one leaves out the digests invalidated since.
        self.epoch = 0
        self._invalidated: dict[str, int] = {}  # digest -> epoch of its latest invalidation
        self.lookups = 0
        self.loaded = False

    @classmethod
    def from_settings(cls, settings: Settings, lookup: Lookup | None) -> KeyCache:
        return cls(
            settings.key_secret,
            lookup,
            negative_ttl_s=settings.key_negative_ttl_s,
            lookups_per_s=settings.key_lookups_per_s,
            lookup_burst=settings.key_lookup_burst,
            lookup_timeout_s=settings.key_lookup_timeout_s,
        )

    def replace(
        self, keys: Mapping[str, tuple[str, str]], plans: Mapping[str, Plan], *, as_of: int | None = None
    ) -> None:
        """``keys`` maps a stored digest to (user_id, plan name), read after ``epoch`` was ``as_of``."""
        stale = {d for d, e in self._invalidated.items() if as_of is not None and e > as_of}
        self._keys = {digest: (user, plan) for digest, (user, plan) in keys.items() if digest not in stale}
        self._invalidated = {d: e for d, e in self._invalidated.items() if d in stale}
        self._plans = dict(plans)
        self.loaded = True

    def replace_plans(self, plans: Mapping[str, Plan]) -> None:
        self._plans = dict(plans)

    def invalidate(self, digest: str) -> None:
        """Forget what is known about ``digest`` (revoked, or just created): the next request looks it up."""
        self.epoch += 1
        self._invalidated[digest] = self.epoch
        self._keys.pop(digest, None)
        self._misses.pop(digest, None)

    def plan(self, name: str) -> Plan:
        return self._plans.get(name) or (DEFAULT_PLAN if name == "default" else self._plans.get("default", DEFAULT_PLAN))

    def plans_by_user(self) -> dict[str, Plan]:
        """Each user's plan as far as this cache knows its keys (for an admin's view of everyone's quota)."""
        return {user: self.plan(plan) for user, plan in self._keys.values()}

    async def authenticate(self, key: str | None) -> Principal:
        if not key:
            raise Unauthorized("missing API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'")
        if not self.loaded:
            raise Unavailable("API keys are still loading", retry_after=1)
        digest = hash_key(self._secret, key)
        found = self._keys.get(digest)
        if found is not None:
            return Principal(user_id=found[0], plan=self.plan(found[1]))
        answer = await self._miss(digest)
        if answer is None:
            raise Unauthorized("invalid or revoked API key")
        return Principal(user_id=answer[0], plan=self.plan(answer[1]))

    async def _miss(self, digest: str) -> tuple[str, str] | None:
        expires = self._misses.get(digest)
        if expires is not None:
            if expires > self._clock():
                return None
            del self._misses[digest]
        flight = self._inflight.get(digest)
        if flight is None:
            if self._lookup is None:
                return None
            wait = self._bucket.try_acquire()
            if wait > 0:
                LOOKUPS_REFUSED.inc()
                raise Unavailable(
                    "too many unknown API keys are being checked right now; retry shortly",
                    retry_after=max(1, round(wait)),
                )
            flight = asyncio.ensure_future(self._look_up(digest))
            self._inflight[digest] = flight
            flight.add_done_callback(lambda f: self._landed(digest, f))
        # Shielded: one caller giving up (client gone) must not cancel the lookup the others share.
        return await asyncio.shield(flight)

    def _landed(self, digest: str, flight: asyncio.Future[tuple[str, str] | None]) -> None:
        self._inflight.pop(digest, None)
        if not flight.cancelled():
            flight.exception()  # retrieved here too: every waiter may have gone away

    async def _look_up(self, digest: str) -> tuple[str, str] | None:
        assert self._lookup is not None
        epoch = self.epoch
        self.lookups += 1
        try:
            async with asyncio.timeout(self._timeout_s):
                found = await self._lookup(digest)
        except TimeoutError:
            LOOKUPS.labels("error").inc()
            raise Unavailable(
                "API key cannot be checked right now (PostgreSQL is slow to answer)", retry_after=1
            ) from None
        except StoreUnavailable as exc:
            LOOKUPS.labels("error").inc()
            raise Unavailable(
                "API key cannot be checked right now (PostgreSQL is unavailable)", retry_after=1
            ) from exc
        except Unavailable:
            LOOKUPS.labels("error").inc()
            raise
        if found is None:
            LOOKUPS.labels("unknown").inc()
            if epoch == self.epoch:
                self._misses[digest] = self._clock() + self._negative_ttl_s
                self._drop_expired_misses()
            return None
        LOOKUPS.labels("found").inc()
        record, plan = found
        if plan is not None:
            # Only fills a gap (a plan created just before its first key): a row read here may be
            # older than one a plan notification has loaded since.
            self._plans.setdefault(plan.name, plan)
        if epoch == self.epoch:
            self._keys[digest] = (record.user_id, record.plan)
        return record.user_id, record.plan

    def _drop_expired_misses(self) -> None:
        if len(self._misses) < self._misses_cap:
            return
        now = self._clock()
        self._misses = {d: t for d, t in self._misses.items() if t > now}
