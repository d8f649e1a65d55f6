"""The quota audit's pure parts: rebuilding usage from log events, the table's last state per key, reading ranges."""

from __future__ import annotations

import asyncio
import random
from datetime import UTC, datetime
from typing import Any

import orjson
from aiokafka.partitioner import DefaultPartitioner

from schemas.plans import Plan
from streams.commands.audit import Report, Usage, differences, rebuild_all, table_usages
from streams.logread import PartitionRange
from tables.quota import Logged, QuotaState
from tables.quota_book import QuotaBook

NOON = datetime(2025, 3, 14, 12, 0, 30, tzinfo=UTC).timestamp()
DAY = "2025-03-14"
NEXT = datetime(2025, 3, 15, 0, 0, 5, tzinfo=UTC).timestamp()
PLAN = Plan("p", requests_per_day=1000, tokens_per_day=10**9, requests_per_minute=0)
PARTITIONS = [0, 1, 2, 3]


def req(rid: str, user: str = "u", est: int = 10, day: str = DAY) -> dict[str, Any]:
    return {"request_id": rid, "user_id": user, "estimated_tokens": est, "quota_day": day}


def res(rid: str, status: str, total: int, user: str = "u", at: float = NOON) -> dict[str, Any]:
    return {
        "request_id": rid,
        "user_id": user,
        "status": status,
        "usage": {"total_tokens": total},
        "at": at,
    }


def home(user: str) -> int:
    return int(DefaultPartitioner()(orjson.dumps(user), PARTITIONS, PARTITIONS))


def record(user: str, state: QuotaState | None) -> tuple[bytes, bytes | None]:
    return orjson.dumps(user), None if state is None else orjson.dumps(state)


def state(requests: int, used: int, reserved: int, day: str = DAY) -> QuotaState:
    return {"day": day, "requests_used": requests, "tokens_used": used, "tokens_reserved": reserved,
            "minute": 0, "minute_count": 0, "pending": {}, "confirmed_upto": 0.0, "confirmed_offset": -1,
            "released": {}, "settled_upto": -1}  # fmt: skip


def test_rebuild_follows_the_quota_rules() -> None:
    log = rebuild_all(
        [
            req("a", est=10),
            req("b", est=20),
            req("c", est=30),
            req("d", est=40),
            req("x", user="v", est=5),
        ],
        [
            res("a", "running", 0),  # not terminal: the reservation stays until...
            res("a", "completed", 12),  # ...the actual usage replaces it
            res(
                "b", "failed", 50
            ),  # a failure is charged what the model reported, at most the reservation
            res("c", "cancelled", 0),
            res("x", "completed", 3, user="v"),
        ],
        DAY,
    )
    assert log == {"u": Usage(4, 12 + 20 + 0, 40), "v": Usage(1, 3, 0)}


def test_rebuild_counts_each_request_once_when_the_log_repeats_it() -> None:
    """A re-produced admission or result (producer retry, replay after a crash) counts once, like the table."""
    requests = [req("a"), req("b", est=7)]
    results = [res("a", "completed", 11), res("b", "failed", 3)]
    once = rebuild_all(requests, results, DAY)
    twice = rebuild_all(requests + requests, results + results, DAY)
    assert once == twice == {"u": Usage(2, 11 + 3, 0)}
    # The first terminal result settles; a later, different one finds no reservation (as in the table).
    assert rebuild_all(requests, [res("a", "completed", 11), res("a", "expired", 0)], DAY)[
        "u"
    ] == Usage(2, 11, 7)


def test_rebuild_keeps_to_the_day() -> None:
    log = rebuild_all(
        [req("a"), req("old", est=99, day="2025-03-13"), req("late", est=8)],
        [
            res("a", "completed", 4),
            res("old", "completed", 1),
            res("late", "completed", 2, at=NEXT),
        ],
        DAY,
    )
    assert log == {
        "u": Usage(2, 4, 8)
    }  # settled after midnight: the window dropped it with its reservation


def test_rebuild_agrees_with_the_table_driven_by_the_same_events() -> None:
    """Random admissions and terminal results, some repeated, through QuotaBook and through the audit."""
    rng = random.Random(7)
    table: dict[str, QuotaState] = {}
    book = QuotaBook(table, now=lambda: NOON)
    requests: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    for i in range(300):
        user, rid, est = rng.choice("uvw"), f"r{i}", rng.randint(1, 50)
        book.admit(user, PLAN, rid, est)
        requests.append(req(rid, user, est))
    confirmed = [
        Logged(r["user_id"], r["request_id"], NOON, r["estimated_tokens"], DAY, offset)
        for offset, r in enumerate(requests)
    ]
    asyncio.run(book.confirm_requests(confirmed))  # the forward agent read them all from the log
    for offset, ev in enumerate(rng.sample(requests, 250) + rng.sample(requests, 40)):  # 40 repeats
        status = rng.choice(["completed", "completed", "failed", "cancelled", "expired"])
        total = rng.randint(0, 80)
        asyncio.run(book.settle_results([(ev["user_id"], ev["request_id"], status, total, offset)]))
        results.append(res(ev["request_id"], status, total, ev["user_id"]))
    held = {
        u: Usage(s["requests_used"], s["tokens_used"], s["tokens_reserved"])
        for u, s in table.items()
    }
    assert rebuild_all(requests, results, DAY) == held


def test_the_table_side_is_the_last_record_of_the_key_in_its_partition() -> None:
    u, v = "u", "v"
    changelog: dict[int, list[tuple[bytes | None, bytes | None]]] = {p: [] for p in PARTITIONS}
    changelog[home(u)] += [
        record(u, state(1, 0, 10)),
        record(u, state(2, 5, 10)),
        record(u, state(2, 9, 0)),
    ]
    changelog[home(v)] += [record(v, state(3, 3, 0)), record(v, None)]  # deleted: nothing held
    side = table_usages(changelog, DAY)
    assert side.usages == {u: Usage(2, 9, 0)} and side.misplaced == {}


def test_a_later_day_leaves_the_days_final_state_and_an_earlier_one_holds_nothing() -> None:
    changelog: dict[int, list[tuple[bytes | None, bytes | None]]] = {p: [] for p in PARTITIONS}
    changelog[home("u")] += [
        record("u", state(4, 40, 0)),
        record("u", state(1, 0, 5, day="2025-03-15")),
    ]
    changelog[home("w")] += [record("w", state(1, 1, 0, day="2025-03-13"))]
    assert table_usages(changelog, DAY).usages == {"u": Usage(4, 40, 0)}
    assert table_usages(changelog, "2025-03-15").usages == {"u": Usage(1, 0, 5)}


def test_a_state_on_a_partition_the_key_does_not_map_to_is_reported() -> None:
    stray = next(p for p in PARTITIONS if p != home("u"))
    changelog: dict[int, list[tuple[bytes | None, bytes | None]]] = {p: [] for p in PARTITIONS}
    changelog[home("u")].append(record("u", state(2, 9, 0)))
    changelog[stray].append(record("u", state(7, 7, 7)))
    report = Report(DAY, {"u": Usage(2, 9, 0)}, table_usages(changelog, DAY))
    assert report.table.usages == {"u": Usage(2, 9, 0)}
    assert report.differences("u") == [
        f"changelog partitions [{stray}] also hold a state (user 'u', day {DAY})"
    ]


def test_differences_name_the_user_the_day_and_the_field() -> None:
    assert differences(Usage(20, 160, 0), Usage(20, 152, 8), "u", DAY) == [
        f"tokens_used: log 160 != table 152 (user 'u', day {DAY})",
        f"tokens_reserved: log 0 != table 8 (user 'u', day {DAY})",
    ]
    assert differences(Usage(1, 2, 0), None, "u", DAY)[0].startswith(
        "requests_used: log 1 != table 0"
    )
    assert differences(Usage(0, 0, 0), None, "u", DAY) == []


def test_an_open_range_reads_past_a_lagging_list_offsets_answer() -> None:
    # Tansu 0.6 answered ListOffsets 22 where the fetch's high watermark said 63.
    rng = PartitionRange(0, start=0, stop=22, open_end=True)
    rng.learn_end(63)
    assert rng.stop == 63 and all(rng.admit(o, 0) for o in range(63)) and rng.admit(63, 0) is None
    closed = PartitionRange(
        0, start=0, stop=100
    )  # --until past the end: the end is as far as it goes
    closed.learn_end(63)
    closed.learn_end(
        80
    )  # only the first fetch's answer counts: later records are after the snapshot
    assert closed.stop == 63
