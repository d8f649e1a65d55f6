"""The ML worker against real RabbitMQ and the real model server: retries, dead letters, breaker, priorities,
batching, deadlines, cancellation and graceful shutdown."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import replace
from typing import Any

import aio_pika
import aiohttp
import pytest

from bridges.clients.rabbitmq import PublishError, RabbitClient, result_bodies
from inferstream.settings import Settings
from schemas.records import InferenceRequest, ResultEvent
from tests.support.modelserver import (
    HOST,
    ROOT,
    free_port,
    running_modelserver,
    start_modelserver,
    stop_modelserver,
    wait_healthy,
)
from tests.support.wait import wait_for
from workers.worker import IsCancelled, MLWorker, no_cancellations

pytestmark = pytest.mark.integration
MODELS = "generate:sim-gpt,embed:all-MiniLM-L6-v2,embed:no-such-model"
GENERATE = ("generate", "sim-gpt")  # the key of the generate route's endpoint


def make_req(priority: str = "normal", task: str = "generate", model: str = "sim-gpt", **extra: Any) -> InferenceRequest:
    return InferenceRequest(
        request_id=uuid.uuid4().hex, user_id="u1", task=task, model=model,
        input=extra.pop("input", ["hello there"]), estimated_tokens=10, created_at=time.time(),
        quota_day="2030-01-01", priority=priority, **extra,
    )


class Admin:
    """The model server's fault knobs and counters."""

    def __init__(self, url: str) -> None:
        self.url = url

    async def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        async with aiohttp.ClientSession() as s, s.request(method, f"{self.url}{path}", json=body) as resp:
            resp.raise_for_status()
            data: dict[str, Any] = await resp.json()
            return data

    async def faults(self, **changes: Any) -> None:
        await self._call("POST", "/admin/faults", changes)

    async def stats(self) -> dict[str, Any]:
        return await self._call("GET", "/admin/stats")

    async def reset(self) -> None:
        await self.faults(error_rate=0.0, error_status=503, latency_ms=0, fail_next=0)
        await self._call("POST", "/admin/stats/reset")


class Results:
    """Drains the namespace's results queue as the worker publishes to it."""

    def __init__(self, rabbit: RabbitClient) -> None:
        self.rabbit = rabbit
        self.events: list[ResultEvent] = []

    async def _drain(self) -> None:
        while (msg := await self.rabbit.get(self.rabbit.results_queue_name)) is not None:
            self.events.extend(ResultEvent.from_bytes(body) for body in result_bodies(msg))

    def terminal(self) -> dict[str, ResultEvent]:
        return {e.request_id: e for e in self.events if e.is_terminal}

    async def wait_terminal(self, ids: Sequence[str], within: float = 20.0) -> dict[str, ResultEvent]:
        async def done() -> bool:
            await self._drain()
            return set(ids) <= set(self.terminal())

        await wait_for(done, timeout=within, what=f"{len(ids)} terminal events")
        terminals = [e.request_id for e in self.events if e.is_terminal]
        assert len(terminals) == len(set(terminals)), "exactly one terminal event per request"
        return self.terminal()


@pytest.fixture(scope="module")
async def gen_server() -> AsyncIterator[str]:
    async with running_modelserver("--no-embeddings") as url:
        yield url


@pytest.fixture
async def admin(gen_server: str) -> AsyncIterator[Admin]:
    a = Admin(gen_server)
    await a.reset()
    yield a
    await a.reset()


def make_settings(model_url: str, **overrides: Any) -> Settings:
    base = Settings(
        namespace=f"t{uuid.uuid4().hex[:8]}", model_url=model_url, models=MODELS,
        ml_retry_base_s=0.01, ml_retry_max_s=0.05, ml_max_attempts=4, ml_breaker_threshold=100,
        ml_breaker_reset_s=0.3, ml_call_timeout_s=5.0, ml_shutdown_grace_s=5.0, ml_batch_wait_ms=20,
        ml_running_after_ms=0,  # these tests follow every status, fast calls included
    )
    return replace(base, **overrides)


class Harness:
    """One namespace: a RabbitClient, a results reader, and workers started on demand."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.rabbit = RabbitClient(settings)
        self.results = Results(self.rabbit)
        self.workers: list[MLWorker] = []

    async def worker(self, is_cancelled: IsCancelled = no_cancellations, **overrides: Any) -> MLWorker:
        settings = replace(self.settings, **overrides)
        worker = MLWorker(settings, RabbitClient(settings), is_cancelled=is_cancelled)
        self.workers.append(worker)
        await worker.start()
        return worker

    async def close(self) -> None:
        for worker in self.workers:
            await worker.stop()
            await worker.rabbit.close()
        await self.rabbit.delete_namespace()
        await self.rabbit.close()


@pytest.fixture
async def harness_factory() -> AsyncIterator[Callable[..., Awaitable[Harness]]]:
    made: list[Harness] = []

    async def make(model_url: str, **overrides: Any) -> Harness:
        h = Harness(make_settings(model_url, **overrides))
        await h.rabbit.connect()
        made.append(h)
        return h

    yield make
    for h in made:
        await h.close()


async def test_burst_of_503s_and_429s_is_retried_and_completes(admin: Admin, harness_factory: Any) -> None:
    h = await harness_factory(f"{admin.url}/v1")
    await h.worker()
    done = {}
    for status in (503, 429):
        await admin.faults(fail_next=2, error_status=status)
        req = make_req(params={"max_tokens": 8})
        await h.rabbit.publish_requests([req])
        done.update(await h.results.wait_terminal([req.request_id]))
        event = done[req.request_id]
        assert event.status == "completed" and event.attempts == 3
        assert [a["status"] for a in event.history or []] == [status, status]
        assert event.result and event.result["text"]
        assert event.usage and event.usage["completion_tokens"] <= 8
    statuses = [e.status for e in h.results.events]
    assert statuses.count("running") == 2
    assert (await admin.stats())["generate_calls"] == 6


async def test_running_is_reported_only_for_work_that_outlasts_the_delay(
    admin: Admin, harness_factory: Any
) -> None:
    h = await harness_factory(f"{admin.url}/v1")
    await h.worker(ml_running_after_ms=200)
    fast = make_req(params={"max_tokens": 4})
    await h.rabbit.publish_requests([fast])
    await h.results.wait_terminal([fast.request_id])
    await admin.faults(latency_ms=600)
    slow = make_req(params={"max_tokens": 4})
    await h.rabbit.publish_requests([slow])
    await h.results.wait_terminal([slow.request_id])
    by_request = {(e.request_id, e.status) for e in h.results.events}
    assert (fast.request_id, "running") not in by_request and (fast.request_id, "completed") in by_request
    assert (slow.request_id, "running") in by_request and (slow.request_id, "completed") in by_request


async def test_always_failing_model_fails_and_dead_letters_with_history(admin: Admin, harness_factory: Any) -> None:
    h = await harness_factory(f"{admin.url}/v1", ml_max_attempts=3)
    await admin.faults(error_rate=1.0, error_status=500)
    await h.worker()
    req = make_req()
    await h.rabbit.publish_requests([req])
    event = (await h.results.wait_terminal([req.request_id]))[req.request_id]
    assert event.status == "failed" and event.attempts == 3
    assert event.error and event.error["type"] == "model_http_500"
    dead = await h.rabbit.get(h.rabbit.dead_letter_queue_name)
    assert dead is not None
    info = RabbitClient.dead_letter_info(dead)
    assert info["request"]["request_id"] == req.request_id
    assert [a["attempt"] for a in info["history"]] == [1, 2, 3]
    assert info["error"] == {k: v for k, v in event.error.items() if k != "history"}
    assert event.error["reason"] == "max_attempts" and event.error["history"] == info["history"]
    assert (await admin.stats())["generate_calls"] == 3
    assert await h.rabbit.message_count(h.rabbit.work_queue_name("generate", "sim-gpt")) == 0  # acked


async def test_always_failing_model_fails_when_the_retry_budget_is_spent(admin: Admin, harness_factory: Any) -> None:
    h = await harness_factory(f"{admin.url}/v1", ml_max_attempts=1000, ml_retry_budget_s=1.5)
    await admin.faults(error_rate=1.0, error_status=503)  # with Retry-After: 1
    await h.worker()
    req = make_req()
    started = time.monotonic()
    await h.rabbit.publish_requests([req])
    event = (await h.results.wait_terminal([req.request_id]))[req.request_id]
    took = time.monotonic() - started
    assert event.status == "failed" and event.attempts == 2, event  # at 0 s and 1 s; Retry-After 1 ends past 1.5
    assert event.error and event.error["reason"] == "retry_budget_spent" and event.error["type"] == "model_http_503"
    assert [a["status"] for a in event.error["history"]] == [503, 503]
    assert took < 5, took  # it stopped when the next retry could not start inside the budget


@pytest.mark.parametrize("status", [408, 425, 429, 502])
async def test_transient_4xx_and_5xx_are_retried(admin: Admin, harness_factory: Any, status: int) -> None:
    h = await harness_factory(f"{admin.url}/v1")
    await h.worker()
    await admin.faults(fail_next=2, error_status=status)
    req = make_req(params={"max_tokens": 4})
    await h.rabbit.publish_requests([req])
    event = (await h.results.wait_terminal([req.request_id]))[req.request_id]
    assert event.status == "completed" and event.attempts == 3, event


async def test_half_failing_model_pauses_on_the_breaker_and_completes_every_request(
    admin: Admin, harness_factory: Any, caplog: pytest.LogCaptureFixture,
) -> None:
    """50% failures open a 3-failure breaker again and again: requests wait for it, none fails."""
    h = await harness_factory(
        f"{admin.url}/v1", ml_max_attempts=50, ml_retry_budget_s=60, ml_breaker_threshold=3,
        ml_breaker_reset_s=0.2, ml_concurrency=8,
    )
    await admin.faults(fail_next=3, error_rate=0.5, error_status=500)  # the first 3 open the breaker for sure
    caplog.set_level("INFO", logger="workers.breaker")
    worker = await h.worker()
    reqs = [make_req(params={"max_tokens": 4}) for _ in range(40)]
    await h.rabbit.publish_requests(reqs)
    done = await h.results.wait_terminal([r.request_id for r in reqs], within=90)
    statuses = [e.status for e in done.values()]
    assert statuses.count("completed") == 40, [e.error for e in done.values() if e.status != "completed"]
    opened = [r for r in caplog.records if "-> open" in r.getMessage()]
    closed = [r for r in caplog.records if "half_open -> closed" in r.getMessage()]
    assert opened and closed, "the breaker opened and closed again"
    assert max(e.attempts for e in done.values()) > 1
    await wait_for(lambda: worker.endpoints[GENERATE].pool.state == "closed" and worker.health()["consuming"], timeout=20)


async def test_a_400_fails_at_once_without_retry(admin: Admin, harness_factory: Any) -> None:
    h = await harness_factory(f"{admin.url}/v1")
    await h.worker()
    req = make_req(task="embed", model="no-such-model")
    await h.rabbit.publish_requests([req])
    event = (await h.results.wait_terminal([req.request_id]))[req.request_id]
    assert event.status == "failed" and event.attempts == 1
    assert event.error and event.error["type"] == "model_http_400"
    assert await h.rabbit.get(h.rabbit.dead_letter_queue_name) is not None


async def test_undecodable_message_is_rejected_to_dead_letters(admin: Admin, harness_factory: Any) -> None:
    h = await harness_factory(f"{admin.url}/v1")
    await h.worker()
    channel = await h.rabbit.connect()
    queue = h.rabbit.work_queue_name("generate", "sim-gpt")
    await channel.default_exchange.publish(aio_pika.Message(b"not json"), routing_key=queue)

    async def dead_lettered() -> bool:
        return await h.rabbit.message_count(h.rabbit.dead_letter_queue_name) == 1

    await wait_for(dead_lettered, timeout=20)
    assert await h.rabbit.message_count(queue) == 0


async def test_model_down_opens_breaker_stops_consuming_then_recovers(harness_factory: Any) -> None:
    port = free_port()  # nothing listens here until the server starts below
    h = await harness_factory(
        f"http://{HOST}:{port}/v1", ml_max_attempts=1000, ml_breaker_threshold=3, ml_prefetch=2
    )
    worker = await h.worker()
    reqs = [make_req() for _ in range(8)]
    await h.rabbit.publish_requests(reqs)
    endpoint = worker.endpoints[GENERATE]

    await wait_for(lambda: endpoint.pool.state != "closed" and not worker.health()["endpoints"][endpoint.name]["consuming"], timeout=20)
    queue = h.rabbit.work_queue_name("generate", "sim-gpt")
    assert await h.rabbit.message_count(queue) >= 6  # held back in RabbitMQ, not bounced around
    assert worker.health()["in_flight"] <= 2
    assert not h.results.terminal()

    proc = start_modelserver(port, "--no-embeddings")
    try:
        await wait_healthy(f"http://{HOST}:{port}", time.monotonic() + 60, proc)
        done = await h.results.wait_terminal([r.request_id for r in reqs], within=30)
        assert {e.status for e in done.values()} == {"completed"}
        await wait_for(lambda: endpoint.pool.state == "closed" and worker.health()["consuming"], timeout=20)
    finally:
        stop_modelserver(proc)


async def test_priority_order_under_a_backlog(admin: Admin, harness_factory: Any) -> None:
    h = await harness_factory(f"{admin.url}/v1", ml_prefetch=1, ml_concurrency=1)
    order = ["low", "normal", "high", "low", "high", "normal", "low"]
    reqs = [make_req(p) for p in order]
    await h.rabbit.publish_requests(reqs)  # backlog before any worker runs
    await h.worker()
    await h.results.wait_terminal([r.request_id for r in reqs])
    by_id = {r.request_id: r.priority for r in reqs}
    running = [by_id[e.request_id] for e in h.results.events if e.status == "running"]
    assert running == sorted(order, key=["high", "normal", "low"].index)


async def test_expired_and_cancelled_requests_never_reach_the_model(admin: Admin, harness_factory: Any) -> None:
    h = await harness_factory(f"{admin.url}/v1")
    expired = make_req(deadline_at=time.time() - 1)
    cancelled = make_req()
    cancelled_ids = {cancelled.request_id}

    async def is_cancelled(ids: Sequence[str]) -> set[str]:
        return cancelled_ids & set(ids)

    await h.rabbit.publish_requests([expired, cancelled])
    await h.worker(is_cancelled)
    done = await h.results.wait_terminal([expired.request_id, cancelled.request_id])
    assert done[expired.request_id].status == "expired" and done[cancelled.request_id].status == "cancelled"
    assert (await admin.stats())["generate_calls"] == 0
    assert not [e for e in h.results.events if e.status == "running"]


async def test_cancel_while_running_aborts_the_call(admin: Admin, harness_factory: Any) -> None:
    h = await harness_factory(f"{admin.url}/v1")
    await admin.faults(latency_ms=10_000)
    cancelled_ids: set[str] = set()

    async def is_cancelled(ids: Sequence[str]) -> set[str]:
        return cancelled_ids & set(ids)

    await h.worker(is_cancelled)
    req = make_req()
    await h.rabbit.publish_requests([req])
    await wait_for(lambda: _called(admin), timeout=20)
    started = time.monotonic()
    cancelled_ids.add(req.request_id)
    event = (await h.results.wait_terminal([req.request_id]))[req.request_id]
    assert event.status == "cancelled" and event.attempts == 1
    assert time.monotonic() - started < 3  # aborted, not waited out


async def _called(admin: Admin) -> bool:
    return int((await admin.stats())["generate_calls"]) >= 1


async def test_shutdown_requeues_unfinished_work_and_finishes_quick_work(admin: Admin, harness_factory: Any) -> None:
    h = await harness_factory(f"{admin.url}/v1")
    await admin.faults(latency_ms=10_000)
    worker = await h.worker(ml_shutdown_grace_s=0.2)
    reqs = [make_req() for _ in range(3)]
    await h.rabbit.publish_requests(reqs)
    await wait_for(lambda: worker.health()["in_flight"] == 3, timeout=20)
    await worker.stop()
    queue = h.rabbit.work_queue_name("generate", "sim-gpt")

    async def requeued() -> bool:
        return await h.rabbit.message_count(queue) == 3

    await wait_for(requeued, timeout=20)

    await admin.faults(latency_ms=300)
    worker = await h.worker(ml_shutdown_grace_s=10)
    await wait_for(lambda: worker.health()["in_flight"] == 3, timeout=20)
    await worker.stop()  # waits for the calls in flight instead of dropping them
    done = await h.results.wait_terminal([r.request_id for r in reqs], within=5)
    assert {e.status for e in done.values()} == {"completed"}
    assert await h.rabbit.message_count(queue) == 0


@pytest.mark.timeout(120)
async def test_embeddings_batching_really_batches(harness_factory: Any) -> None:
    async with running_modelserver() as url:
        admin = Admin(url)
        h = await harness_factory(f"{url}/v1", ml_batch_size=16, ml_batch_wait_ms=50, ml_prefetch=64)
        reqs = [make_req(task="embed", model="all-MiniLM-L6-v2", input=[f"sentence number {i}"]) for i in range(40)]
        reqs.append(make_req(task="embed", model="all-MiniLM-L6-v2", input=["two texts", "in one request"]))
        await h.rabbit.publish_requests(reqs)
        await h.worker()
        done = await h.results.wait_terminal([r.request_id for r in reqs], within=60)
        stats = await admin.stats()
        assert stats["embedding_inputs"] == 42
        assert stats["embedding_calls"] <= 6, stats  # 42 texts in batches of up to 16, not 41 calls
        assert max(int(k) for k in stats["batch_sizes"]) > 1
        for r in reqs:
            event = done[r.request_id]
            assert event.status == "completed"
            vectors = (event.result or {})["embeddings"]
            assert len(vectors) == len(r.input) and all(len(v) == 384 for v in vectors)
        total = sum((done[r.request_id].usage or {}).get("prompt_tokens", 0) for r in reqs)
        assert total > 0


async def _close_broker_connections(name: str) -> int:
    """Have RabbitMQ drop this namespace's connections (as a broker restart would), not anyone else's."""
    proc = await asyncio.create_subprocess_exec(
        "rabbitmqctl", "list_connections", "pid", "client_properties", "--formatter", "json",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )
    out, _ = await proc.communicate()
    pids = [
        c["pid"] for c in json.loads(out)
        if any(p[0] == "connection_name" and p[2] == name for p in c["client_properties"])
    ]
    for pid in pids:
        closer = await asyncio.create_subprocess_exec(
            "rabbitmqctl", "close_connection", pid, "test: simulated broker restart",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )
        await closer.wait()
    return len(pids)


@pytest.mark.skipif(shutil.which("rabbitmqctl") is None, reason="needs rabbitmqctl to drop connections")
async def test_worker_survives_dropped_broker_connections(admin: Admin, harness_factory: Any) -> None:
    h = await harness_factory(f"{admin.url}/v1")
    worker = await h.worker()
    first = make_req()
    await h.rabbit.publish_requests([first])
    await h.results.wait_terminal([first.request_id])
    assert await _close_broker_connections(f"inferstream:{h.settings.namespace}") >= 2

    second = [make_req() for _ in range(5)]
    deadline = time.monotonic() + 20
    while True:  # the caller's retry loop: a publish during the outage raises PublishError
        try:
            await h.rabbit.publish_requests(second)
            break
        except PublishError:
            assert time.monotonic() < deadline, "RabbitMQ connection never came back"
            await asyncio.sleep(0.1)
    done = await h.results.wait_terminal([r.request_id for r in second], within=30)
    assert {e.status for e in done.values()} == {"completed"}
    assert worker.health()["consuming"]


# A standalone worker (``python -m workers``) whose results message is never confirmed: "before"
# it never reaches the broker, "published" it does but the confirm never comes back.
UNCONFIRMED_WORKER = """
import asyncio, sys
from bridges.clients.rabbitmq import RabbitClient
import workers.__main__

publish = RabbitClient.publish_results

async def unconfirmed(self, events):
    if sys.argv[1] == "published":
        await publish(self, events)
    print("holding", [e.request_id for e in events], flush=True)
    await asyncio.Event().wait()

RabbitClient.publish_results = unconfirmed
workers.__main__.main()
"""


def _start_unconfirmed_worker(settings: Settings, mode: str) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "INFERSTREAM_NAMESPACE": settings.namespace,
        "INFERSTREAM_MODEL_URL": settings.model_url,
        "INFERSTREAM_MODELS": settings.models,
        "INFERSTREAM_RABBITMQ_URL": settings.rabbitmq_url,
        "INFERSTREAM_ML_RUNNING_AFTER_MS": "60000",  # the held message is a terminal one
    }
    return subprocess.Popen(
        [sys.executable, "-c", UNCONFIRMED_WORKER, mode], cwd=ROOT, env=env,
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )  # fmt: skip


@pytest.mark.parametrize("mode", ["before", "published"])
async def test_a_worker_killed_before_its_results_are_confirmed_has_its_messages_redelivered(
    admin: Admin, harness_factory: Any, mode: str
) -> None:
    h = await harness_factory(f"{admin.url}/v1")
    reqs = [make_req(params={"max_tokens": 4}) for _ in range(3)]
    ids = [r.request_id for r in reqs]
    queue = h.rabbit.work_queue_name("generate", "sim-gpt")
    proc = _start_unconfirmed_worker(h.settings, mode)
    try:
        await h.rabbit.publish_requests(reqs)
        assert proc.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 60)
        assert line.startswith(b"holding"), line
        held = [i for i in ids if i.encode() in line]  # the events of the one unconfirmed message
        assert held
        # Answered by the model, results sent (or not) but unconfirmed: nothing acked, nothing ready.
        await wait_for(lambda: _stats_at_least(admin, 3), timeout=20, what="3 model calls")
        assert await h.rabbit.message_count(queue) == 0
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    async def redelivered() -> bool:
        return await h.rabbit.message_count(queue) == 3

    await wait_for(redelivered, timeout=20, what="the 3 unacked messages back in the queue")
    await h.worker()
    if mode == "before":
        done = await h.results.wait_terminal(ids)  # asserts exactly one terminal event per request
        assert {e.status for e in done.values()} == {"completed"}
    else:
        # The unconfirmed message did reach the queue: its requests have two `completed` events,
        # which the results topic's consumers take once (the sink is rank-guarded, settlement
        # idempotent by request id).
        expected = sorted((i, "completed") for i in [*ids, *held])

        async def all_terminal() -> bool:
            await h.results._drain()
            return sum(e.is_terminal for e in h.results.events) >= len(expected)

        await wait_for(all_terminal, timeout=20, what=f"{len(expected)} terminal events")
        assert sorted((e.request_id, e.status) for e in h.results.events if e.is_terminal) == expected
    assert await h.rabbit.message_count(queue) == 0
    assert (await admin.stats())["generate_calls"] == 6  # each request ran again after the kill


async def _stats_at_least(admin: Admin, calls: int) -> bool:
    return int((await admin.stats())["generate_calls"]) >= calls


RETIRING = ("generate", "sim-gpt-retiring")  # in the routes file before the reload only
ADDED = ("generate", "sim-gpt-added")  # after it only


def _write_reload_routes(path: str, a_url: str, b_url: str, *, reloaded: bool) -> None:
    """Before: generate/sim-gpt on `slow-a` (server A) and a route to retire; after: sim-gpt on `fast-b` (B), one added."""
    if reloaded:
        gen_backend, other = f"{{name: fast-b, url: '{b_url}/v1', model: sim-gpt}}", ADDED
    else:
        gen_backend, other = f"{{name: slow-a, url: '{a_url}/v1', model: sim-gpt}}", RETIRING
    text = (
        "routes:\n"
        "  - task: generate\n    model: sim-gpt\n    default: true\n"
        f"    backends:\n      - {gen_backend}\n"
        f"  - task: generate\n    model: {other[1]}\n"
        f"    backends:\n      - {{name: fast-b, url: '{b_url}/v1', model: sim-gpt}}\n"
    )
    with open(path, "w") as file:
        file.write(text)


@pytest.mark.timeout(180)
async def test_a_routes_reload_serves_new_work_on_the_new_backends_while_work_in_hand_finishes_on_the_old(
    admin: Admin, harness_factory: Any, tmp_path: os.PathLike[str]
) -> None:
    # Imported here, not at the top: this test was appended to a shared file whose imports stay as they are.
    from inferstream.route_watch import RouteWatcher

    async with running_modelserver("--no-embeddings") as b_url:
        admin_b = Admin(b_url)
        await admin.faults(latency_ms=1500)  # server A: slow-a
        routes = os.path.join(tmp_path, "routes.yaml")
        _write_reload_routes(routes, admin.url, b_url, reloaded=False)
        h = await harness_factory(f"{admin.url}/v1", routes_file=routes)
        watcher = RouteWatcher(h.settings)
        worker = MLWorker(h.settings, RabbitClient(h.settings, routes=watcher))
        # h.close() deletes the queues of the settings' MODELS (generate/sim-gpt among them), not these.
        extra_queues = [worker.rabbit.work_queue_name(*key) for key in (RETIRING, ADDED)]
        try:
            await worker.start()
            first = [make_req(params={"max_tokens": 4}) for _ in range(3)]
            await worker.rabbit.publish_requests(first)
            await wait_for(lambda: worker.health()["in_flight"] == 3, timeout=20, what="the first batch in flight")
            old = worker.endpoints[GENERATE]

            _write_reload_routes(routes, admin.url, b_url, reloaded=True)
            assert await worker.routes.reload("test") is True
            assert worker.endpoints[GENERATE] is not old
            assert watcher.route(*RETIRING) is None and RETIRING in watcher.retired
            health = worker.health()["endpoints"]
            assert health["generate/sim-gpt-retiring"]["retired"] and health["generate/sim-gpt-retiring"]["consuming"]
            assert health["generate/sim-gpt-added"]["consuming"] and not health["generate/sim-gpt-added"]["retired"]
            assert list(health["generate/sim-gpt"]["backends"]) == ["fast-b"]

            second = [make_req(params={"max_tokens": 4}) for _ in range(3)]
            added = make_req(model=ADDED[1], params={"max_tokens": 4})
            retiring = make_req(model=RETIRING[1], params={"max_tokens": 4})  # the worker's client knows retired routes
            await worker.rabbit.publish_requests([*second, added, retiring])
            later = [*second, added, retiring]
            done = await h.results.wait_terminal([r.request_id for r in [*first, *later]], within=30)

            assert {e.status for e in done.values()} == {"completed"}, [e.error for e in done.values()]
            assert [done[r.request_id].backend for r in first] == ["slow-a"] * 3
            assert [done[r.request_id].backend for r in later] == ["fast-b"] * 5
            # New work did not queue behind the slow calls in hand: it finished first.
            order = [e.request_id for e in h.results.events if e.is_terminal]
            assert max(order.index(r.request_id) for r in second) < min(order.index(r.request_id) for r in first)
            assert (await admin.stats())["generate_calls"] == 3
            assert (await admin_b.stats())["generate_calls"] == 5
            # The replaced endpoint closes once its last job is done.
            await wait_for(lambda: not worker._superseded, timeout=10, what="the old endpoint closed")
        finally:
            await worker.stop()
            await worker.rabbit.close()
            channel = await h.rabbit.connect()
            for name in extra_queues:
                await channel.queue_delete(name)


# ---- The Batch API's part in the ML worker: chat lines and batch cancellation ----------------------

CHAT = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is a queue?"}]


async def test_a_generation_with_messages_is_a_chat_completion(admin: Admin, harness_factory: Any) -> None:
    from modelserver.generator import complete_chat

    h = await harness_factory(f"{admin.url}/v1")
    await h.worker()
    await admin.faults(fail_next=1, error_status=503)  # retried as a completion is
    rendered = [f"{m['role']}: {m['content']}" for m in CHAT]
    chat = make_req(input=rendered, params={"messages": CHAT, "max_tokens": 7})
    plain = make_req(input=rendered, params={"max_tokens": 7})
    await h.rabbit.publish_requests([chat, plain])
    done = await h.results.wait_terminal([chat.request_id, plain.request_id])
    expected = complete_chat([(m["role"], m["content"]) for m in CHAT], 7)
    event = done[chat.request_id]
    assert event.status == "completed" and event.result == {"text": expected.text}, event
    assert event.usage == {
        "prompt_tokens": expected.prompt_tokens,
        "completion_tokens": expected.completion_tokens,
        "total_tokens": expected.total_tokens,
    }
    assert done[plain.request_id].status == "completed"
    # The reference server renders a chat as the input's lines, so only the usage tells the calls apart:
    # a completion counts the roles in its prompt, a chat only the contents.
    assert (done[plain.request_id].usage or {})["prompt_tokens"] > expected.prompt_tokens
    stats = await admin.stats()
    assert stats["generate_calls"] == 3 and stats["generate_failures"] == 1
    assert sum(e.attempts for e in done.values()) == 3


@pytest.fixture
async def redis_of() -> AsyncIterator[Callable[[Settings], Any]]:
    """A RedisClient on a harness's namespace; its keys are deleted afterwards."""
    import redis.asyncio as aioredis

    from bridges.clients.redis import RedisClient

    made: list[RedisClient] = []

    def make(settings: Settings) -> RedisClient:
        client = RedisClient(settings)
        made.append(client)
        return client

    yield make
    for client in made:
        await client.close()
        raw = aioredis.Redis.from_url(client.settings.redis_url)
        try:
            keys = [k async for k in raw.scan_iter(match=f"{client.prefix}*")]
            if keys:
                await raw.delete(*keys)
        finally:
            await raw.aclose()


async def test_the_lines_of_a_cancelled_batch_are_not_started_and_running_ones_stop(
    admin: Admin, harness_factory: Any, redis_of: Callable[[Settings], Any]
) -> None:
    import redis.asyncio as aioredis

    from inferstream.ids import new_batch_id

    h = await harness_factory(f"{admin.url}/v1")
    redis = redis_of(h.settings)
    cancelled_batch, live_batch, later_batch = new_batch_id(), new_batch_id(), new_batch_id()
    await redis.mark_batch_cancelled(cancelled_batch)
    raw = aioredis.Redis.from_url(h.settings.redis_url)
    try:
        ttl = await raw.ttl(redis.batch_cancel_key(cancelled_batch))
    finally:
        await raw.aclose()
    assert 86_000 < ttl <= 86_400
    assert await redis.batch_cancelled([cancelled_batch, live_batch]) == {cancelled_batch}
    alone = make_req()
    await redis.mark_cancelled(alone.request_id)
    # One MGET answers request ids and batch ids together.
    assert await redis.cancelled([alone.request_id, cancelled_batch, live_batch, "req_other"]) == {
        alone.request_id, cancelled_batch,
    }  # fmt: skip

    lines = [make_req(batch_id=cancelled_batch, batch_line=i, params={"max_tokens": 4}) for i in range(3)]
    live = make_req(batch_id=live_batch, batch_line=0, params={"max_tokens": 4})
    await h.rabbit.publish_requests([*lines, live, alone])
    worker = await h.worker(redis.cancelled)
    done = await h.results.wait_terminal([r.request_id for r in [*lines, live, alone]])
    assert [done[r.request_id].status for r in lines] == ["cancelled"] * 3
    assert all(done[r.request_id].attempts == 0 and done[r.request_id].batch_id == cancelled_batch for r in lines)
    assert done[alone.request_id].status == "cancelled"
    assert done[live.request_id].status == "completed" and done[live.request_id].batch_id == live_batch
    assert (await admin.stats())["generate_calls"] == 1
    assert not [e for e in h.results.events if e.status == "running" and e.request_id != live.request_id]

    # A line already running when its batch is cancelled is stopped like a cancelled request.
    await admin.faults(latency_ms=10_000)
    running = make_req(batch_id=later_batch, batch_line=0)
    await h.rabbit.publish_requests([running])
    await wait_for(lambda: _stats_at_least(admin, 2), timeout=20, what="the line's model call")
    started = time.monotonic()
    await redis.mark_batch_cancelled(later_batch)
    event = (await h.results.wait_terminal([running.request_id]))[running.request_id]
    assert event.status == "cancelled" and event.attempts == 1 and event.batch_id == later_batch
    assert time.monotonic() - started < 3  # aborted, not waited out
    assert worker.health()["in_flight"] == 0
