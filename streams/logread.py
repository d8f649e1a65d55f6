"""Reads every partition of a topic to its true end: the one log reader of ``replay`` and ``quota audit``.

A throwaway aiokafka consumer without a group (nothing is committed, no worker
is disturbed) is assigned every partition. Where a partition ends is taken
from the high watermark of its first fetch, not from ListOffsets: Tansu 0.6
answers the latest offset as the last batch's base offset + 1, so a reader
that stops there misses all but the first record of the last produced batch
(seen: ListOffsets 1 and 22 where the fetch said 21 and 63). Records produced
after that first fetch are not read: the result is the topic as of one moment.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import click
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

log = logging.getLogger(__name__)

# Fetches in a row that bring nothing while a partition is short of its end: the broker is unwell.
IDLE_POLLS = 5
READ_TIMEOUT_S = 300.0


@dataclass
class PartitionRange:
    """One partition's share: offsets ``[start, stop)``, narrowed by record times when the broker cannot."""

    partition: int
    start: int
    stop: int  # exclusive
    open_end: bool = False  # ``stop`` is the log's end: the first fetch's high watermark settles it
    not_before_ms: int | None = None  # skip records until the first one at or after this time
    stop_at_ms: int | None = None  # stop at the first record at or after this time
    end_known: bool = False
    first: int | None = None
    last: int | None = None
    read: int = 0

    @property
    def pending(self) -> int:
        return max(0, self.stop - self.start)

    def learn_end(self, highwater: int) -> None:
        """The fetch's high watermark, which is exact (Tansu 0.6's ListOffsets lags after batches)."""
        if not self.end_known:
            self.stop = max(self.stop, highwater) if self.open_end else min(self.stop, highwater)
            self.end_known = True

    def admit(self, offset: int, timestamp_ms: int) -> bool | None:
        """True to take the record, False to skip it, None when the range ends before it."""
        if offset >= self.stop or (self.stop_at_ms is not None and timestamp_ms >= self.stop_at_ms):
            self.stop = min(self.stop, offset)
            self.open_end, self.end_known = False, True
            return None
        if self.not_before_ms is not None:
            if timestamp_ms < self.not_before_ms:
                return False
            # Kafka's rule: from the first record at or after the time, all.
            self.not_before_ms = None
        self.first = offset if self.first is None else self.first
        self.last = offset
        self.read += 1
        return True


@dataclass
class Fetched:
    """One fetch's records that fell inside their ranges, and how many records it looked at in all."""

    records: list[tuple[TopicPartition, ConsumerRecord]] = field(default_factory=list)
    seen: int = 0


@asynccontextmanager
async def group_less_consumer(
    servers: list[str], max_records: int = 1000, fetch_max_wait_ms: int = 500
) -> AsyncIterator[AIOKafkaConsumer]:
    """A consumer of ``servers`` (``Settings.bootstrap_servers``) in no group, committing nothing."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=servers,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_poll_records=max_records,
        fetch_max_wait_ms=fetch_max_wait_ms,
    )
    await consumer.start()
    try:
        yield consumer
    finally:
        await consumer.stop()


async def assign_all(consumer: AIOKafkaConsumer, topic: str) -> list[TopicPartition]:
    """Every partition of ``topic``, assigned to ``consumer``; empty when the topic does not exist."""
    await consumer.topics()  # loads the metadata partitions_for_topic reads
    parts = consumer.partitions_for_topic(topic)
    if not parts:
        return []
    tps = [TopicPartition(topic, p) for p in sorted(parts)]
    consumer.assign(tps)
    return tps


async def read_ranges(
    consumer: AIOKafkaConsumer,
    ranges: Mapping[TopicPartition, PartitionRange],
    max_records: int = 1000,
) -> AsyncIterator[Fetched]:
    """Yields each fetch's admitted records until every partition's position reaches its (true) stop."""
    # An open-ended partition is fetched at least once, to learn where it really ends.
    active = {tp for tp, r in ranges.items() if r.pending or r.open_end}
    for tp, rng in ranges.items():
        if tp in active:
            consumer.seek(tp, rng.start)
        else:
            consumer.pause(tp)
    idle = 0
    while active:
        fetched = await consumer.getmany(*active, timeout_ms=1000, max_records=max_records)
        for tp in active:
            highwater = consumer.highwater(tp)
            if highwater is not None:
                ranges[tp].learn_end(highwater)
        out = Fetched()
        for tp, records in fetched.items():
            rng = ranges[tp]
            for rec in records:
                verdict = rng.admit(rec.offset, rec.timestamp)
                if verdict is None:
                    break
                out.seen += 1
                if verdict:
                    out.records.append((tp, rec))
        yield out
        # Done with a partition once its position reaches the stop (gaps and markers included).
        for tp in list(active):
            if ranges[tp].end_known and await consumer.position(tp) >= ranges[tp].stop:
                active.discard(tp)
                consumer.pause(tp)
        idle = 0 if fetched else idle + 1
        if idle >= IDLE_POLLS:
            raise click.ClickException(
                f"no records for {IDLE_POLLS} fetches before the end of partitions "
                f"{sorted(tp.partition for tp in active)} of {next(iter(active)).topic}; is the broker healthy?"
            )


async def read_topic(
    servers: list[str], topic: str, timeout_s: float = READ_TIMEOUT_S
) -> dict[int, list[ConsumerRecord]]:
    """Every record of every partition of ``topic``, in offset order per partition ({} when there is no topic)."""
    deadline = time.monotonic() + timeout_s
    async with group_less_consumer(servers) as consumer:
        tps = await assign_all(consumer, topic)
        if not tps:
            return {}
        begins = await consumer.beginning_offsets(tps)
        # ListOffsets is a lower bound only: the fetch's high watermark decides.
        ends = await consumer.end_offsets(tps)
        ranges = {
            tp: PartitionRange(tp.partition, begins[tp], max(begins[tp], ends[tp]), open_end=True)
            for tp in tps
        }
        out: dict[int, list[ConsumerRecord]] = {tp.partition: [] for tp in tps}
        async for fetched in read_ranges(consumer, ranges):
            for tp, rec in fetched.records:
                out[tp.partition].append(rec)
            if time.monotonic() > deadline:
                raise click.ClickException(f"reading {topic} took longer than {timeout_s:.0f} s")
        return out


async def true_ends(
    servers: list[str], listed: Mapping[TopicPartition, int], timeout_s: float = 30.0
) -> dict[TopicPartition, int]:
    """Each partition's end by a fetch's high watermark, never below ``listed`` (ListOffsets' answer).

    One fetch from the last listed offset (on Tansu the last batch's first record, so the fetch
    answers at once). When a partition's high watermark cannot be had in ``timeout_s``, its
    listed offset stands, with a warning: the caller is no worse off than before.
    """
    ends = dict(listed)
    if not listed:
        return ends
    async with group_less_consumer(servers, max_records=1, fetch_max_wait_ms=50) as consumer:
        consumer.assign(list(listed))
        for tp, offset in listed.items():
            consumer.seek(tp, max(0, offset - 1))
        waiting = set(listed)
        deadline = time.monotonic() + timeout_s
        while waiting and time.monotonic() < deadline:
            await consumer.getmany(*waiting, timeout_ms=200, max_records=1)
            for tp in list(waiting):
                highwater = consumer.highwater(tp)
                if highwater is not None:
                    ends[tp] = max(listed[tp], highwater)
                    waiting.discard(tp)
    if waiting:
        log.warning(
            "no fetch high watermark for %s in %.0f s: keeping ListOffsets' end",
            sorted(waiting),
            timeout_s,
        )
    return ends
