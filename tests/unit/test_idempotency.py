"""The Idempotency-Key book without services: repeat, mismatch, expiry, isolation per user."""

from __future__ import annotations

from typing import Any

import pytest

from inferstream.errors import IdempotencyMismatch
from tables.idempotency import Entries, IdempotencyBook, fingerprint

DAY = 86_400.0


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def answer(request_id: str) -> dict[str, Any]:
    return {"status": 202, "headers": {"Location": f"/v1/requests/{request_id}"}, "body": {"request_id": request_id}}


def book() -> tuple[IdempotencyBook, dict[str, Entries], Clock]:
    table: dict[str, Entries] = {}
    clock = Clock(1_000_000.0)
    return IdempotencyBook(table, ttl_s=DAY, now=clock), table, clock


def test_repeat_returns_the_first_answer() -> None:
    ib, _, _ = book()
    fp = fingerprint(b'{"task":"embed","input":"x"}')
    assert ib.lookup("u", "k1", fp) is None
    ib.remember("u", "k1", fp, answer("req_a"))
    assert ib.lookup("u", "k1", fp) == answer("req_a")
    assert ib.lookup("u", "k1", fp) == answer("req_a")


def test_same_key_other_body_is_422_naming_the_first_request() -> None:
    ib, _, _ = book()
    ib.remember("u", "k1", fingerprint(b"one"), answer("req_a"))
    with pytest.raises(IdempotencyMismatch) as info:
        ib.lookup("u", "k1", fingerprint(b"two"))
    exc = info.value
    assert exc.type == "idempotency_key_mismatch"
    assert exc.body()["error"]["request_id"] == "req_a"
    assert exc.body()["error"]["idempotency_key"] == "k1"


def test_keys_are_per_user() -> None:
    ib, _, _ = book()
    ib.remember("u", "k1", fingerprint(b"one"), answer("req_a"))
    assert ib.lookup("v", "k1", fingerprint(b"two")) is None


def test_entries_expire_after_the_ttl_and_are_pruned() -> None:
    ib, table, clock = book()
    fp = fingerprint(b"one")
    ib.remember("u", "old", fp, answer("req_a"))
    clock.t += DAY  # exactly the ttl: still remembered
    assert ib.lookup("u", "old", fp) == answer("req_a")
    clock.t += 0.001
    assert ib.lookup("u", "old", fp) is None
    # An expired key may be reused with another body, and the stale entry goes on the next write.
    assert ib.lookup("u", "old", fingerprint(b"other")) is None
    ib.remember("u", "new", fp, answer("req_b"))
    assert set(table["u"]) == {"new"}


def test_forget_removes_only_that_key() -> None:
    ib, table, _ = book()
    fp = fingerprint(b"one")
    ib.remember("u", "k1", fp, answer("req_a"))
    ib.remember("u", "k2", fp, answer("req_b"))
    ib.forget("u", "k1")
    assert ib.lookup("u", "k1", fp) is None and ib.lookup("u", "k2", fp) == answer("req_b")
    ib.forget("u", "absent")
    ib.forget("nobody", "k1")
    assert set(table) == {"u"}


def test_writes_replace_the_whole_value() -> None:
    # A Faust table only sees assignments: a mutation in place would never reach the changelog.
    ib, table, _ = book()
    ib.remember("u", "k1", fingerprint(b"one"), answer("req_a"))
    first = table["u"]
    ib.remember("u", "k2", fingerprint(b"two"), answer("req_b"))
    assert table["u"] is not first and set(first) == {"k1"}


def test_fingerprint_is_of_the_exact_bytes() -> None:
    assert fingerprint(b'{"a":1}') != fingerprint(b'{"a": 1}')
    assert fingerprint(b"x") == fingerprint(b"x")
