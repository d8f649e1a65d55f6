"""Sampled gauges for ``/metrics``: work-queue depths (on the Faust leader) and consumer lag (every pipeline worker).

Both are read every ``INFERSTREAM_OBSERVE_INTERVAL_S`` by one :class:`Observer` service, never per request.

**Queue depth.** A passive ``queue.declare`` answers with the queue's ready
messages (not the unacked ones an ML worker holds: those are
``inferstream_ml_in_flight``). RabbitMQ keeps one backing queue per priority
inside a priority queue but reports a single count over AMQP (the per-priority
lengths are only in the management plugin's ``backing_queue_status``), so the
depth is labelled ``priority="all"``; how long each priority waits is
``inferstream_queue_wait_seconds{priority}``, observed by the ML workers. One
worker per namespace is enough for a count the broker keeps: the Faust leader
samples, the others drop their series so a former leader leaves no stale value.

**Consumer lag.** For each partition of the requests and results topics
assigned to this worker: the log end offset minus the offset Faust last
committed. Both are in memory already: aiokafka keeps the high watermark of
every fetch response (``consumer.highwater``) and Faust its committed offsets
(``Consumer._committed_offset``), so a sample costs no broker round trip. A
partition with no commit yet counts from offset 0 (Faust records a commit at 0
as none). A paused partition keeps the high watermark of its last fetch.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

import faust
from faust.exceptions import ConsumerNotStarted
from mode import Service
from prometheus_client import Gauge

from bridges.clients.rabbitmq import AMQP_ERRORS, RabbitClient
from bridges.dead_letters import DEAD_LETTERS
from inferstream.settings import Settings

__all__ = ["CONSUMER_LAG", "INTERNAL_QUEUE_DEPTH", "QUEUE_DEPTH", "Observer", "partition_lag"]

log = logging.getLogger(__name__)

QUEUE_DEPTH = Gauge(
    "inferstream_queue_depth",
    'Ready messages in a route\'s work queue, sampled by the Faust leader (RabbitMQ counts per queue: priority="all").',
    ["task", "model", "priority"],
)
INTERNAL_QUEUE_DEPTH = Gauge(
    "inferstream_internal_queue_depth",
    "Ready messages in the namespace's results and dead-letters queues, sampled by the Faust leader.",
    ["queue"],
)
CONSUMER_LAG = Gauge(
    "inferstream_consumer_lag",
    "Records past this worker's committed offset in an assigned log partition (log end offset minus committed).",
    ["topic", "partition"],
)
ALL_PRIORITIES = "all"
_SAMPLE_ERRORS: tuple[type[BaseException], ...] = (*AMQP_ERRORS, TimeoutError)


def partition_lag(highwater: int | None, committed: int | None) -> int | None:
    """Records not yet committed, or None while the high watermark is unknown (no fetch answered yet)."""
    if highwater is None:
        return None
    return max(0, highwater - (committed or 0))


class Observer(Service):
    """Samples queue depths (leader only) and consumer lag (always) every ``settings.observe_interval_s``."""

    def __init__(self, app: faust.App, settings: Settings, rabbit: RabbitClient, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.app = app
        self.settings = settings
        self.rabbit = rabbit
        self.interval_s = settings.observe_interval_s
        self.topics = frozenset({settings.requests_topic, settings.results_topic})
        self._lag_labels: set[tuple[str, str]] = set()
        self._depth_labels: set[tuple[str, str]] = set()
        self._depth_ok = True

    @Service.task
    async def _sample_loop(self) -> None:
        while not self.should_stop:
            await self.sample_once()
            await self.sleep(self.interval_s)

    async def sample_once(self) -> None:
        """One round: lag always, depths on the leader (dropped elsewhere, or while RabbitMQ does not answer)."""
        self.sample_lag()
        for task, model in self.rabbit.routes():
            # At 0 before the first one: increase() cannot see a series that starts at 1.
            DEAD_LETTERS.labels(task, model)
        if not self.app.is_leader():
            self._forget_depths()
            return
        try:
            # Bounded: a broker that hangs must not stall the next lag sample.
            await asyncio.wait_for(self.sample_depths(), timeout=max(1.0, self.interval_s))
        except _SAMPLE_ERRORS as exc:
            self._forget_depths()
            if self._depth_ok:
                log.warning("queue depths not sampled (series dropped until RabbitMQ answers): %r", exc)
            self._depth_ok = False

    # ---- consumer lag --------------------------------------------------
    def sample_lag(self) -> None:
        """Set ``inferstream_consumer_lag`` for the assigned partitions; drop the series of revoked ones."""
        self._replace(CONSUMER_LAG, self._lag_labels, self._lags())

    def _lags(self) -> dict[tuple[str, str], int]:
        lags: dict[tuple[str, str], int] = {}
        # Not ``app.consumer``: that property would build the consumer if Faust has not yet.
        consumer = getattr(self.app, "_consumer", None)
        if consumer is None:
            return lags
        committed: Mapping[Any, int | None] = getattr(consumer, "_committed_offset", {})
        try:
            assigned = consumer.assignment()
        except ConsumerNotStarted:
            return lags
        for tp in assigned:
            if tp.topic not in self.topics:
                continue  # changelogs are read for recovery, never committed: no lag to speak of
            try:
                highwater = consumer.highwater(tp)
            except (ConsumerNotStarted, AssertionError):
                continue  # revoked by a rebalance in the consumer thread since assignment() answered
            lag = partition_lag(highwater, committed.get(tp))
            if lag is not None:
                lags[(tp.topic, str(tp.partition))] = lag
        return lags

    # ---- queue depth ---------------------------------------------------
    async def sample_depths(self) -> None:
        """Set the work-queue depths of every served route, and of the results and dead-letters queues."""
        depths: dict[tuple[str, str], int] = {}
        for task, model in self.rabbit.routes():
            depths[(task, model)] = await self.rabbit.message_count(self.rabbit.work_queue_name(task, model))
        internal = {
            "results": await self.rabbit.message_count(self.rabbit.results_queue_name),
            "dead-letters": await self.rabbit.message_count(self.rabbit.dead_letter_queue_name),
        }
        self._replace(QUEUE_DEPTH, self._depth_labels, depths, extra=(ALL_PRIORITIES,))
        for queue, count in internal.items():
            INTERNAL_QUEUE_DEPTH.labels(queue).set(count)
        if not self._depth_ok:
            log.info("queue depths sampled again")
        self._depth_ok = True

    def _forget_depths(self) -> None:
        self._replace(QUEUE_DEPTH, self._depth_labels, {}, extra=(ALL_PRIORITIES,))
        for queue in ("results", "dead-letters"):
            INTERNAL_QUEUE_DEPTH.remove(queue)  # a label set never set is no error

    # ---- helpers -------------------------------------------------------
    @staticmethod
    def _replace(
        gauge: Gauge,
        current: set[tuple[str, str]],
        values: Mapping[tuple[str, str], int],
        *,
        extra: tuple[str, ...] = (),
    ) -> None:
        """Set ``values`` and remove the series set last time that are no longer there."""
        for labels in current - values.keys():
            gauge.remove(*labels, *extra)
        for labels, value in values.items():
            gauge.labels(*labels, *extra).set(value)
        current.clear()
        current.update(values.keys())
