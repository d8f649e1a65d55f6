"""A batch charged whole: its admission, its lines confirmed in line order (copies, gaps), settlement per line."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest

from inferstream.clock import utc_day
from inferstream.errors import QuotaExceeded
from inferstream.ids import batch_line_id, new_batch_id
from schemas.plans import Plan
from tables.quota import (
    Logged,
    QuotaState,
    _confirm_line,
    confirm,
    current,
    decide,
    decide_batch,
    release_batch,
)
from tables.quota_book import QuotaBook

NOON = datetime(2025, 3, 14, 12, 0, 30, tzinfo=UTC).timestamp()
PLAN = Plan("p", requests_per_day=100, tokens_per_day=10_000, requests_per_minute=2)
BATCH = new_batch_id(NOON)


def line(i: int, offset: int, estimated: int = 10, batch: str = BATCH, day: str | None = None) -> Logged:
    return Logged(
        "u", batch_line_id(batch, i), NOON, estimated, day or utc_day(NOON), offset, batch_id=batch, batch_line=i
    )


def quota_book() -> tuple[QuotaBook, dict[str, QuotaState]]:
    table: dict[str, QuotaState] = {}
    return QuotaBook(table, now=lambda: NOON), table


def confirm_lines(qb: QuotaBook, lines: list[Logged]) -> set[str]:
    copies: set[str] = set()

    async def go() -> None:
        await asyncio.gather(*await qb.confirm_requests(lines, copies))

    asyncio.run(go())
    return copies


def test_a_batch_is_charged_whole_with_no_per_minute_limit() -> None:
    state, admission = decide_batch(None, PLAN, BATCH, 50, 5_000, NOON)
    assert (state["requests_used"], state["tokens_reserved"]) == (50, 5_000)
    assert state["batches"] == {BATCH: [0, 50, [], 5_000]}
    assert admission.requests_remaining == 50 and admission.tokens_remaining == 5_000
    # the per-minute rate (2 here) did not apply to the batch, and still applies to single requests
    state, _ = decide(state, PLAN, "r1", 1, NOON)
    state, _ = decide(state, PLAN, "r2", 1, NOON)
    with pytest.raises(QuotaExceeded):
        decide(state, PLAN, "r3", 1, NOON)


@pytest.mark.parametrize(
    ("lines", "tokens", "kind", "requests_missing", "tokens_missing"),
    [(101, 100, "request_quota_exceeded", 1, 0), (10, 10_001, "token_quota_exceeded", 0, 1)],
)
def test_a_batch_over_the_quota_is_refused_saying_what_is_missing(
    lines: int, tokens: int, kind: str, requests_missing: int, tokens_missing: int
) -> None:
    with pytest.raises(QuotaExceeded) as refused:
        decide_batch(None, PLAN, BATCH, lines, tokens, NOON)
    assert refused.value.type == kind
    assert refused.value.details["requests"]["missing"] == requests_missing
    assert refused.value.details["tokens"]["missing"] == tokens_missing
    assert refused.value.retry_after is not None and refused.value.retry_after > 0


def test_release_undoes_a_batch_only_before_any_line_is_confirmed() -> None:
    state, _ = decide_batch(None, PLAN, BATCH, 3, 30, NOON)
    undone = release_batch(state, BATCH, 3, 30, NOON)
    assert undone is not None
    assert (undone["requests_used"], undone["tokens_reserved"], undone["batches"]) == (0, 0, {})
    found = confirm(state, [line(0, 1)], NOON)
    assert found is not None
    assert release_batch(found.state, BATCH, 3, 30, NOON) is None


def test_lines_are_confirmed_in_order_each_once_and_copies_are_reported() -> None:
    qb, table = quota_book()
    qb.admit_batch("u", PLAN, BATCH, 4, 40)
    assert confirm_lines(qb, [line(0, 0), line(1, 1)]) == set()
    assert qb.reservations.get("u", batch_line_id(BATCH, 1)) == (10, utc_day(NOON))
    # the writer crashed after lines 0-1 were acked and wrote them again, then the rest
    copies = confirm_lines(qb, [line(0, 2), line(1, 3), line(2, 4), line(3, 5)])
    assert copies == {batch_line_id(BATCH, 0), batch_line_id(BATCH, 1)}
    st = current(table["u"], NOON)
    assert st["batches"] == {}  # every line confirmed: the entry is gone
    assert (st["requests_used"], st["tokens_reserved"]) == (4, 40)  # charged once, at creation
    # a copy arriving after the last line was confirmed is still a copy
    assert confirm_lines(qb, [line(3, 6)]) == {batch_line_id(BATCH, 3)}


def test_a_replay_of_the_same_offsets_is_not_a_copy() -> None:
    """The forward agent re-reads a batch it confirmed before a crash: it must publish it again."""
    qb, _ = quota_book()
    qb.admit_batch("u", PLAN, BATCH, 2, 20)
    confirm_lines(qb, [line(0, 7), line(1, 8)])
    assert confirm_lines(qb, [line(0, 7), line(1, 8)]) == set()


def test_a_line_after_later_ones_fills_its_gap() -> None:
    """A step failed in its middle and was written again: lines 1-2 arrive after line 3."""
    qb, table = quota_book()
    qb.admit_batch("u", PLAN, BATCH, 5, 50)
    assert confirm_lines(qb, [line(0, 0), line(3, 1)]) == set()
    assert current(table["u"], NOON)["batches"][BATCH] == [4, 5, [[1, 3]], 50]
    assert confirm_lines(qb, [line(0, 2), line(1, 3), line(2, 4), line(3, 5), line(4, 6)]) == {
        batch_line_id(BATCH, 0),
        batch_line_id(BATCH, 3),
    }
    assert current(table["u"], NOON)["batches"] == {}
    held = [qb.reservations.get("u", batch_line_id(BATCH, i)) for i in range(5)]
    assert all(h is not None for h in held)


def test_confirm_line_edges() -> None:
    assert _confirm_line(None, 0) is None
    assert _confirm_line([0, 2, [], 20], 5) is None  # not a line of the batch
    assert _confirm_line([0, 1, [], 10], 0) == []  # the last line: done
    assert _confirm_line([2, 6, [[0, 1]], 60], 0) == [2, 6, [], 60]  # the gap closed
    assert _confirm_line([0, 2], 0) == [1, 2, []]  # an entry without its estimate keeps none


def test_lines_of_an_earlier_day_are_neither_held_nor_copies() -> None:
    qb, _ = quota_book()
    qb.admit_batch("u", PLAN, BATCH, 1, 10)
    assert confirm_lines(qb, [line(0, 0, day="2025-03-13")]) == set()
    assert qb.reservations.get("u", batch_line_id(BATCH, 0)) is None


def test_each_line_settles_its_own_reservation() -> None:
    qb, table = quota_book()
    qb.admit_batch("u", PLAN, BATCH, 3, 30)
    confirm_lines(qb, [line(i, i) for i in range(3)])
    settled = asyncio.run(
        qb.settle_results(
            [
                ("u", batch_line_id(BATCH, 0), "completed", 7, 0),
                ("u", batch_line_id(BATCH, 1), "cancelled", 0, 1),
                ("u", batch_line_id(BATCH, 1), "completed", 9, 2),  # a second terminal result: nothing
            ]
        )
    )
    assert len(settled) == 2
    st = current(table["u"], NOON)
    assert (st["requests_used"], st["tokens_used"], st["tokens_reserved"]) == (3, 7, 10)
