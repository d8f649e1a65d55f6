"""Replay ranges: positions parsed, planned per partition, narrowed by record times, and read to the true end."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import click
import pytest
from aiokafka import ConsumerRecord, TopicPartition
from aiokafka.structs import OffsetAndTimestamp

from inferstream.settings import Settings
from schemas.records import InferenceRequest, ResultEvent
from streams.commands.replay import _offsets_at, _plan, parse_position, resolve_topic
from streams.logread import PartitionRange, read_ranges

TOPIC = "t"
P0, P1 = TopicPartition(TOPIC, 0), TopicPartition(TOPIC, 1)
T0 = datetime(2025, 3, 14, 12, 0, tzinfo=UTC)
T0_MS = int(T0.timestamp() * 1000)


def test_a_position_is_an_offset_or_an_iso_time_in_utc() -> None:
    assert parse_position(" 123 ") == 123
    assert parse_position("2025-03-14T12:00:00Z") == T0
    assert parse_position("2025-03-14T12:00:00") == T0  # no zone: UTC
    assert parse_position("2025-03-14T13:00:00+01:00") == T0
    with pytest.raises(click.BadParameter, match="neither an offset nor an ISO 8601 time"):
        parse_position("-5")
    with pytest.raises(click.BadParameter):
        parse_position("yesterday")


def test_topics_by_short_or_full_name_with_their_decoder() -> None:
    s = Settings(namespace="ns")
    assert resolve_topic(s, "requests") == (s.requests_topic, InferenceRequest.from_bytes)
    assert resolve_topic(s, s.results_topic) == (s.results_topic, ResultEvent.from_bytes)
    with pytest.raises(click.BadParameter, match="unknown topic 'other'"):
        resolve_topic(s, "other")


class TimeIndex:
    """The ``offsets_for_times`` answers of a broker, per partition."""

    def __init__(self, answers: Mapping[TopicPartition, OffsetAndTimestamp | None]) -> None:
        self.answers = answers

    async def offsets_for_times(
        self, wanted: Mapping[TopicPartition, int]
    ) -> dict[TopicPartition, OffsetAndTimestamp | None]:
        return {tp: self.answers.get(tp) for tp in wanted}


BEGINS = {P0: 10, P1: 0}
ENDS = {P0: 50, P1: 5}


async def test_an_offset_is_the_same_in_every_partition_clamped_to_what_exists() -> None:
    starts = await _offsets_at(TimeIndex({}), [P0, P1], 20, BEGINS, ENDS)  # type: ignore[arg-type]
    assert starts == {P0: (20, None), P1: (5, None)}
    starts = await _offsets_at(TimeIndex({}), [P0, P1], 0, BEGINS, ENDS)  # type: ignore[arg-type]
    assert starts == {P0: (10, None), P1: (0, None)}


async def test_a_time_uses_the_broker_only_where_its_answer_keeps_kafkas_rule() -> None:
    index = TimeIndex(
        {
            P0: OffsetAndTimestamp(30, T0_MS + 5),  # a record at or after the time: trusted
            P1: OffsetAndTimestamp(0, -1),  # Tansu 0.6's answer for any time: record times decide
        }
    )
    starts = await _offsets_at(index, [P0, P1], T0, BEGINS, ENDS)  # type: ignore[arg-type]
    assert starts == {P0: (30, None), P1: (0, T0_MS)}
    nothing_after = await _offsets_at(TimeIndex({}), [P0], T0, BEGINS, ENDS)  # type: ignore[arg-type]
    assert nothing_after == {P0: (50, None)}


def test_a_plan_without_until_is_open_ended_at_the_reported_end() -> None:
    ranges = _plan([P0], {P0: (20, None)}, None, {P0: (50, None)}, ENDS)
    assert (ranges[P0].start, ranges[P0].stop, ranges[P0].open_end) == (20, 50, True)


def test_an_until_offset_is_kept_even_past_a_lagging_end_and_never_before_the_start() -> None:
    ranges = _plan(
        [P0, P1], {P0: (20, None), P1: (3, None)}, 80, {P0: (50, None), P1: (5, None)}, ENDS
    )
    assert (ranges[P0].stop, ranges[P0].open_end) == (80, False)
    until_before = _plan([P0], {P0: (20, None)}, 15, {P0: (15, None)}, ENDS)
    assert until_before[P0].pending == 0


def test_an_until_time_the_broker_cannot_place_is_found_by_record_times() -> None:
    ranges = _plan([P1], {P1: (0, None)}, T0, {P1: (0, T0_MS)}, ENDS)
    rng = ranges[P1]
    assert rng.open_end and rng.stop == ENDS[P1] and rng.stop_at_ms == T0_MS


def test_from_a_time_skips_earlier_records_then_takes_all() -> None:
    rng = PartitionRange(0, start=0, stop=10, not_before_ms=100)
    verdicts = [rng.admit(0, 50), rng.admit(1, 99), rng.admit(2, 100), rng.admit(3, 20)]
    assert verdicts == [False, False, True, True]  # Kafka's rule: from the first at or after, all
    assert (rng.first, rng.last, rng.read) == (2, 3, 2)


def test_until_a_time_stops_at_the_first_record_at_or_after_it() -> None:
    rng = PartitionRange(0, start=0, stop=10, open_end=True, stop_at_ms=100)
    assert rng.admit(0, 10) is True and rng.admit(1, 100) is None
    assert (rng.stop, rng.open_end, rng.end_known) == (1, False, True)
    assert rng.admit(2, 0) is None  # past the stop now


class FakeLog:
    """Enough of AIOKafkaConsumer for read_ranges: a partition's records, served a few per fetch."""

    def __init__(self, records: Mapping[TopicPartition, list[int]], per_fetch: int = 2) -> None:
        self.records = records  # offset -> timestamp_ms, by index
        self.per_fetch = per_fetch
        self.positions: dict[TopicPartition, int] = {}
        self.paused: set[TopicPartition] = set()
        self.fetches = 0

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.positions[tp] = offset

    def pause(self, tp: TopicPartition) -> None:
        self.paused.add(tp)

    def highwater(self, tp: TopicPartition) -> int | None:
        return len(self.records[tp]) if self.fetches else None

    async def position(self, tp: TopicPartition) -> int:
        return self.positions[tp]

    async def getmany(
        self, *tps: TopicPartition, **_: Any
    ) -> dict[TopicPartition, list[ConsumerRecord]]:
        self.fetches += 1
        out: dict[TopicPartition, list[ConsumerRecord]] = {}
        for tp in tps:
            start = self.positions[tp]
            times = self.records[tp][start : start + self.per_fetch]
            if times:
                out[tp] = [
                    ConsumerRecord(
                        TOPIC, tp.partition, start + i, ts, 0, None, b"v", None, 0, 1, []
                    )
                    for i, ts in enumerate(times)
                ]
                self.positions[tp] = start + len(times)
        return out


async def read_all(
    log: FakeLog, ranges: dict[TopicPartition, PartitionRange]
) -> list[tuple[int, int]]:
    got: list[tuple[int, int]] = []
    async for fetched in read_ranges(log, ranges):  # type: ignore[arg-type]
        got += [(tp.partition, rec.offset) for tp, rec in fetched.records]
    return got


async def test_reading_goes_to_the_fetch_high_watermark_past_a_lagging_list_offsets() -> None:
    log = FakeLog({P0: [0] * 7, P1: [0] * 3})
    # ListOffsets said 1 and 2: the fetches' high watermarks (7 and 3) decide.
    ranges = {
        P0: PartitionRange(0, 0, 1, open_end=True),
        P1: PartitionRange(1, 0, 2, open_end=True),
    }
    got = await read_all(log, ranges)
    assert sorted(got) == [(0, o) for o in range(7)] + [(1, o) for o in range(3)]
    assert log.paused == {P0, P1}


async def test_reading_an_empty_range_fetches_nothing_from_that_partition() -> None:
    log = FakeLog({P0: [0, 0, 0], P1: [0, 0]})
    ranges = {P0: PartitionRange(0, 1, 3), P1: PartitionRange(1, 2, 2)}
    assert await read_all(log, ranges) == [(0, 1), (0, 2)]
    assert P1 in log.paused and P1 not in log.positions


async def test_a_broker_that_stops_answering_short_of_the_end_is_an_error() -> None:
    log = FakeLog({P0: [0]})
    log.highwater = lambda tp: 5  # type: ignore[method-assign]  # says 5, serves 1
    ranges = {P0: PartitionRange(0, 0, 10)}
    with pytest.raises(click.ClickException, match="no records for 5 fetches"):
        await read_all(log, ranges)
