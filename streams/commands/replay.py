"""``faust -A streams replay``: re-project a range of the log into PostgreSQL, idempotently.

A throwaway aiokafka consumer without a group (nothing is committed, no worker
is disturbed; :mod:`streams.logread`) is assigned every partition of the topic, seeks each to the
start (an offset, or the first record at or after a time), and reads up to the
log's end as of its first fetch, or up to ``--until`` (exclusive: records
before that offset or time). The end comes from the fetch's high watermark and
times are checked against record timestamps when the broker's ListOffsets
answer is wrong, as Tansu 0.6's is (a lagging latest offset after batched
produces, offset 0 for any time). Events are decoded as the live sink decodes them
and written through the same :class:`ResultSink` and ``Store.upsert_events``,
so the rank rule holds: a replay can fill gaps and move rows forward, never back.
Rows that changed are refreshed in Redis (cache and notification, best effort).
Webhooks are not sent: rows that replay makes terminal keep ``webhook_state='pending'``.
Nothing is written to the log, so a replay cannot change a quota audit.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import click
import faust
import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from faust.cli import AppCommand, option

from bridges.clients.redis import CacheUnavailable, RedisClient
from bridges.clients.store import Store
from bridges.clients.store.rows import Event
from bridges.sink import ResultSink
from inferstream.settings import Settings
from schemas.documents import request_doc
from schemas.records import InferenceRequest, ResultEvent
from streams.logread import PartitionRange, assign_all, group_less_consumer, read_ranges

log = logging.getLogger(__name__)

Position = int | datetime
"""A log position: an offset (the same in every partition) or a point in time."""
Decode = Callable[[bytes], Event]


def parse_position(value: str) -> Position:
    """``123`` is an offset; anything else must be an ISO 8601 time (UTC when it has no zone)."""
    text = value.strip()
    if text.isdigit():
        return int(text)
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise click.BadParameter(f"{value!r} is neither an offset nor an ISO 8601 time") from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def resolve_topic(settings: Settings, name: str) -> tuple[str, Decode]:
    """``requests``, ``results`` or the full name of either, with the decoder of its records."""
    if name in ("requests", settings.requests_topic):
        return settings.requests_topic, InferenceRequest.from_bytes
    if name in ("results", settings.results_topic):
        return settings.results_topic, ResultEvent.from_bytes
    raise click.BadParameter(
        f"unknown topic {name!r}: use requests, results, {settings.requests_topic} or {settings.results_topic}"
    )


@dataclass
class ReplaySummary:
    topic: str
    partitions: list[PartitionRange] = field(default_factory=list)
    read: int = 0
    undecodable: int = 0
    rows_changed: int = 0
    batches: int = 0
    elapsed_s: float = 0.0

    def lines(self) -> list[str]:
        rate = self.read / self.elapsed_s if self.elapsed_s > 0 else 0.0
        out = [
            f"replayed {self.topic}: {self.read} messages read, {self.undecodable} undecodable, "
            f"{self.rows_changed} rows changed, {self.batches} batches, "
            f"{self.elapsed_s:.2f}s ({rate:.0f} messages/s)"
        ]
        for p in self.partitions:
            span = "nothing" if p.first is None else f"offsets {p.first}..{p.last}"
            out.append(f"  partition {p.partition}: {span} ({p.read} messages)")
        return out


async def _offsets_at(
    consumer: AIOKafkaConsumer,
    tps: Sequence[TopicPartition],
    pos: Position,
    begins: dict[TopicPartition, int],
    ends: dict[TopicPartition, int],
) -> dict[TopicPartition, tuple[int, int | None]]:
    """Per partition, ``(offset, time_ms)``: where ``pos`` is, or where to start checking record times.

    A time is looked up with ListOffsets; an answer that breaks Kafka's rule (a record at or
    after the time; Tansu 0.6 answers offset 0 with timestamp -1) is not trusted: the range
    then starts at the beginning and the record times decide (``time_ms`` set).
    """
    if isinstance(pos, int):
        # Past the end would make the consumer reset to the beginning: the end is as far as it goes.
        return {tp: (min(max(pos, begins[tp]), ends[tp]), None) for tp in tps}
    target = int(pos.timestamp() * 1000)
    found = await consumer.offsets_for_times({tp: target for tp in tps})
    out: dict[TopicPartition, tuple[int, int | None]] = {}
    for tp in tps:
        hit = found.get(tp)
        if hit is None:
            out[tp] = (ends[tp], None)  # no record at or after the time
        elif hit.timestamp >= target:
            out[tp] = (hit.offset, None)
        else:
            log.info(
                "replay: the broker's offset for %s at %s is unreliable; checking record times",
                tp,
                pos,
            )
            out[tp] = (begins[tp], target)
    return out


def _plan(
    tps: Sequence[TopicPartition],
    starts: dict[TopicPartition, tuple[int, int | None]],
    until: Position | None,
    stops: dict[TopicPartition, tuple[int, int | None]],
    ends: dict[TopicPartition, int],
) -> dict[TopicPartition, PartitionRange]:
    ranges = {}
    for tp in tps:
        (first, not_before), (stop, stop_at) = starts[tp], stops[tp]
        if isinstance(until, int):
            stop = max(until, first)  # not clamped to the reported end, which may lag
        open_end = until is None or stop_at is not None  # the record times decide where it ends
        if open_end:
            stop = ends[tp]
        ranges[tp] = PartitionRange(
            tp.partition, first, max(first, stop), open_end, not_before, stop_at
        )
    return ranges


async def replay_range(
    settings: Settings,
    sink: ResultSink,
    topic: str,
    decode: Decode,
    start: Position,
    until: Position | None = None,
    *,
    batch_size: int = 1000,
    progress: Callable[[int], None] | None = None,
    on_plan: Callable[[int], None] | None = None,
) -> ReplaySummary:
    """Read ``[start, until)`` of every partition of ``topic`` through ``sink``; see the module docstring."""
    began = time.monotonic()
    summary = ReplaySummary(topic=topic)
    async with group_less_consumer(settings.bootstrap_servers, batch_size) as consumer:
        tps = await assign_all(consumer, topic)
        if not tps:
            raise click.ClickException(f"topic {topic} does not exist (or has no partitions)")
        begins = await consumer.beginning_offsets(tps)
        ends = await consumer.end_offsets(tps)
        starts = await _offsets_at(consumer, tps, start, begins, ends)
        stops: dict[TopicPartition, tuple[int, int | None]] = (
            {tp: (ends[tp], None) for tp in tps}
            if until is None
            else await _offsets_at(consumer, tps, until, begins, ends)
        )
        ranges = _plan(tps, starts, until, stops, ends)
        summary.partitions = list(ranges.values())
        if on_plan is not None:
            on_plan(sum(r.pending for r in ranges.values()))
        async for fetched in read_ranges(consumer, ranges, batch_size):
            batch: list[Event] = []
            for tp, rec in fetched.records:
                summary.read += 1
                try:
                    if rec.value is None:
                        raise ValueError("no value (a tombstone)")
                    batch.append(decode(rec.value))
                except (orjson.JSONDecodeError, TypeError, ValueError, KeyError) as exc:
                    summary.undecodable += 1
                    log.warning("replay: %s offset %d undecodable: %r", tp, rec.offset, exc)
            if progress is not None:
                progress(fetched.seen)
            await sink.write(batch)
            summary.batches += bool(batch)
    summary.rows_changed = sink.rows_changed
    summary.elapsed_s = time.monotonic() - began
    return summary


def refresher(redis: RedisClient) -> Callable[[list[dict[str, Any]]], Any]:
    """The sink's ``on_applied`` for a replay: refresh the cache and notify listeners, best effort."""

    async def refresh(rows: list[dict[str, Any]]) -> None:
        try:
            await redis.cache_and_publish([(r["user_id"], request_doc(r)) for r in rows])
        except CacheUnavailable as exc:
            log.warning("replay: %d rows stored but not refreshed in Redis: %s", len(rows), exc)

    return refresh


def register_replay(app: faust.App, settings: Settings, store: Store, redis: RedisClient) -> None:
    @app.command(
        option(
            "--topic", "topic_name", required=True, help="requests, results, or a full topic name."
        ),
        option("--from", "start", required=True, help="Offset (every partition) or ISO 8601 time."),
        option(
            "--until",
            "until",
            default=None,
            help="Stop before this offset or time (default: the end now).",
        ),
        option(
            "--batch-size",
            type=int,
            default=1000,
            show_default=True,
            help="Events per PostgreSQL write.",
        ),
    )
    async def replay(
        self: AppCommand, topic_name: str, start: str, until: str | None, batch_size: int
    ) -> None:
        """Re-project a range of the log into PostgreSQL (idempotent; no worker needed)."""
        topic, decode = resolve_topic(settings, topic_name)
        sink = ResultSink(settings, store.requests, refresher(redis))
        bar: Any = None

        def plan(total: int) -> None:
            nonlocal bar
            bar = click.progressbar(
                length=max(total, 1),
                label=f"replaying {total} messages",
                file=click.get_text_stream("stderr"),
            )
            bar.__enter__()

        try:
            summary = await replay_range(
                settings, sink, topic, decode, parse_position(start),
                None if until is None else parse_position(until),
                batch_size=max(1, batch_size), progress=lambda n: bar.update(n) if bar else None, on_plan=plan,
            )  # fmt: skip
        finally:
            if bar is not None:
                bar.__exit__(None, None, None)
            await redis.close()
            await store.close()
        for line in summary.lines():
            self.say(line)
