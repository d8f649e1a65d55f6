"""Every metric the Grafana dashboard or an alert rule selects exists in ``/metrics`` of a running pipeline worker
or ML worker, after a little load that includes a retried call, a failed (dead-lettered) request, a quota refusal
and an event stream; and the sampled gauges (streams/observe.py) and the SSE gauge report what is true.

A name that is missing here is a panel that shows "no data" or an alert that can never fire.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bridges.clients.rabbitmq import RabbitClient
from tests.support.pipeline import Api, Pipeline, WorkerProcess
from tests.support.promql import SYNTHETIC, referenced_metrics
from tests.support.sse import read_sse
from tests.support.wait import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="session")]

TERMINAL = {"completed", "failed", "cancelled", "expired"}


@pytest.fixture(scope="module")
async def pipeline(broker_url: str, model_base_url: str) -> AsyncIterator[Pipeline]:
    async with Pipeline.session(broker_url, model_base_url + "/v1", observe_interval_s="0.5") as p:
        yield p


@pytest.fixture(scope="module")
async def workers(pipeline: Pipeline) -> AsyncIterator[tuple[WorkerProcess, WorkerProcess]]:
    pipe = await pipeline.start_worker(roles="pipeline")
    ml = await pipeline.start_worker(roles="ml")
    yield pipe, ml


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(http: aiohttp.ClientSession, worker: WorkerProcess) -> Samples:
    """``{(sample name, labels): value}`` of a worker's ``/metrics`` (``x_bucket``, ``x_count``, ``x_total``, ...)."""
    async with http.get(worker.url + "/metrics") as r:
        assert r.status == 200
        text = await r.text()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def series(samples: Samples, name: str) -> dict[frozenset[tuple[str, str]], float]:
    return {labels: value for (n, labels), value in samples.items() if n == name}


async def sample_names(http: aiohttp.ClientSession, worker: WorkerProcess) -> set[str]:
    return {name for name, _ in await scrape(http, worker)}


async def finish(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    status, answer, _ = await api.submit(body)
    assert status == 202, answer
    return await api.wait_status(answer["request_id"], TERMINAL, timeout=60)


async def test_every_metric_a_panel_or_rule_names_is_exposed(
    http: aiohttp.ClientSession, pipeline: Pipeline, workers: tuple[WorkerProcess, WorkerProcess], faults: Any
) -> None:
    pipe, ml = workers
    api = await Api(http, pipe.url, await pipeline.create_key(f"u{uuid.uuid4().hex[:8]}")).wait_key_active()

    # A little load over both tasks.
    generate = {"task": "generate", "input": "hello", "params": {"max_tokens": 4}}
    for _ in range(3):
        assert (await finish(api, generate))["status"] == "completed"
    # An event stream is counted while it is open, and no longer once it ended.
    await faults(latency_ms=1500)
    status, slow, _ = await api.submit(generate)
    assert status == 202, slow
    opened = asyncio.Event()
    stream = asyncio.create_task(read_sse(http, pipe.url + slow["links"]["events"], api.key or "", opened=opened))
    await asyncio.wait_for(opened.wait(), 30)
    assert await pipe.metric(http, "inferstream_sse_clients") == 1
    assert (await stream).events[-1]["event"] == "completed"

    async def stream_closed() -> bool:
        return await pipe.metric(http, "inferstream_sse_clients") == 0

    await wait_for(stream_closed, timeout=10, what="the ended stream no longer counted")
    await faults(latency_ms=0)
    assert (await finish(api, {"task": "embed", "input": ["one", "two"]}))["status"] == "completed"
    # One transient failure (a retry), then one fatal one (failed and dead-lettered).
    await faults(fail_next=1, error_status=503)
    assert (await finish(api, generate))["status"] == "completed"
    await faults(fail_next=1, error_status=400)
    assert (await finish(api, generate))["status"] == "failed"
    # A quota refusal.
    await pipeline.set_plan("one-a-day", requests_per_day=1, tokens_per_day=1_000)
    limited = await Api(http, pipe.url, await pipeline.create_key(f"q{uuid.uuid4().hex[:8]}", "one-a-day")).wait_key_active()
    await limited.submit(generate)
    status, refusal, _ = await limited.submit(generate)
    assert status == 429, refusal

    wanted = {name: where for name, where in referenced_metrics().items() if name not in SYNTHETIC}
    seen: dict[str, set[str]] = {}

    async def all_exposed() -> bool:
        # Sampled gauges appear within OBSERVE_INTERVAL_S; the dead letter once the recorder has it.
        seen["pipeline"] = await sample_names(http, pipe)
        seen["ml"] = await sample_names(http, ml)
        return wanted.keys() <= seen["pipeline"] | seen["ml"]

    try:
        await wait_for(all_exposed, timeout=20, interval=0.5, what="every referenced metric in /metrics")
    except AssertionError:
        exposed = seen["pipeline"] | seen["ml"]
        missing = {name: sorted(where) for name, where in wanted.items() if name not in exposed}
        raise AssertionError(f"metrics named by the dashboard or the rules but exposed by no worker: {missing}") from None
    # The failed request's dead letter is counted under its route, the refusal under its type.
    samples = await scrape(http, pipe)
    refused = series(samples, "inferstream_admissions_total")
    assert refused[frozenset({("outcome", "request_quota_exceeded")})] >= 1
    dead = series(samples, "inferstream_dead_letters_total")
    assert dead[frozenset({("task", "generate"), ("model", default_model(pipeline, "generate"))})] >= 1


def default_model(pipeline: Pipeline, task: str) -> str:
    return pipeline.settings.model_routes[task][0]


async def test_sampled_depth_and_lag_report_what_is_there(
    http: aiohttp.ClientSession, pipeline: Pipeline, workers: tuple[WorkerProcess, WorkerProcess]
) -> None:
    """With the ML worker gone, submitted work waits in RabbitMQ: the leader's depth gauge counts it, and the
    lag gauge has a series for every partition of both topics (one pipeline worker owns them all)."""
    pipe, ml = workers
    ml.stop()
    api = await Api(http, pipe.url, await pipeline.create_key(f"d{uuid.uuid4().hex[:8]}")).wait_key_active()
    waiting = 5
    for _ in range(waiting):
        status, body, _ = await api.submit({"task": "generate", "input": "wait", "params": {"max_tokens": 4}})
        assert status == 202, body
    route = frozenset(
        {("task", "generate"), ("model", default_model(pipeline, "generate")), ("priority", "all")}
    )
    rabbit_count = 0

    async def depth_counted() -> bool:
        nonlocal rabbit_count
        rabbit_count = await pipeline_queue_count(pipeline)
        depth = series(await scrape(http, pipe), "inferstream_queue_depth").get(route)
        # At least ours: the earlier test's work the stopped ML worker handed back may wait there too.
        return rabbit_count >= waiting and depth == rabbit_count

    try:
        await wait_for(depth_counted, timeout=30, interval=0.25, what="the depth gauge to count the waiting work")
    except AssertionError as exc:
        depths = series(await scrape(http, pipe), "inferstream_queue_depth")
        raise AssertionError(f"{exc}; RabbitMQ says {rabbit_count}, the gauges {depths}") from None

    lag = series(await scrape(http, pipe), "inferstream_consumer_lag")
    partitions = pipeline.settings.partitions
    topics = {pipeline.settings.requests_topic, pipeline.settings.results_topic}
    expected = {frozenset({("topic", t), ("partition", str(p))}) for t in topics for p in range(partitions)}
    assert set(lag) == expected
    assert all(value >= 0 for value in lag.values())


async def pipeline_queue_count(pipeline: Pipeline) -> int:
    """RabbitMQ's own count of ready messages in the generate route's work queue."""
    rabbit = RabbitClient(pipeline.settings)
    try:
        return await rabbit.message_count(rabbit.work_queue_name("generate", default_model(pipeline, "generate")))
    finally:
        await rabbit.close()
