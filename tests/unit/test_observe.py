"""The sampled gauges (streams/observe.py) over a fake Faust consumer and a fake RabbitMQ client: which partitions
count, how lag is computed, and that series of revoked partitions, retired routes or a lost leadership go away."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, cast

import faust
from faust.types import TP

from bridges.clients.rabbitmq import RabbitClient
from inferstream.settings import Settings
from streams.observe import CONSUMER_LAG, INTERNAL_QUEUE_DEPTH, QUEUE_DEPTH, Observer, partition_lag


@dataclass
class FakeConsumer:
    assigned: set[TP] = field(default_factory=set)
    highwaters: dict[TP, int | None] = field(default_factory=dict)
    _committed_offset: dict[TP, int | None] = field(default_factory=dict)
    revoked_midway: set[TP] = field(default_factory=set)

    def assignment(self) -> set[TP]:
        return set(self.assigned)

    def highwater(self, tp: TP) -> int | None:
        # aiokafka asserts the partition is assigned; a rebalance in its thread can revoke it in between.
        assert tp not in self.revoked_midway, "Partition is not assigned"
        return self.highwaters.get(tp)


@dataclass
class FakeApp:
    _consumer: FakeConsumer | None = None
    leader: bool = True

    def is_leader(self) -> bool:
        return self.leader


class FakeRabbit:
    def __init__(self, settings: Settings, counts: dict[str, int]) -> None:
        self.real = RabbitClient(settings)
        self.counts = counts
        self.route_list: list[tuple[str, str]] = [("generate", "sim-gpt"), ("embed", "mini")]
        self.fail: BaseException | None = None

    def routes(self) -> list[tuple[str, str]]:
        return self.route_list

    def work_queue_name(self, task: str, model: str) -> str:
        return self.real.work_queue_name(task, model)

    @property
    def results_queue_name(self) -> str:
        return self.real.results_queue_name

    @property
    def dead_letter_queue_name(self) -> str:
        return self.real.dead_letter_queue_name

    async def message_count(self, name: str) -> int:
        if self.fail is not None:
            raise self.fail
        return self.counts.get(name, 0)


def observer(app: FakeApp, rabbit: FakeRabbit | None = None, namespace: str = "obs") -> tuple[Observer, Settings]:
    settings = Settings.from_env({"INFERSTREAM_NAMESPACE": namespace})
    rabbit = rabbit or FakeRabbit(settings, {})
    return Observer(cast(faust.App, app), settings, cast(RabbitClient, rabbit)), settings


def gauge(metric: Any, *labels: str) -> float | None:
    for family in metric.collect():
        for sample in family.samples:
            if tuple(sample.labels.values()) == labels:
                return float(sample.value)
    return None


def test_partition_lag() -> None:
    assert partition_lag(None, 5) is None  # no fetch answered yet: unknown, not zero
    assert partition_lag(10, 4) == 6
    assert partition_lag(10, None) == 10  # never committed (or committed at 0): counted from offset 0
    assert partition_lag(3, 7) == 0  # a high watermark older than the last commit


def test_lag_of_the_assigned_request_and_result_partitions_only() -> None:
    app = FakeApp()
    obs, settings = observer(app, namespace="lag1")
    req, res = settings.requests_topic, settings.results_topic
    changelog = TP(f"{settings.namespace}-quota-changelog", 0)
    app._consumer = FakeConsumer(
        assigned={TP(req, 0), TP(req, 1), TP(res, 2), changelog, TP(res, 3)},
        highwaters={TP(req, 0): 100, TP(req, 1): 7, TP(res, 2): None, changelog: 50, TP(res, 3): 9},
        _committed_offset={TP(req, 0): 90, TP(res, 3): 9},
    )
    obs.sample_lag()
    assert gauge(CONSUMER_LAG, req, "0") == 10
    assert gauge(CONSUMER_LAG, req, "1") == 7
    assert gauge(CONSUMER_LAG, res, "3") == 0
    assert gauge(CONSUMER_LAG, res, "2") is None  # high watermark unknown yet
    assert gauge(CONSUMER_LAG, changelog.topic, "0") is None


def test_revoked_partitions_lose_their_series() -> None:
    app = FakeApp()
    obs, settings = observer(app, namespace="lag2")
    req = settings.requests_topic
    consumer = FakeConsumer(assigned={TP(req, 0), TP(req, 1)}, highwaters={TP(req, 0): 3, TP(req, 1): 4})
    app._consumer = consumer
    obs.sample_lag()
    assert gauge(CONSUMER_LAG, req, "1") == 4
    consumer.assigned = {TP(req, 0)}
    consumer.revoked_midway = {TP(req, 0)}
    obs.sample_lag()
    assert gauge(CONSUMER_LAG, req, "0") is None
    assert gauge(CONSUMER_LAG, req, "1") is None


def test_no_consumer_yet_means_no_lag_and_no_consumer_built() -> None:
    app = FakeApp(_consumer=None)
    obs, _ = observer(app, namespace="lag3")
    obs.sample_lag()
    assert app._consumer is None


async def test_the_leader_samples_depths_and_drops_retired_routes() -> None:
    app = FakeApp(_consumer=FakeConsumer())
    settings = Settings.from_env({"INFERSTREAM_NAMESPACE": "dep1"})
    rabbit = FakeRabbit(settings, {})
    rabbit.counts = {
        rabbit.work_queue_name("generate", "sim-gpt"): 12,
        rabbit.work_queue_name("embed", "mini"): 0,
        rabbit.results_queue_name: 3,
    }
    obs, _ = observer(app, rabbit, namespace="dep1")
    await obs.sample_once()
    assert gauge(QUEUE_DEPTH, "generate", "sim-gpt", "all") == 12
    assert gauge(QUEUE_DEPTH, "embed", "mini", "all") == 0
    assert gauge(INTERNAL_QUEUE_DEPTH, "results") == 3
    rabbit.route_list = [("generate", "sim-gpt")]
    await obs.sample_once()
    assert gauge(QUEUE_DEPTH, "embed", "mini", "all") is None


async def test_a_worker_that_is_not_the_leader_or_cannot_reach_rabbitmq_reports_no_depth() -> None:
    app = FakeApp(_consumer=FakeConsumer())
    settings = Settings.from_env({"INFERSTREAM_NAMESPACE": "dep2"})
    rabbit = FakeRabbit(settings, {RabbitClient(settings).work_queue_name("generate", "sim-gpt"): 5})
    obs, _ = observer(app, rabbit, namespace="dep2")
    await obs.sample_once()
    assert gauge(QUEUE_DEPTH, "generate", "sim-gpt", "all") == 5
    app.leader = False  # a rebalance moved leadership: the new leader reports, this one must not repeat itself
    await obs.sample_once()
    assert gauge(QUEUE_DEPTH, "generate", "sim-gpt", "all") is None
    assert gauge(INTERNAL_QUEUE_DEPTH, "results") is None
    app.leader = True
    await obs.sample_once()
    assert gauge(QUEUE_DEPTH, "generate", "sim-gpt", "all") == 5
    rabbit.fail = ConnectionError("refused")
    await obs.sample_once()  # logged, not raised: the lag keeps being sampled
    assert gauge(QUEUE_DEPTH, "generate", "sim-gpt", "all") is None
