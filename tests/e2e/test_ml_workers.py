"""ML workers as their own processes beside a pipeline worker: redelivery after kill -9, cancellation,
deadlines and scaling out, checked through the HTTP API, PostgreSQL, the quota and the model server."""

from __future__ import annotations

import json
import signal
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.pipeline import Api, Pipeline, WorkerProcess
from tests.support.wait import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="session")]

SLOW_MS = 3000
TERMINAL_TIMEOUT = 60.0
TERMINAL = {"completed", "failed", "cancelled", "expired"}
# The shipped retry and breaker settings; the harness's fast test values would flatter a flaky model.
REALISTIC = {"ml_retry_base_s": "0.2", "ml_retry_max_s": "10", "ml_breaker_threshold": "5", "ml_breaker_reset_s": "5"}


class ModelAdmin:
    """The shared model server's fault knobs and counters (other modules use it too: always reset)."""

    def __init__(self, http: aiohttp.ClientSession, base_url: str) -> None:
        self.http = http
        self.base_url = base_url

    async def faults(self, **changes: Any) -> None:
        async with self.http.post(f"{self.base_url}/admin/faults", json=changes) as r:
            r.raise_for_status()

    async def reset_faults(self) -> None:
        await self.faults(latency_ms=0, error_rate=0.0, error_status=503, fail_next=0)

    async def generate_calls(self) -> int:
        async with self.http.get(f"{self.base_url}/admin/stats") as r:
            r.raise_for_status()
            return int((await r.json())["generate_calls"])


@pytest.fixture(scope="module")
async def pipeline(broker_url: str, model_base_url: str) -> AsyncIterator[Pipeline]:
    async with Pipeline.session(broker_url, model_base_url + "/v1") as p:
        yield p


@pytest.fixture(scope="module")
async def pipeline_worker(pipeline: Pipeline) -> WorkerProcess:
    """Takes every log partition and runs no ML worker: work waits in RabbitMQ until an ML worker starts."""
    return await pipeline.start_worker(roles="pipeline")


@pytest.fixture
async def admin(http: aiohttp.ClientSession, model_base_url: str) -> AsyncIterator[ModelAdmin]:
    a = ModelAdmin(http, model_base_url)
    await a.reset_faults()
    try:
        yield a
    finally:
        await a.reset_faults()


@pytest.fixture
async def ml_workers(pipeline: Pipeline) -> AsyncIterator[list[WorkerProcess]]:
    """ML workers a test starts (``ml_workers.append(await start_ml(...))``), stopped after it."""
    started: list[WorkerProcess] = []
    try:
        yield started
    finally:
        for worker in started:
            worker.stop()


@pytest.fixture
async def api(http: aiohttp.ClientSession, pipeline: Pipeline, pipeline_worker: WorkerProcess) -> Api:
    """A fresh user per test, so its quota shows only this test's work."""
    key = await pipeline.create_key(f"u{uuid.uuid4().hex[:8]}")
    return await Api(http, pipeline_worker.url, key).wait_key_active()


async def start_ml(
    pipeline: Pipeline, started: list[WorkerProcess], ml_concurrency: int = 16, **overrides: str
) -> WorkerProcess:
    worker = await pipeline.start_worker(roles="ml", ml_concurrency=str(ml_concurrency), **overrides)
    started.append(worker)
    return worker


async def submit_generate(api: Api, prompt: str, **extra: Any) -> str:
    status, body, _ = await api.submit(
        {"task": "generate", "input": prompt, "params": {"max_tokens": 8}, **extra}
    )
    assert status == 202, body
    return str(body["request_id"])


async def settled_quota(api: Api) -> dict[str, Any]:
    """The caller's quota once no tokens are reserved any more (settlement is asynchronous)."""

    async def settled() -> dict[str, Any] | None:
        status, body, _ = await api.call("GET", "/v1/quota")
        return body if status == 200 and body["tokens"]["reserved"] == 0 else None

    quota: dict[str, Any] = await wait_for(settled, timeout=TERMINAL_TIMEOUT, what="reservations settled")
    return quota


async def model_calls(http: aiohttp.ClientSession, worker: WorkerProcess, task: str = "generate") -> dict[str, float]:
    """This worker's ``inferstream_model_calls_total`` by outcome, for one task."""
    async with http.get(worker.url + "/metrics") as r:
        text = await r.text()
    calls: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name == "inferstream_model_calls":
            for sample in family.samples:
                if sample.name.endswith("_total") and sample.labels["task"] == task:
                    calls[sample.labels["outcome"]] = sample.value
    return calls


async def terminal_rows(pipeline: Pipeline, request_ids: list[str]) -> dict[str, Any]:
    pool = await pipeline.store.connect()
    rows = await pool.fetch(
        "SELECT request_id, status, usage, attempts FROM requests WHERE request_id = ANY($1::text[])",
        request_ids,
    )
    return {r["request_id"]: r for r in rows}


async def test_ml_only_worker_takes_no_log_partitions(
    pipeline: Pipeline, pipeline_worker: WorkerProcess, ml_workers: list[WorkerProcess],
    http: aiohttp.ClientSession,
) -> None:
    ml = await start_ml(pipeline, ml_workers)
    async with http.get(ml.url + "/readyz") as r:
        ready = await r.json()
    assert r.status == 200, ready
    checks = ready["checks"]
    assert checks["roles"] == ["ml"] and "tables_recovered" not in checks
    assert checks["ml"]["ready"] and checks["ml"]["consuming"], checks
    assert {e["breaker"] for e in checks["ml"]["endpoints"].values()} == {"closed"}
    log = ml.log_path.read_text(errors="replace")
    assert "Joined group" not in log and "assigned partitions" not in log, "an ML-only worker joined the group"
    # The pipeline worker was not made to rebalance: it still holds generation 0 and stays ready.
    pipeline_log = pipeline_worker.log_path.read_text(errors="replace")
    assert "(generation 0)" in pipeline_log and "(generation 1)" not in pipeline_log
    async with http.get(pipeline_worker.url + "/readyz") as r:
        assert r.status == 200 and not (await r.json())["checks"]["rebalancing"]


async def test_kill_9_mid_call_redelivers_and_completes_once(
    pipeline: Pipeline, api: Api, admin: ModelAdmin, ml_workers: list[WorkerProcess],
) -> None:
    await admin.faults(latency_ms=SLOW_MS)
    doomed = await start_ml(pipeline, ml_workers)
    calls_before = await admin.generate_calls()
    rid = await submit_generate(api, "survive a crash")
    await api.wait_status(rid, {"running"}, timeout=TERMINAL_TIMEOUT)

    async def call_in_flight() -> bool:
        return await admin.generate_calls() > calls_before

    await wait_for(call_in_flight, timeout=TERMINAL_TIMEOUT, what="the model call to start")
    doomed.kill(signal.SIGKILL)
    status, doc, _ = await api.get(rid)
    assert status == 200 and doc["status"] == "running", doc  # the dead worker never finished it

    await admin.faults(latency_ms=0)
    await start_ml(pipeline, ml_workers)
    doc = await api.wait_status(rid, {"completed", "failed", "cancelled", "expired"}, timeout=TERMINAL_TIMEOUT)
    assert doc["status"] == "completed", doc
    assert await admin.generate_calls() == calls_before + 2  # the aborted call and the redelivered one

    rows = await terminal_rows(pipeline, [rid])
    assert rows[rid]["status"] == "completed"
    quota = await settled_quota(api)
    assert quota["requests"]["used"] == 1
    assert quota["tokens"]["used"] == doc["usage"]["total_tokens"], quota  # settled once, not twice


async def test_cancel_of_a_queued_request_never_reaches_the_model(
    pipeline: Pipeline, api: Api, admin: ModelAdmin, ml_workers: list[WorkerProcess],
) -> None:
    await admin.faults(latency_ms=SLOW_MS)
    await start_ml(pipeline, ml_workers, ml_concurrency=1)
    calls_before = await admin.generate_calls()
    blocker = await submit_generate(api, "the backlog")
    await api.wait_status(blocker, {"running"}, timeout=TERMINAL_TIMEOUT)
    queued = await submit_generate(api, "never run me")

    status, body, _ = await api.call("DELETE", f"/v1/requests/{queued}")
    assert status == 202, body
    doc = await api.wait_status(queued, {"completed", "failed", "cancelled", "expired"}, timeout=TERMINAL_TIMEOUT)
    assert doc["status"] == "cancelled", doc
    assert "usage" not in doc or not doc["usage"]
    done = await api.wait_status(blocker, {"completed"}, timeout=TERMINAL_TIMEOUT)
    assert await admin.generate_calls() == calls_before + 1  # the blocker's call only

    status, body, _ = await api.call("DELETE", f"/v1/requests/{queued}")
    assert status == 409, body
    quota = await settled_quota(api)
    assert quota["tokens"]["used"] == done["usage"]["total_tokens"], quota  # the cancelled one is refunded


async def test_cancel_of_a_running_request_aborts_the_call(
    pipeline: Pipeline, api: Api, admin: ModelAdmin, ml_workers: list[WorkerProcess],
    http: aiohttp.ClientSession,
) -> None:
    await admin.faults(latency_ms=30_000)
    ml = await start_ml(pipeline, ml_workers)
    calls_before = await admin.generate_calls()
    rid = await submit_generate(api, "abort me")

    async def call_in_flight() -> bool:
        return await admin.generate_calls() > calls_before

    await wait_for(call_in_flight, timeout=TERMINAL_TIMEOUT, what="the model call to start")
    status, body, _ = await api.call("DELETE", f"/v1/requests/{rid}")
    assert status == 202, body
    # Well inside the model's 30 s: the call was aborted, not waited out.
    doc = await api.wait_status(rid, {"completed", "failed", "cancelled", "expired"}, timeout=15)
    assert doc["status"] == "cancelled", doc
    assert (await model_calls(http, ml)).get("cancelled") == 1
    quota = await settled_quota(api)
    assert quota["tokens"]["used"] == 0 and quota["requests"]["used"] == 1, quota


async def test_deadline_passed_behind_a_backlog_expires_without_a_model_call(
    pipeline: Pipeline, api: Api, admin: ModelAdmin, ml_workers: list[WorkerProcess],
) -> None:
    await admin.faults(latency_ms=SLOW_MS)
    await start_ml(pipeline, ml_workers, ml_concurrency=1)
    calls_before = await admin.generate_calls()
    blocker = await submit_generate(api, "the backlog")
    await api.wait_status(blocker, {"running"}, timeout=TERMINAL_TIMEOUT)
    late = await submit_generate(api, "too late for me", deadline_s=1)

    doc = await api.wait_status(late, {"completed", "failed", "cancelled", "expired"}, timeout=TERMINAL_TIMEOUT)
    assert doc["status"] == "expired", doc
    done = await api.wait_status(blocker, {"completed"}, timeout=TERMINAL_TIMEOUT)
    assert await admin.generate_calls() == calls_before + 1
    quota = await settled_quota(api)
    assert quota["tokens"]["used"] == done["usage"]["total_tokens"], quota


async def test_two_ml_workers_share_the_work(
    pipeline: Pipeline, api: Api, admin: ModelAdmin, ml_workers: list[WorkerProcess],
    http: aiohttp.ClientSession,
) -> None:
    await admin.faults(latency_ms=100)
    first = await start_ml(pipeline, ml_workers, ml_concurrency=4)
    second = await start_ml(pipeline, ml_workers, ml_concurrency=4)
    ids = [await submit_generate(api, f"share {i}") for i in range(24)]
    for rid in ids:
        doc = await api.wait_status(rid, {"completed", "failed", "cancelled", "expired"}, timeout=TERMINAL_TIMEOUT)
        assert doc["status"] == "completed", doc
    per_worker = [(await model_calls(http, w)).get("ok", 0) for w in (first, second)]
    assert sum(per_worker) == len(ids) and min(per_worker) > 0, per_worker


async def test_model_failing_half_its_calls_completes_every_request(
    pipeline: Pipeline, api: Api, admin: ModelAdmin, ml_workers: list[WorkerProcess],
) -> None:
    """50% 503 (with Retry-After: 1): retries within the budget, and breaker pauses, complete all 40.

    The first 5 calls fail, so the breaker (threshold 5) opens at once rather than by chance.
    """
    await admin.faults(error_rate=0.5, error_status=503, fail_next=5)
    ml = await start_ml(pipeline, ml_workers, **REALISTIC)
    started = time.monotonic()
    ids = [await submit_generate(api, f"flaky {i}") for i in range(40)]
    docs = [await api.wait_status(rid, TERMINAL, timeout=240) for rid in ids]
    elapsed = time.monotonic() - started
    statuses = Counter(d["status"] for d in docs)
    attempts = sorted(d["attempts"] for d in docs)
    print(f"50% 503, 40 requests: {dict(statuses)} in {elapsed:.1f}s; attempts {attempts}")
    assert statuses == {"completed": 40}, (statuses, [d.get("error") for d in docs if d["status"] != "completed"])
    assert max(attempts) > 1  # the model really failed calls
    breaker = [line for line in ml.log_path.read_text(errors="replace").splitlines() if "circuit breaker" in line]
    print(f"breaker transitions: {len(breaker)}")
    assert any("closed -> open" in line for line in breaker), breaker  # it paused the work ...
    assert any("half_open -> closed" in line for line in breaker), breaker  # ... and resumed it
    quota = await settled_quota(api)
    assert quota["tokens"]["used"] == sum(d["usage"]["total_tokens"] for d in docs), quota


async def test_model_failing_every_call_fails_once_the_budget_is_spent(
    pipeline: Pipeline, api: Api, admin: ModelAdmin, ml_workers: list[WorkerProcess],
) -> None:
    """100% 503: `failed` after the retry budget (10 s here), with its attempts, refunded, dead-lettered."""
    budget = 10.0
    await admin.faults(error_rate=1.0, error_status=503)
    await start_ml(pipeline, ml_workers, **REALISTIC, ml_retry_budget_s=str(budget))
    submitted = time.monotonic()
    ids = [await submit_generate(api, f"doomed {i}") for i in range(3)]
    docs = [await api.wait_status(rid, TERMINAL, timeout=budget + 60) for rid in ids]
    took = time.monotonic() - submitted
    print(f"100% 503: 3 requests failed after {took:.1f}s (budget {budget}s); attempts {[d['attempts'] for d in docs]}")
    assert {d["status"] for d in docs} == {"failed"}, docs
    assert budget <= took < budget + 15, took  # not before the budget, not long after it
    for doc in docs:
        assert doc["error"]["type"] == "model_http_503", doc
        # Stopped by the budget, not by a count; the open breaker lets only a probe through
        # every ml_breaker_reset_s, so a request may get a single attempt in 10 s.
        assert doc["error"]["reason"] == "retry_budget_spent" and doc["attempts"] >= 1, doc
        history = doc["error"]["history"]
        assert len(history) == doc["attempts"] and {h["status"] for h in history} == {503}, doc
        assert history[-1]["at"] - history[0]["at"] <= budget, history
    quota = await settled_quota(api)
    assert quota["tokens"]["used"] == 0 and quota["requests"]["used"] == 3, quota  # refunded

    pool = await pipeline.store.connect()

    async def dead_lettered() -> dict[str, Any]:
        rows = await pool.fetch("SELECT request_id, history FROM dead_letters WHERE request_id = ANY($1::text[])", ids)
        return {r["request_id"]: r for r in rows} if len(rows) == len(ids) else {}

    dead = await wait_for(dead_lettered, timeout=TERMINAL_TIMEOUT, what="dead letters recorded")
    for doc in docs:
        history = dead[doc["request_id"]]["history"]
        history = json.loads(history) if isinstance(history, str) else history
        assert len(history) == doc["attempts"], history
