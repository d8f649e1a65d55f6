"""The key cache without services: hashed lookup, revocation by replace, 401 and 503."""

from __future__ import annotations

import hmac

import pytest

from inferstream.errors import Unauthorized, Unavailable
from schemas.plans import DEFAULT_PLAN, Plan
from tables.keys import KeyCache, hash_key

SECRET = "s3cret"
GOLD = Plan("gold", requests_per_day=1_000, tokens_per_day=1_000_000, requests_per_minute=600)


def loaded(*pairs: tuple[str, str, str]) -> KeyCache:
    cache = KeyCache(SECRET)
    cache.replace({hash_key(SECRET, k): (user, plan) for k, user, plan in pairs}, {"gold": GOLD})
    return cache


def test_hash_is_hmac_sha256_with_the_server_secret() -> None:
    digest = hash_key(SECRET, "isk_abc")
    assert len(digest) == 64 and digest != hash_key("other", "isk_abc")
    assert hmac.compare_digest(digest, hash_key(SECRET, "isk_abc"))


def test_authenticates_a_known_key_with_its_plan() -> None:
    cache = loaded(("isk_a", "alice", "gold"), ("isk_b", "bob", "default"))
    alice = cache.authenticate("isk_a")
    assert alice.user_id == "alice" and alice.plan == GOLD
    assert cache.authenticate("isk_b").plan == DEFAULT_PLAN


def test_unknown_plan_falls_back_to_the_default_plan() -> None:
    cache = loaded(("isk_a", "alice", "vanished"))
    assert cache.authenticate("isk_a").plan == DEFAULT_PLAN


def test_the_raw_key_is_not_held() -> None:
    cache = loaded(("isk_secretvalue", "alice", "gold"))
    assert all("isk_secretvalue" not in str(v) for v in (cache._keys, list(cache._keys)))


@pytest.mark.parametrize("key", [None, "", "isk_unknown", "isk_a ", "ISK_A"])
def test_missing_or_unknown_key_is_401(key: str | None) -> None:
    cache = loaded(("isk_a", "alice", "gold"))
    with pytest.raises(Unauthorized) as info:
        cache.authenticate(key)
    assert info.value.status == 401 and info.value.type == "unauthorized"


def test_revoked_key_is_gone_after_replace() -> None:
    cache = loaded(("isk_a", "alice", "gold"), ("isk_b", "bob", "gold"))
    cache.replace({hash_key(SECRET, "isk_b"): ("bob", "gold")}, {"gold": GOLD})
    with pytest.raises(Unauthorized):
        cache.authenticate("isk_a")
    assert cache.authenticate("isk_b").user_id == "bob"


def test_plan_changes_apply_on_replace() -> None:
    cache = loaded(("isk_a", "alice", "gold"))
    cheaper = Plan("gold", requests_per_day=1, tokens_per_day=1, requests_per_minute=1)
    cache.replace({hash_key(SECRET, "isk_a"): ("alice", "gold")}, {"gold": cheaper})
    assert cache.authenticate("isk_a").plan == cheaper


def test_not_loaded_yet_is_503_but_a_missing_key_is_still_401() -> None:
    cache = KeyCache(SECRET)
    with pytest.raises(Unavailable) as info:
        cache.authenticate("isk_a")
    assert info.value.status == 503 and info.value.retry_after == 1
    with pytest.raises(Unauthorized):
        cache.authenticate(None)


def test_a_key_hashed_with_another_secret_is_rejected() -> None:
    cache = KeyCache(SECRET)
    cache.replace({hash_key("other-secret", "isk_a"): ("alice", "gold")}, {"gold": GOLD})
    with pytest.raises(Unauthorized):
        cache.authenticate("isk_a")
