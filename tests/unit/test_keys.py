"""The key cache without services: hashed lookup, lookups on a miss (single flight, bounded, cached), invalidation, 401 and 503."""

from __future__ import annotations

import asyncio
import hmac
import secrets

import pytest

from inferstream.errors import StoreUnavailable, Unauthorized, Unavailable
from schemas.plans import DEFAULT_PLAN, KeyRecord, Plan
from tables.keys import KeyCache, hash_key

SECRET = "s3cret"
GOLD = Plan("gold", requests_per_day=1_000, tokens_per_day=1_000_000, requests_per_minute=600)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeDb:
    """What PostgreSQL would answer for a digest; counts the queries."""

    def __init__(self, *pairs: tuple[str, str, str]) -> None:
        self.rows = {hash_key(SECRET, k): KeyRecord(user, plan) for k, user, plan in pairs}
        self.plans = {"gold": GOLD}
        self.queries = 0
        self.gate: asyncio.Event | None = None  # when set, lookups wait for it
        self.down = False
        self.asked = asyncio.Event()  # set once a query has read its row

    async def lookup(self, digest: str) -> tuple[KeyRecord, Plan | None] | None:
        self.queries += 1
        record = self.rows.get(digest)  # the row as the query read it; the answer may arrive later
        self.asked.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.down:
            raise StoreUnavailable("ConnectionRefusedError: [Errno 111] Connect call failed")
        return None if record is None else (record, self.plans.get(record.plan))

    def add(self, key: str, user: str, plan: str = "gold") -> str:
        digest = hash_key(SECRET, key)
        self.rows[digest] = KeyRecord(user, plan)
        return digest


def loaded(*pairs: tuple[str, str, str], db: FakeDb | None = None, clock: Clock | None = None, **kw: float) -> KeyCache:
    cache = KeyCache(SECRET, db.lookup if db else None, clock=clock or Clock(), **kw)
    cache.replace({hash_key(SECRET, k): (user, plan) for k, user, plan in pairs}, {"gold": GOLD})
    return cache


def test_hash_is_hmac_sha256_with_the_server_secret() -> None:
    digest = hash_key(SECRET, "isk_abc")
    assert len(digest) == 64 and digest != hash_key("other", "isk_abc")
    assert hmac.compare_digest(digest, hash_key(SECRET, "isk_abc"))


async def test_authenticates_a_known_key_with_its_plan() -> None:
    cache = loaded(("isk_a", "alice", "gold"), ("isk_b", "bob", "default"))
    alice = await cache.authenticate("isk_a")
    assert alice.user_id == "alice" and alice.plan == GOLD
    assert (await cache.authenticate("isk_b")).plan == DEFAULT_PLAN


async def test_unknown_plan_falls_back_to_the_default_plan() -> None:
    cache = loaded(("isk_a", "alice", "vanished"))
    assert (await cache.authenticate("isk_a")).plan == DEFAULT_PLAN


def test_the_raw_key_is_not_held() -> None:
    cache = loaded(("isk_secretvalue", "alice", "gold"))
    assert all("isk_secretvalue" not in str(v) for v in (cache._keys, list(cache._keys)))


@pytest.mark.parametrize("key", [None, "", "isk_unknown", "isk_a ", "ISK_A"])
async def test_missing_or_unknown_key_is_401(key: str | None) -> None:
    cache = loaded(("isk_a", "alice", "gold"), db=FakeDb(("isk_a", "alice", "gold")))
    with pytest.raises(Unauthorized) as info:
        await cache.authenticate(key)
    assert info.value.type == "unauthorized"


async def test_revoked_key_is_gone_after_replace() -> None:
    cache = loaded(("isk_a", "alice", "gold"), ("isk_b", "bob", "gold"))
    cache.replace({hash_key(SECRET, "isk_b"): ("bob", "gold")}, {"gold": GOLD})
    with pytest.raises(Unauthorized):
        await cache.authenticate("isk_a")
    assert (await cache.authenticate("isk_b")).user_id == "bob"


async def test_plan_changes_apply_on_replace() -> None:
    cache = loaded(("isk_a", "alice", "gold"))
    cheaper = Plan("gold", requests_per_day=1, tokens_per_day=1, requests_per_minute=1)
    cache.replace({hash_key(SECRET, "isk_a"): ("alice", "gold")}, {"gold": cheaper})
    assert (await cache.authenticate("isk_a")).plan == cheaper


async def test_not_loaded_yet_is_503_but_a_missing_key_is_still_401() -> None:
    cache = KeyCache(SECRET)
    with pytest.raises(Unavailable) as info:
        await cache.authenticate("isk_a")
    assert info.value.type == "unavailable" and info.value.retry_after == 1
    with pytest.raises(Unauthorized):
        await cache.authenticate(None)


async def test_a_key_hashed_with_another_secret_is_rejected() -> None:
    cache = KeyCache(SECRET)
    cache.replace({hash_key("other-secret", "isk_a"): ("alice", "gold")}, {"gold": GOLD})
    with pytest.raises(Unauthorized):
        await cache.authenticate("isk_a")


# ---- a miss is looked up ----------------------------------------------------------------


async def test_a_key_created_after_the_load_works_on_its_first_request_and_is_cached() -> None:
    db = FakeDb()
    cache = loaded(db=db)
    db.add("isk_new", "carol")
    first = await cache.authenticate("isk_new")
    assert (first.user_id, first.plan) == ("carol", GOLD)
    await cache.authenticate("isk_new")
    assert db.queries == 1


async def test_concurrent_first_requests_share_one_lookup() -> None:
    db = FakeDb()
    db.gate = asyncio.Event()
    cache = loaded(db=db)
    db.add("isk_new", "carol")
    waiting = [asyncio.ensure_future(cache.authenticate("isk_new")) for _ in range(100)]
    await db.asked.wait()
    db.gate.set()
    assert {p.user_id for p in await asyncio.gather(*waiting)} == {"carol"}
    assert db.queries == 1


async def test_an_unknown_key_is_remembered_for_the_negative_ttl() -> None:
    db, clock = FakeDb(), Clock()
    cache = loaded(db=db, clock=clock, negative_ttl_s=10)
    for _ in range(50):
        with pytest.raises(Unauthorized):
            await cache.authenticate("isk_bad")
    assert db.queries == 1
    clock.now += 10.5
    with pytest.raises(Unauthorized):
        await cache.authenticate("isk_bad")
    assert db.queries == 2


async def test_creating_a_key_clears_its_negative_entry_at_once() -> None:
    db = FakeDb()
    cache = loaded(db=db, negative_ttl_s=3600)
    with pytest.raises(Unauthorized):
        await cache.authenticate("isk_soon")
    cache.invalidate(db.add("isk_soon", "dave"))  # what the create notification does
    assert (await cache.authenticate("isk_soon")).user_id == "dave"


async def test_a_flood_of_distinct_bad_keys_costs_burst_plus_rate_lookups() -> None:
    db, clock = FakeDb(), Clock()
    cache = loaded(db=db, clock=clock, lookups_per_s=20, lookup_burst=20)
    refused: list[Unavailable] = []
    for _ in range(5):
        for _i in range(2_000):
            try:
                await cache.authenticate("isk_" + secrets.token_urlsafe(16))
            except Unavailable as exc:
                refused.append(exc)
            except Unauthorized:
                pass
        clock.now += 1.0
    assert db.queries == 20 + 20 * 4  # the burst, then the rate for each second that passed
    assert len(refused) == 10_000 - db.queries
    assert {(type(e), e.type, e.retry_after) for e in refused} == {(Unavailable, "unavailable", 1)}


async def test_cached_keys_keep_working_while_lookups_are_exhausted() -> None:
    db, clock = FakeDb(), Clock()
    cache = loaded(("isk_a", "alice", "gold"), db=db, clock=clock, lookups_per_s=1, lookup_burst=1)
    with pytest.raises(Unauthorized):
        await cache.authenticate("isk_bad1")
    with pytest.raises(Unavailable):
        await cache.authenticate("isk_bad2")
    assert (await cache.authenticate("isk_a")).user_id == "alice"


async def test_postgres_down_is_503_for_an_unknown_key_and_not_remembered() -> None:
    db = FakeDb(("isk_a", "alice", "gold"))
    db.down = True
    cache = loaded(("isk_a", "alice", "gold"), db=db)
    db.add("isk_new", "erin")
    with pytest.raises(Unavailable) as info:
        await cache.authenticate("isk_new")
    assert info.value.retry_after == 1 and "API key cannot be checked" in info.value.message
    assert "Errno" not in info.value.message  # the driver's reason is logged, not answered
    assert (await cache.authenticate("isk_a")).user_id == "alice"  # cached keys keep working
    db.down = False
    assert (await cache.authenticate("isk_new")).user_id == "erin"


async def test_a_slow_lookup_is_503_after_the_timeout() -> None:
    db = FakeDb()
    db.gate = asyncio.Event()  # never set: PostgreSQL hangs
    cache = loaded(db=db, lookup_timeout_s=0.05)
    with pytest.raises(Unavailable) as info:
        await asyncio.wait_for(cache.authenticate("isk_x"), timeout=5)
    assert info.value.type == "unavailable"


async def test_a_revocation_during_a_lookup_keeps_the_answer_out_of_the_cache() -> None:
    db = FakeDb()
    db.gate = asyncio.Event()
    cache = loaded(db=db)
    digest = db.add("isk_k", "frank")
    pending = asyncio.ensure_future(cache.authenticate("isk_k"))
    await db.asked.wait()
    del db.rows[digest]
    cache.invalidate(digest)  # the revocation's notification lands while the read is out
    db.gate.set()
    assert (await pending).user_id == "frank"  # read before the revocation: served once
    with pytest.raises(Unauthorized):
        await cache.authenticate("isk_k")


async def test_a_reload_begun_before_a_revocation_does_not_bring_the_key_back() -> None:
    cache = loaded(("isk_a", "alice", "gold"))
    as_of = cache.epoch
    snapshot = {hash_key(SECRET, "isk_a"): ("alice", "gold")}  # read before the revocation committed
    cache.invalidate(hash_key(SECRET, "isk_a"))
    cache.replace(snapshot, {"gold": GOLD}, as_of=as_of)
    with pytest.raises(Unauthorized):
        await cache.authenticate("isk_a")
    cache.replace(snapshot, {"gold": GOLD}, as_of=cache.epoch)  # a later reload that still sees it: trusted
    assert (await cache.authenticate("isk_a")).user_id == "alice"


async def test_a_looked_up_plan_fills_a_gap_but_never_overrides_a_loaded_plan() -> None:
    db = FakeDb()
    fresh = Plan("fresh", requests_per_day=7, tokens_per_day=7, requests_per_minute=7)
    db.plans["fresh"] = fresh
    db.plans["gold"] = Plan("gold", requests_per_day=1, tokens_per_day=1, requests_per_minute=1)
    cache = loaded(db=db)
    db.add("isk_f", "gina", "fresh")
    db.add("isk_g", "hank", "gold")
    assert (await cache.authenticate("isk_f")).plan == fresh
    assert (await cache.authenticate("isk_g")).plan == GOLD
