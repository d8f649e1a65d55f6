"""Quota rules without services: admission, rate limit, rollover, settlement, refunds, owner lookup."""

from __future__ import annotations

import asyncio
import math
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

from inferstream.clock import utc_day as clock_utc_day
from inferstream.errors import QuotaExceeded, Unavailable
from schemas.plans import DEFAULT_PLAN, Plan
from tables.quota import (
    ORPHAN_GRACE_S,
    Logged,
    QuotaState,
    confirm,
    current,
    decide,
    empty_state,
    orphans,
    quota_doc,
    release,
    settle,
)
from tables.quota_book import UNLOGGED_KEEP_S, UNLOGGED_PRUNE_AT, QuotaBook

# 2025-03-14 12:00:30 UTC: mid-day, 30 s into a minute.
NOON = datetime(2025, 3, 14, 12, 0, 30, tzinfo=UTC).timestamp()
MIDNIGHT = datetime(2025, 3, 15, tzinfo=UTC).timestamp()
PLAN = Plan("p", requests_per_day=5, tokens_per_day=1_000, requests_per_minute=100)


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def book(now: float = NOON) -> tuple[QuotaBook, dict[str, QuotaState], Clock]:
    table: dict[str, QuotaState] = {}
    clock = Clock(now)
    return QuotaBook(table, now=clock), table, clock


def settle_one(qb: QuotaBook, user: str, request_id: str, status: str, used: int, offset: int | None = None) -> bool:
    """What the settle agent does for a batch of one terminal result; whether it changed the state."""
    return bool(asyncio.run(qb.settle_results([(user, request_id, status, used, offset)])))


def confirm_one(qb: QuotaBook, user: str, requests: list[tuple[str, float, int]]) -> bool:
    """What the forward agent does for ``user``'s requests read from the log; whether the state changed."""
    before = qb.table.get(user)

    async def run() -> None:
        logged = [Logged(user, rid, at, est, clock_utc_day(at), None) for rid, at, est in requests]
        await asyncio.gather(*await qb.confirm_requests(logged))

    asyncio.run(run())
    return qb.table.get(user) is not before


def run(qb: QuotaBook, user: str, plan: Plan, request_id: str, estimated: int) -> None:
    """Admitted, and its request read from the log by the forward agent: what a result can settle."""
    qb.admit(user, plan, request_id, estimated)
    confirm_one(qb, user, [(request_id, qb.now(), estimated)])


def rejection(fn: Any, *args: Any) -> QuotaExceeded:
    with pytest.raises(QuotaExceeded) as info:
        fn(*args)
    return info.value


def test_default_plan_is_100_requests_and_10000_tokens() -> None:
    assert (DEFAULT_PLAN.requests_per_day, DEFAULT_PLAN.tokens_per_day) == (100, 10_000)


def test_admits_exactly_the_daily_requests_then_429_with_details() -> None:
    qb, table, _ = book()
    admissions = [qb.admit("u", PLAN, f"r{i}", 10) for i in range(5)]
    assert [a.requests_remaining for a in admissions] == [4, 3, 2, 1, 0]
    assert admissions[-1].tokens_remaining == 1_000 - 50
    exc = rejection(qb.admit, "u", PLAN, "r5", 10)
    assert exc.type == "request_quota_exceeded"
    body = exc.body()["error"]
    assert body["requests"] == {"used": 5, "limit": 5}
    assert body["tokens"] == {"used": 0, "reserved": 50, "limit": 1_000, "estimated": 10}
    # Retry-After is the time to the window's reset at midnight UTC.
    assert exc.retry_after == math.ceil(MIDNIGHT - NOON)
    # A rejection writes nothing.
    assert table["u"]["requests_used"] == 5 and "r5" not in table["u"]["pending"]


def test_headers_carry_the_rate_limit_figures() -> None:
    qb, _, _ = book()
    headers = qb.admit("u", PLAN, "r1", 100).headers()
    assert headers == {
        "X-RateLimit-Limit-Requests": "5",
        "X-RateLimit-Remaining-Requests": "4",
        "X-RateLimit-Limit-Tokens": "1000",
        "X-RateLimit-Remaining-Tokens": "900",
        "X-RateLimit-Reset": str(math.ceil(MIDNIGHT - NOON)),
    }


def test_tokens_used_plus_reserved_plus_estimate_must_fit() -> None:
    qb, _, _ = book()
    plan = Plan("t", requests_per_day=100, tokens_per_day=300, requests_per_minute=0)
    run(qb, "u", plan, "a", 100)
    settle_one(qb, "u", "a", "completed", 120)  # used 120
    run(qb, "u", plan, "b", 100)  # reserved 100: 220
    run(qb, "u", plan, "c", 80)  # exactly the limit: 300 <= 300
    exc = rejection(qb.admit, "u", plan, "d", 1)
    assert exc.type == "token_quota_exceeded"
    assert exc.body()["error"]["tokens"] == {"used": 120, "reserved": 180, "limit": 300, "estimated": 1}
    assert exc.retry_after == math.ceil(MIDNIGHT - NOON)
    # A request that would not fit alone is rejected while a smaller one still fits after a refund.
    settle_one(qb, "u", "c", "failed", 0)
    assert rejection(qb.admit, "u", plan, "e", 81).type == "token_quota_exceeded"
    run(qb, "u", plan, "f", 80)


def test_requests_per_minute_with_retry_after_to_the_next_minute() -> None:
    qb, _, clock = book()
    plan = Plan("m", requests_per_day=100, tokens_per_day=10_000, requests_per_minute=5)
    for i in range(5):
        qb.admit("u", plan, f"r{i}", 1)
    exc = rejection(qb.admit, "u", plan, "r5", 1)
    assert exc.type == "rate_limited"
    assert exc.retry_after == 30  # NOON is 30 s into its minute
    assert exc.body()["error"]["requests"] == {"used": 5, "limit": 100}
    clock.t += 29.5
    assert rejection(qb.admit, "u", plan, "r5", 1).retry_after == 1
    clock.t += 0.5  # the next minute starts: a fresh window
    for i in range(5):
        qb.admit("u", plan, f"s{i}", 1)
    assert rejection(qb.admit, "u", plan, "s5", 1).type == "rate_limited"


def test_zero_requests_per_minute_means_no_rate_limit() -> None:
    qb, _, _ = book()
    plan = Plan("z", requests_per_day=50, tokens_per_day=10_000, requests_per_minute=0)
    for i in range(50):
        qb.admit("u", plan, f"r{i}", 1)
    assert rejection(qb.admit, "u", plan, "x", 1).type == "request_quota_exceeded"


def test_daily_quota_is_checked_before_the_minute_limit() -> None:
    qb, _, _ = book()
    plan = Plan("d", requests_per_day=2, tokens_per_day=10_000, requests_per_minute=2)
    qb.admit("u", plan, "a", 1)
    qb.admit("u", plan, "b", 1)
    assert rejection(qb.admit, "u", plan, "c", 1).type == "request_quota_exceeded"


def test_window_rolls_over_at_utc_midnight() -> None:
    qb, table, clock = book(MIDNIGHT - 0.25)
    for i in range(5):
        run(qb, "u", PLAN, f"r{i}", 100)
    exc = rejection(qb.admit, "u", PLAN, "late", 1)
    assert exc.type == "request_quota_exceeded" and exc.retry_after == 1
    assert qb.doc("u", PLAN)["window"] == {
        "start": "2025-03-14T00:00:00.000Z",
        "reset_at": "2025-03-15T00:00:00.000Z",
    }
    clock.t = MIDNIGHT  # the first instant of the new day
    admission = qb.admit("u", PLAN, "early", 7)
    assert admission.window_day == "2025-03-15" and admission.requests_remaining == 4
    assert admission.reset_s == 86_400
    assert table["u"]["pending"] == {str(int(MIDNIGHT)): [1, 7]} and table["u"]["tokens_reserved"] == 7
    doc = qb.doc("u", PLAN)
    assert doc["window"]["start"] == "2025-03-15T00:00:00.000Z"
    assert doc["requests"] == {"used": 1, "limit": 5, "remaining": 4}
    # Yesterday's reservation went with yesterday's window: its result charges nothing today.
    assert not settle_one(qb, "u", "r0", "completed", 90)
    assert qb.doc("u", PLAN)["tokens"] == {"used": 0, "reserved": 7, "limit": 1_000, "remaining": 993}


def test_reading_after_midnight_shows_a_fresh_window_without_writing() -> None:
    qb, table, clock = book(MIDNIGHT - 10)
    qb.admit("u", PLAN, "r", 100)
    clock.t = MIDNIGHT + 10
    doc = qb.doc("u", PLAN)
    assert doc["requests"]["used"] == 0 and doc["tokens"]["reserved"] == 0
    assert qb.snapshot("u", PLAN).requests_remaining == 5
    assert table["u"]["day"] == "2025-03-14"  # reads never write


def test_completed_charges_actual_usage_and_frees_the_reservation() -> None:
    qb, _, _ = book()
    run(qb, "u", PLAN, "a", 300)
    run(qb, "u", PLAN, "b", 200)
    assert settle_one(qb, "u", "a", "completed", 120)
    assert qb.doc("u", PLAN)["tokens"] == {"used": 120, "reserved": 200, "limit": 1_000, "remaining": 680}
    # Usage above the estimate is charged too: it is what the model used.
    assert settle_one(qb, "u", "b", "completed", 250)
    assert qb.doc("u", PLAN)["tokens"] == {"used": 370, "reserved": 0, "limit": 1_000, "remaining": 630}
    assert qb.doc("u", PLAN)["requests"]["used"] == 2


@pytest.mark.parametrize("status", ["failed", "cancelled", "expired"])
def test_failed_cancelled_expired_refund_the_reservation(status: str) -> None:
    qb, _, _ = book()
    run(qb, "u", PLAN, "a", 300)
    assert settle_one(qb, "u", "a", status, 0)
    tokens = qb.doc("u", PLAN)["tokens"]
    assert tokens == {"used": 0, "reserved": 0, "limit": 1_000, "remaining": 1_000}
    # The request stays counted: it was admitted.
    assert qb.doc("u", PLAN)["requests"]["used"] == 1


def test_a_failure_still_charges_reported_usage_up_to_the_reservation() -> None:
    qb, _, _ = book()
    run(qb, "u", PLAN, "a", 100)
    run(qb, "u", PLAN, "b", 100)
    settle_one(qb, "u", "a", "failed", 40)
    settle_one(qb, "u", "b", "cancelled", 5_000)
    assert qb.doc("u", PLAN)["tokens"]["used"] == 140


def test_settling_twice_changes_nothing() -> None:
    qb, table, _ = book()
    run(qb, "u", PLAN, "a", 100)
    run(qb, "u", PLAN, "b", 50)
    assert settle_one(qb, "u", "a", "completed", 80)
    after_first = dict(table["u"])
    for status in ("completed", "failed", "cancelled", "expired"):
        assert not settle_one(qb, "u", "a", status, 80)
        assert table["u"] == after_first
    assert dict(qb.reservations.held()) == {"b/u": [50, "2025-03-14"]}


def test_a_result_before_its_request_was_read_from_the_log_settles_nothing() -> None:
    # Only the forward agent's confirmation gives a request a reservation a result can settle.
    qb, table, _ = book()
    qb.admit("u", PLAN, "a", 100)
    assert not settle_one(qb, "u", "a", "completed", 80)
    assert table["u"]["tokens_reserved"] == 100


def test_settling_a_confirmed_request_twice_changes_nothing_and_ends_its_reservation() -> None:
    qb, table, _ = book()
    qb.admit("u", PLAN, "a", 100)
    qb.admit("u", PLAN, "b", 50)
    confirm_one(qb, "u", [("a", NOON, 100), ("b", NOON, 50)])
    assert dict(qb.reservations.held()) == {"a/u": [100, "2025-03-14"], "b/u": [50, "2025-03-14"]}
    assert settle_one(qb, "u", "a", "completed", 80, offset=7)
    assert dict(qb.reservations.held()) == {"b/u": [50, "2025-03-14"]}
    after_first = dict(table["u"])
    assert after_first["settled_upto"] == 7
    assert not settle_one(qb, "u", "a", "failed", 0, offset=9)  # a second terminal result
    assert table["u"] == after_first
    # Both results in one batch: the second is the duplicate, whatever the order of the writes.
    assert [r[1] for r in asyncio.run(
        qb.settle_results([("u", "b", "completed", 10, 10), ("u", "b", "completed", 10, 11)])
    )] == ["b"]  # fmt: skip
    assert qb.doc("u", PLAN)["tokens"] == {"used": 90, "reserved": 0, "limit": 1_000, "remaining": 910}
    assert dict(qb.reservations.held()) == {}


def test_a_replayed_settlement_is_not_applied_again_and_still_ends_the_reservation() -> None:
    # A crash after the state's ack and before the reservation's removal: the replay sees its offset.
    qb, table, _ = book()
    qb.admit("u", PLAN, "a", 100)
    confirm_one(qb, "u", [("a", NOON, 100)])
    state = settle(table["u"], "a", "completed", 30, NOON, qb.reservations.get("u", "a"), offset=5)
    assert state is not None
    table["u"] = state  # the state written and acknowledged; the entry's removal lost
    assert not settle_one(qb, "u", "a", "completed", 30, offset=5)
    assert dict(qb.reservations.held()) == {}
    assert qb.doc("u", PLAN)["tokens"]["used"] == 30


def test_a_reservation_from_an_earlier_day_settles_without_charging_today() -> None:
    qb, table, clock = book(MIDNIGHT - 1)
    qb.admit("u", PLAN, "a", 100)
    confirm_one(qb, "u", [("a", MIDNIGHT - 1, 100)])
    clock.t = MIDNIGHT + 5
    qb.admit("u", PLAN, "b", 10)
    assert not settle_one(qb, "u", "a", "completed", 70, offset=3)
    assert dict(qb.reservations.held()) == {}
    assert qb.doc("u", PLAN)["tokens"] == {"used": 0, "reserved": 10, "limit": 1_000, "remaining": 990}


def test_settle_for_an_unknown_user_or_request_is_a_no_op() -> None:
    qb, table, _ = book()
    assert not settle_one(qb, "nobody", "a", "completed", 10)
    assert not qb.release("nobody", "a", NOON, 10)
    assert table == {}
    assert settle(None, "a", "completed", 10, NOON) is None
    assert release(None, "a", NOON, 10, NOON) is None


def test_counters_never_go_below_zero() -> None:
    # A corrupted or hand-edited state (reserved lower than a reservation) still cannot go negative.
    state = {**empty_state("2025-03-14"), "tokens_reserved": 10}
    settled = settle(state, "a", "failed", -7, NOON, (500, "2025-03-14"))
    assert settled is not None
    assert settled["tokens_reserved"] == 0 and settled["tokens_used"] == 0
    state = {**empty_state("2025-03-14"), "requests_used": 0, "pending": {str(int(NOON)): [1, 5]}}
    released = release(state, "a", NOON, 5, NOON)
    assert released is not None
    assert released["requests_used"] == 0 and released["minute_count"] == 0
    assert released["tokens_reserved"] == 0


def test_completed_with_negative_usage_charges_nothing() -> None:
    qb, _, _ = book()
    run(qb, "u", PLAN, "a", 100)
    settle_one(qb, "u", "a", "completed", -5)
    assert qb.doc("u", PLAN)["tokens"]["used"] == 0


def test_release_undoes_an_admission_completely() -> None:
    qb, table, _ = book()
    plan = Plan("m", requests_per_day=5, tokens_per_day=1_000, requests_per_minute=1)
    qb.admit("u", plan, "a", 100)
    assert rejection(qb.admit, "u", plan, "b", 1).type == "rate_limited"
    assert qb.release("u", "a", NOON, 100)
    assert table["u"]["requests_used"] == 0 and table["u"]["tokens_reserved"] == 0
    assert table["u"]["pending"] == {} and list(table["u"]["released"]) == ["a"]
    qb.admit("u", plan, "b", 1)  # the minute slot came back too
    assert not qb.release("u", "a", NOON, 100)  # idempotent


def test_decide_is_pure() -> None:
    state = empty_state("2025-03-14")
    new, _ = decide(state, PLAN, "a", 10, NOON)
    assert state == empty_state("2025-03-14")
    assert new["requests_used"] == 1 and new["pending"] == {str(int(NOON)): [1, 10]}
    settled = settle(new, "a", "completed", 3, NOON, (10, "2025-03-14"))
    assert new["pending"] == {str(int(NOON)): [1, 10]} and settled is not None


def test_users_are_independent() -> None:
    qb, _, _ = book()
    for i in range(5):
        qb.admit("u", PLAN, f"u{i}", 1)
    qb.admit("v", PLAN, "v0", 1)
    assert qb.doc("v", PLAN)["requests"]["used"] == 1


def test_quota_doc_matches_the_contract() -> None:
    doc = quota_doc("alice", PLAN, None, NOON)
    assert doc == {
        "user_id": "alice",
        "plan": "p",
        "window": {"start": "2025-03-14T00:00:00.000Z", "reset_at": "2025-03-15T00:00:00.000Z"},
        "requests": {"used": 0, "limit": 5, "remaining": 5},
        "tokens": {"used": 0, "reserved": 0, "limit": 1_000, "remaining": 1_000},
    }


def test_plan_caps_priority() -> None:
    plan = Plan("n", requests_per_day=1, tokens_per_day=1, requests_per_minute=1, max_priority="normal")
    assert [plan.cap_priority(p) for p in ("high", "normal", "low")] == ["normal", "normal", "low"]


# ---- pending admissions: confirmed from the log, orphans released ---------------------------

TIMEOUT, LONG = 5.0, 300.0
SETTLED_BY = TIMEOUT + ORPHAN_GRACE_S
DAY = "2025-03-14"
SECOND = str(int(NOON))


def logged(rid: str, at: float, est: int, offset: int | None = None, user: str = "u") -> Logged:
    return Logged(user, rid, at, est, clock_utc_day(at), offset)


def test_admission_is_pending_until_confirmed() -> None:
    qb, table, _ = book()
    qb.admit("u", PLAN, "a", 10)
    qb.admit("u", PLAN, "b", 5)
    assert table["u"]["pending"] == {SECOND: [2, 15]}
    assert confirm_one(qb, "u", [("a", NOON, 10)])
    assert table["u"]["pending"] == {SECOND: [1, 5]} and table["u"]["confirmed_upto"] == NOON
    # Confirmed is still reserved, in its own entry: the result settles it.
    assert dict(qb.reservations.held()) == {"a/u": [10, DAY]} and table["u"]["tokens_reserved"] == 15
    assert table["u"]["requests_used"] == 2


def test_the_state_does_not_grow_with_the_admissions_pending_or_in_flight() -> None:
    qb, table, clock = book()
    plan = Plan("big", requests_per_day=10**9, tokens_per_day=10**12, requests_per_minute=0)
    for i in range(5_000):
        clock.t = NOON + i / 1000  # 1,000 admissions a second, none read from the log yet
        qb.admit("u", plan, f"r{i}", 10)
    assert len(orjson.dumps(table["u"])) < 400  # five buckets
    asyncio.run(qb.confirm_requests([logged(f"r{i}", NOON + i / 1000, 10, offset=i) for i in range(5_000)]))
    assert table["u"]["pending"] == {} and len(qb.reservations.held()) == 5_000
    assert len(orjson.dumps(table["u"])) < 400  # 5,000 in flight: their reservations are entries of their own


def test_confirm_writes_once_per_user_and_a_replay_writes_nothing() -> None:
    qb, table, _ = book()
    qb.admit("u", PLAN, "a", 10)
    qb.admit("u", PLAN, "b", 20)
    writes: list[str] = []

    class Counting(dict[str, QuotaState]):
        def __setitem__(self, key: str, value: QuotaState) -> None:
            writes.append(key)
            super().__setitem__(key, value)

    qb.table = Counting(table)
    batch = [logged("a", NOON, 10, offset=3), logged("b", NOON, 20, offset=4)]
    asyncio.run(qb.confirm_requests(batch))
    assert writes == ["u"] and qb.table["u"]["confirmed_offset"] == 4 and qb.table["u"]["pending"] == {}
    settle_one(qb, "u", "a", "completed", 7)
    writes.clear()
    # The batch again after a crash (offsets not committed): its offsets say it was confirmed.
    asyncio.run(qb.confirm_requests(batch))
    assert writes == []
    assert qb.doc("u", PLAN)["requests"]["used"] == 2 and qb.doc("u", PLAN)["tokens"] == {
        "used": 7, "reserved": 20, "limit": 1_000, "remaining": 973
    }  # fmt: skip


def test_a_redriven_request_is_not_charged_and_an_earlier_day_is_not_confirmed() -> None:
    qb, table, _ = book()
    redrive = Logged("u", "x", NOON, 50, DAY, 1, admitted=False)
    yesterday = Logged("u", "y", NOON - 86_400, 50, "2025-03-13", 2)
    asyncio.run(qb.confirm_requests([redrive, yesterday]))
    assert qb.doc("u", PLAN)["requests"]["used"] == 0 and dict(qb.reservations.held()) == {}
    assert table["u"]["confirmed_offset"] == 2


def _admitted(*created: float) -> QuotaState:
    state: QuotaState | None = None
    for i, at in enumerate(created):
        state, _ = decide(state, PLAN, f"r{i}", 10, at)
    assert state is not None
    return state


def test_no_orphan_before_the_admission_timeout_and_grace() -> None:
    state = _admitted(NOON)
    end = int(NOON) + 1  # the end of the admission's second
    assert orphans(state, end + SETTLED_BY, TIMEOUT, LONG) == []
    late = {**state, "confirmed_upto": NOON + 100}  # even when later requests were confirmed
    assert orphans(late, end + SETTLED_BY, TIMEOUT, LONG) == []
    assert orphans(late, end + SETTLED_BY + 0.1, TIMEOUT, LONG) == [SECOND]


def test_orphan_once_a_request_admitted_after_its_timeout_is_confirmed() -> None:
    state = _admitted(NOON, NOON + 1, NOON + SETTLED_BY + 2)
    now = NOON + 60
    # r1 confirmed, admitted within r0's timeout: r0's write could still have been behind it.
    found = confirm(state, [logged("r1", NOON + 1, 10)], now)
    assert found is not None and orphans(found[0], now, TIMEOUT, LONG) == []
    found = confirm(found[0], [logged("r2", NOON + SETTLED_BY + 2, 10)], now)
    assert found is not None and orphans(found[0], now, TIMEOUT, LONG) == [SECOND]


def test_orphan_after_the_long_bound_without_later_requests() -> None:
    state = _admitted(NOON)
    end = int(NOON) + 1
    assert orphans(state, end + LONG, TIMEOUT, LONG) == []
    assert orphans(state, end + LONG + 0.1, TIMEOUT, LONG) == [SECOND]


def test_release_orphans_gives_back_request_and_tokens() -> None:
    qb, table, clock = book()
    qb.admit("u", PLAN, "a", 100)
    qb.admit("u", PLAN, "b", 50)
    confirm_one(qb, "u", [("b", NOON, 50)])
    clock.t = NOON + LONG + 2
    assert qb.release_orphans("u", TIMEOUT, LONG) == 1
    st = table["u"]
    assert (st["requests_used"], st["tokens_reserved"], st["pending"]) == (1, 50, {})
    assert dict(qb.reservations.held()) == {"b/u": [50, DAY]}
    assert qb.release_orphans("u", TIMEOUT, LONG) == 0  # nothing left to release
    assert qb.release_orphans("nobody", TIMEOUT, LONG) == 0 and "nobody" not in table


def test_a_released_orphan_that_reaches_the_log_after_all_is_charged_again_once() -> None:
    qb, table, clock = book()
    qb.admit("u", PLAN, "a", 100)
    clock.t = NOON + LONG + 2
    assert qb.release_orphans("u", TIMEOUT, LONG) == 1
    assert qb.doc("u", PLAN)["requests"]["used"] == 0
    asyncio.run(qb.confirm_requests([logged("a", NOON, 100, offset=8)]))
    st = table["u"]
    assert (st["requests_used"], st["tokens_reserved"], st["pending"]) == (1, 100, {})
    assert dict(qb.reservations.held()) == {"a/u": [100, DAY]}
    asyncio.run(qb.confirm_requests([logged("a", NOON, 100, offset=8)]))  # seen again: charged once
    assert settle_one(qb, "u", "a", "completed", 30)
    assert qb.doc("u", PLAN)["tokens"]["used"] == 30 and qb.doc("u", PLAN)["requests"]["used"] == 1


def test_the_bucket_is_the_second_of_the_requests_created_at_not_of_a_later_clock_read() -> None:
    qb, table, clock = book(NOON + 0.9999)
    clock.t = NOON + 1.0001  # the clock moved on past a second between created_at and the quota check
    qb.admit("u", PLAN, "a", 10, at=NOON + 0.9999)
    asyncio.run(qb.confirm_requests([logged("a", NOON + 0.9999, 10, offset=1)]))
    assert table["u"]["pending"] == {} and dict(qb.reservations.held()) == {"a/u": [10, DAY]}


def test_admissions_that_ended_unseen_are_forgotten_in_time() -> None:
    # A handler cancelled before its write neither releases nor sees its request in the log.
    qb, _, clock = book()
    plan = Plan("big", requests_per_day=10**9, tokens_per_day=10**12, requests_per_minute=0)
    for i in range(UNLOGGED_PRUNE_AT + 1):
        qb.admit("u", plan, f"old{i}", 1)
    clock.t = NOON + UNLOGGED_KEEP_S + 1
    qb.admit("u", plan, "new", 1)
    assert not qb.release("u", "old0", NOON, 1) and qb.release("u", "new", clock.t, 1)


def test_a_request_no_admission_counted_is_not_charged() -> None:
    # Written to the log around the gateway: the table does not count it, and the audit reports it.
    qb, table, _ = book()
    qb.admit("u", PLAN, "a", 10)
    asyncio.run(qb.confirm_requests([logged("forged", NOON - 30, 500, offset=1), logged("a", NOON, 10, offset=2)]))
    assert (table["u"]["requests_used"], table["u"]["tokens_reserved"]) == (1, 10)
    assert dict(qb.reservations.held()) == {"a/u": [10, DAY]}


def test_a_request_the_gateway_gave_up_on_that_reaches_the_log_is_charged_again_once() -> None:
    qb, table, _ = book()
    qb.admit("u", PLAN, "a", 100)
    qb.admit("u", PLAN, "b", 10)
    assert qb.release("u", "a", NOON, 100)  # its write timed out
    assert table["u"]["pending"] == {SECOND: [1, 10]} and table["u"]["released"] == {"a": NOON}
    asyncio.run(qb.confirm_requests([logged("a", NOON, 100, offset=1), logged("b", NOON, 10, offset=2)]))
    st = table["u"]
    assert (st["requests_used"], st["tokens_reserved"], st["pending"], st["released"]) == (2, 110, {}, {})


def test_the_gateway_releases_only_what_is_not_in_the_log_yet() -> None:
    # A confirmed request is in the log and will run: a late timeout in the gateway must not refund it.
    qb, table, _ = book()
    qb.admit("u", PLAN, "a", 100)
    confirm_one(qb, "u", [("a", NOON, 100)])
    assert not qb.release("u", "a", NOON, 100)
    qb.admit("u", PLAN, "b", 100)
    qb.logged("b")  # its write was acknowledged: 202
    assert not qb.release("u", "b", NOON, 100)
    assert table["u"]["requests_used"] == 2 and table["u"]["tokens_reserved"] == 200


def test_a_state_written_before_pending_existed_still_decodes() -> None:
    # Written by a version that kept every reservation in the user's state.
    old = {
        "day": "2025-03-14", "requests_used": 2, "tokens_used": 5, "tokens_reserved": 10,
        "reservations": {"a": 10}, "minute": 0, "minute_count": 0,
    }  # fmt: skip
    st = current(old, NOON)
    assert st["pending"] == {} and st["released"] == {} and st["confirmed_upto"] == 0.0
    assert st["requests_used"] == 2 and st["reservations"] == {"a": 10}  # type: ignore[typeddict-item]
    assert orphans(old, NOON + LONG * 10, TIMEOUT, LONG) == []
    assert confirm(old, [logged("a", NOON, 10)], NOON) is None  # confirmed in that version already
    new, _ = decide(old, PLAN, "b", 1, NOON)
    assert new["pending"] == {SECOND: [1, 1]} and new["requests_used"] == 3
    settled = settle(old, "a", "completed", 4, NOON)
    assert settled is not None and settled["tokens_used"] == 9 and settled["tokens_reserved"] == 0


def test_a_state_of_the_version_with_per_user_reservations_settles_and_confirms() -> None:
    # That version kept {request id: estimate} in the user's state and pending as {request id: created_at}.
    qb, table, _ = book()
    table["u"] = {
        "day": DAY, "requests_used": 3, "tokens_used": 0, "tokens_reserved": 35, "minute": 0, "minute_count": 0,
        "reservations": {"a": 10, "b": 20, "c": 5}, "pending": {"b": NOON, "c": NOON},
        "confirmed_upto": 0.0, "released": {},
    }  # type: ignore[typeddict-unknown-key]  # fmt: skip
    assert settle_one(qb, "u", "a", "completed", 4)  # confirmed in that version: its estimate is in the map
    assert confirm_one(qb, "u", [("b", NOON, 20)])  # pending in that version: in a bucket now
    assert dict(qb.reservations.held()) == {"b/u": [20, DAY]}
    assert table["u"]["pending"] == {SECOND: [1, 5]}
    assert settle_one(qb, "u", "b", "failed", 0)
    st = table["u"]
    assert (st["requests_used"], st["tokens_used"], st["tokens_reserved"]) == (3, 4, 5)
    assert "reservations" not in st or st["reservations"] == {}  # type: ignore[typeddict-item]


# ---- owner lookup: 503 instead of a guess --------------------------------------------------


class _Event:
    def __init__(self, done: bool) -> None:
        self.done = done

    def is_set(self) -> bool:
        return self.done


class _FakeApp:
    """Just the attributes ``OwnerRouter.owner`` reads before it would consult the assignor."""

    def __init__(self, *, rebalancing: bool, recovered: bool) -> None:
        self.rebalancing = rebalancing
        self.tables = type("Tables", (), {"recovery": type("R", (), {"completed": _Event(recovered)})()})()


@pytest.mark.parametrize(("rebalancing", "recovered"), [(True, True), (False, False), (True, False)])
def test_owner_lookup_is_unavailable_while_rebalancing_or_recovering(
    rebalancing: bool, recovered: bool
) -> None:
    from streams.gateway.routing import OwnerRouter

    router = OwnerRouter(_FakeApp(rebalancing=rebalancing, recovered=recovered), table=None, timeout_s=1)  # type: ignore[arg-type]
    with pytest.raises(Unavailable) as info:
        router.owner("alice")
    assert info.value.type == "unavailable" and info.value.retry_after == 1


async def test_written_resolves_at_once_for_a_plain_mapping() -> None:
    qb, _, _ = book()
    qb.admit("u", PLAN, "a", 1)
    assert await qb.written("u") is None
