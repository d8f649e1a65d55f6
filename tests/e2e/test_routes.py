"""Routes as configuration, end to end: the README's example file (``deploy/routes.yaml``) on two model servers.

Server A (started here, generation only) and server B (the session's server, with real
embeddings) play the backends the example names: ``gpu-a`` and ``primary`` are A,
``gpu-b``, ``overflow`` and ``tei`` are B. One worker with every role serves the file.
In one run of that stack: ``GET /v1/models``; the weighted split of ``sim-gpt``
(3:1) over 400 calls; the failover of ``sim-gpt-large`` to its fallback while A is
down and back once A returns, with nothing failed; a reload under load that adds a
route and removes one, with nothing lost; a broken file refused with its line; a
SIGHUP reload; and a worker refusing to start on a broken file. The split and the
failover timeline are printed and written to ``$INFERSTREAM_TEST_LOG_DIR/routes-report.txt``.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bridges.clients.rabbitmq import RabbitClient
from tests.support.modelserver import free_port, start_modelserver, stop_modelserver, wait_healthy
from tests.support.pipeline import LOG_DIR, ROOT, Api, Pipeline, WorkerProcess
from tests.support.wait import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="session")]

EXAMPLE = ROOT / "deploy" / "routes.yaml"
OVERFLOW_KEY = "test-overflow-key"
TERMINAL = {"completed", "failed", "cancelled", "expired"}
REPORT = LOG_DIR / "routes-report.txt"


def report(line: str) -> None:
    print(line)
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    with REPORT.open("a") as out:
        out.write(line + "\n")


class ServerA:
    """The model server the example calls gpu-a / primary: killed and restarted on the same port."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    async def start(self) -> None:
        self.proc = start_modelserver(self.port, "--no-embeddings")
        await wait_healthy(self.url, time.monotonic() + 60, self.proc)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None:
            stop_modelserver(self.proc)


@pytest.fixture(scope="module")
async def server_a() -> AsyncIterator[ServerA]:
    a = ServerA()
    await a.start()
    try:
        yield a
    finally:
        a.stop()


@pytest.fixture(scope="module")
def routes_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the README's example, which the reload test rewrites."""
    path = tmp_path_factory.mktemp("routes") / "routes.yaml"
    path.write_text(EXAMPLE.read_text())
    return path


@pytest.fixture(scope="module")
async def pipeline(
    broker_url: str, model_base_url: str, server_a: ServerA, routes_file: Path
) -> AsyncIterator[Pipeline]:
    async with Pipeline.session(
        broker_url, model_base_url + "/v1", routes_file=str(routes_file), routes_poll_s="0.2",
        ml_breaker_reset_s="1", ml_retry_max_s="0.5",
    ) as p:  # fmt: skip
        p.env.update(
            GPU_A_URL=f"{server_a.url}/v1",
            GPU_B_URL=f"{model_base_url}/v1",
            EMBED_URL=f"{model_base_url}/v1",
            OVERFLOW_URL=f"{model_base_url}/v1",
            OVERFLOW_API_KEY=OVERFLOW_KEY,
        )
        p.extra_routes |= {
            ("embed", "all-MiniLM-L6-v2"), ("generate", "sim-gpt"), ("generate", "sim-gpt-large"),
            ("generate", "sim-gpt-small"),
        }  # fmt: skip
        await p.set_plan("routes", requests_per_day=100_000, tokens_per_day=10**9)
        yield p


@pytest.fixture(scope="module")
async def worker(pipeline: Pipeline) -> WorkerProcess:
    return await pipeline.start_worker()


@pytest.fixture
async def api(http: aiohttp.ClientSession, pipeline: Pipeline, worker: WorkerProcess) -> Api:
    key = await pipeline.create_key(f"u{uuid.uuid4().hex[:8]}", "routes")
    return await Api(http, worker.url, key).wait_key_active()


async def readyz(http: aiohttp.ClientSession, worker: WorkerProcess) -> dict[str, Any]:
    async with http.get(worker.url + "/readyz") as r:
        body: dict[str, Any] = await r.json()
        return body


async def submit(api: Api, model: str, prompt: str = "hello") -> tuple[int, Any]:
    status, body, _ = await api.submit(
        {"task": "generate", "model": model, "input": prompt, "params": {"max_tokens": 4}}
    )
    return status, body


async def finished(api: Api, ids: list[str], timeout: float = 90.0) -> list[dict[str, Any]]:
    """Every request's terminal document (polled through GET, as a client would)."""
    docs: dict[str, dict[str, Any]] = {}

    async def all_done() -> bool:
        pending = [i for i in ids if i not in docs]
        for chunk in range(0, len(pending), 50):
            answers = await asyncio.gather(*(api.get(i) for i in pending[chunk : chunk + 50]))
            for rid, (status, body, _) in zip(pending[chunk : chunk + 50], answers, strict=True):
                if status == 200 and body["status"] in TERMINAL:
                    docs[rid] = body
        return len(docs) == len(ids)

    await wait_for(all_done, timeout=timeout, interval=0.2, what=f"{len(ids)} requests terminal")
    return [docs[i] for i in ids]


def at(doc: dict[str, Any], field: str) -> float:
    return datetime.fromisoformat(doc[field].replace("Z", "+00:00")).timestamp()


async def model_calls(http: aiohttp.ClientSession, worker: WorkerProcess, model: str) -> Counter[str]:
    """``inferstream_model_calls_total{outcome="ok"}`` of one route, by backend."""
    async with http.get(worker.url + "/metrics") as r:
        text = await r.text()
    calls: Counter[str] = Counter()
    for family in text_string_to_metric_families(text):
        if family.name == "inferstream_model_calls":
            for s in family.samples:
                if s.name.endswith("_total") and s.labels["model"] == model and s.labels["outcome"] == "ok":
                    calls[s.labels["backend"]] += int(s.value)
    return calls


# ---- the tests, in the order of the module's one stack ----------------------


async def test_models_lists_the_files_routes(api: Api, http: aiohttp.ClientSession, worker: WorkerProcess) -> None:
    status, body, _ = await api.call("GET", "/v1/models")
    assert status == 200 and body["object"] == "list"
    listed = {(m["task"], m["id"]): m for m in body["data"]}
    assert set(listed) == {("embed", "all-MiniLM-L6-v2"), ("generate", "sim-gpt"), ("generate", "sim-gpt-large")}
    assert listed[("generate", "sim-gpt")]["default"] and not listed[("generate", "sim-gpt-large")]["default"]
    assert listed[("generate", "sim-gpt-large")]["max_priority"] == "normal"
    assert all(m["object"] == "model" and "url" not in m for m in body["data"])
    async with http.get(worker.url + "/v1/models") as r:
        assert r.status == 401  # like every /v1 route
    # The embed route's own backend serves it; the high priority asked for is capped by the route.
    status, accepted, _ = await api.submit({"task": "embed", "input": ["a sentence"]})
    assert status == 202, accepted
    status, large = await submit(api, "sim-gpt-large")
    assert status == 202, large
    embed_doc, large_doc = await finished(api, [accepted["request_id"], large["request_id"]])
    assert embed_doc["status"] == "completed" and embed_doc["backend"] == "tei"
    assert embed_doc["model"] == "all-MiniLM-L6-v2" and len(embed_doc["result"]["embeddings"][0]) == 384
    assert large_doc["backend"] == "primary"
    status, capped, _ = await api.submit(
        {"task": "generate", "model": "sim-gpt-large", "input": "x", "priority": "high"}
    )
    assert status == 202
    (doc,) = await finished(api, [capped["request_id"]])
    assert doc["priority"] == "normal"


async def test_weighted_split_of_two_backends(api: Api, http: aiohttp.ClientSession, worker: WorkerProcess) -> None:
    before = await model_calls(http, worker, "sim-gpt")
    sem = asyncio.Semaphore(32)

    async def one(i: int) -> str:
        async with sem:
            status, body = await submit(api, "sim-gpt", f"prompt {i}")
            assert status == 202, body
            return str(body["request_id"])

    ids = await asyncio.gather(*(one(i) for i in range(400)))
    docs = await finished(api, list(ids))
    assert {d["status"] for d in docs} == {"completed"}
    served = Counter(d["backend"] for d in docs)
    share = served["gpu-a"] / len(docs)
    calls = await model_calls(http, worker, "sim-gpt") - before
    report(
        f"weighted split, sim-gpt gpu-a:gpu-b = 3:1, 400 calls: served {dict(served)}, "
        f"gpu-a share {share:.3f} (expected 0.750); model calls by backend {dict(calls)}"
    )
    assert set(served) == {"gpu-a", "gpu-b"}
    assert abs(share - 0.75) <= 0.075, served  # within 10% of the configured share
    assert calls == served  # the metric label agrees with the rows


async def test_fallback_takes_over_while_the_primary_is_down_and_hands_back(
    api: Api, server_a: ServerA
) -> None:
    ids: list[str] = []
    marks: dict[str, float] = {}
    stop = asyncio.Event()

    async def load() -> None:  # a steady 25 requests/s
        while not stop.is_set():
            status, body = await submit(api, "sim-gpt-large")
            assert status == 202, body
            ids.append(body["request_id"])
            await asyncio.sleep(0.04)

    loader = asyncio.create_task(load())
    try:
        await wait_for(lambda: len(ids) >= 50, timeout=30, what="load before the outage")
        marks["down"] = time.time()
        server_a.kill()
        await wait_for(lambda: time.time() - marks["down"] >= 4, timeout=10, what="4 s of outage")
        await server_a.start()
        marks["up"] = time.time()
        await wait_for(lambda: time.time() - marks["up"] >= 5, timeout=10, what="5 s after the primary returned")
    finally:
        stop.set()
        await loader
    docs = await finished(api, ids, timeout=120)
    statuses = Counter(d["status"] for d in docs)
    report(f"failover, sim-gpt-large primary -> overflow: {len(docs)} requests, statuses {dict(statuses)}")
    report("  t(s) from the kill, by completion time | primary | overflow")
    start = min(at(d, "completed_at") for d in docs)
    buckets: dict[int, Counter[str]] = {}
    for d in docs:
        buckets.setdefault(int(at(d, "completed_at") - marks["down"] + 100) - 100, Counter())[d["backend"]] += 1
    for second in sorted(buckets):
        report(f"  {second:+4d} | {buckets[second]['primary']:4d} | {buckets[second]['overflow']:4d}")
    over = sorted(at(d, "completed_at") for d in docs if d["backend"] == "overflow")
    back = [at(d, "completed_at") for d in docs if d["backend"] == "primary" and at(d, "completed_at") > marks["up"]]
    report(
        f"  primary down at +0.0 s, back at +{marks['up'] - marks['down']:.1f} s; first overflow result "
        f"+{over[0] - marks['down']:.2f} s, last +{over[-1] - marks['down']:.2f} s; first primary result after "
        f"its return +{min(back) - marks['down']:.2f} s (the load started {marks['down'] - start:.1f} s before the kill)"
    )
    assert statuses == {"completed": len(docs)}  # nothing failed
    before_kill = [d for d in docs if at(d, "completed_at") < marks["down"]]
    assert before_kill and {d["backend"] for d in before_kill} == {"primary"}
    assert len(over) >= 20, "the fallback served the outage"
    assert back, "the primary took its calls back"
    tail = sorted(docs, key=lambda d: at(d, "completed_at"))[-20:]
    assert {d["backend"] for d in tail} == {"primary"}, "once back, the primary serves every call"


V2_SMALL_ROUTE = """
  - task: generate
    model: sim-gpt-small
    backends:
      - name: small-b
        url: ${GPU_B_URL:-http://127.0.0.1:8001/v1}
        model: sim-gpt
"""


def without_large_route(text: str) -> str:
    """The example without its sim-gpt-large route (the last one), plus a new sim-gpt-small route."""
    head, sep, _ = text.partition("  # A larger model with a paid overflow")
    assert sep, "the example's sim-gpt-large route moved: update this test"
    return head.rstrip() + "\n" + V2_SMALL_ROUTE


def read_text(path: Path) -> str:
    return path.read_text()


def rewrite_in_place(path: Path, old: str, new: str) -> None:
    """Same inode, same size, same time stamp: only a SIGHUP can tell the worker."""
    assert len(old) == len(new)
    stamp = path.stat()
    text = path.read_text()
    assert old in text
    with path.open("r+") as f:
        f.write(text.replace(old, new))
    os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))


def replace_file(path: Path, text: str) -> None:
    """As an editor or a ConfigMap would: a new file moved into place."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


async def test_reload_under_load_adds_a_route_and_retires_one_with_nothing_lost(
    api: Api, http: aiohttp.ClientSession, worker: WorkerProcess, pipeline: Pipeline, routes_file: Path
) -> None:
    first = (await readyz(http, worker))["checks"]["routes"]
    accepted: dict[str, str] = {}  # request id -> model
    refused: list[tuple[float, str, Any]] = []
    stop = asyncio.Event()

    async def load(model: str) -> None:
        while not stop.is_set():
            status, body = await submit(api, model)
            if status == 202:
                accepted[body["request_id"]] = model
            else:
                refused.append((time.time(), model, body))
            await asyncio.sleep(0.03)

    loaders = [asyncio.create_task(load(m)) for m in ("sim-gpt", "sim-gpt-large")]
    try:
        await wait_for(lambda: len(accepted) >= 60, timeout=30, what="load before the reload")
        written = time.time()
        replace_file(routes_file, without_large_route(EXAMPLE.read_text()))

        async def reloaded() -> dict[str, Any] | None:
            routes = (await readyz(http, worker))["checks"]["routes"]
            return routes if routes["digest"] != first["digest"] else None

        routes = await wait_for(reloaded, timeout=15, what="the new routes")
        seen = time.time()
        report(f"reload under load: new routes live {seen - written:.2f} s after the file was replaced")
        assert routes["routes"] == ["embed/all-MiniLM-L6-v2", "generate/sim-gpt", "generate/sim-gpt-small"]
        assert routes["retired"] == ["generate/sim-gpt-large"] and routes["reload_error"] is None
        await wait_for(lambda: any(m == "sim-gpt-large" and t >= seen for t, m, _ in refused), timeout=10,
                       what="a refusal of the removed route under load")  # fmt: skip
        status, small = await submit(api, "sim-gpt-small")
        assert status == 202, small
        accepted[small["request_id"]] = "sim-gpt-small"
        await wait_for(lambda: sum(1 for m in accepted.values() if m == "sim-gpt") >= 150, timeout=30,
                       what="load after the reload")  # fmt: skip
    finally:
        stop.set()
        await asyncio.gather(*loaders)
    # Refused: only the removed route, only after the file changed, 400 naming it.
    assert refused and {m for _, m, _ in refused} == {"sim-gpt-large"}
    assert min(t for t, _, _ in refused) >= written
    assert all(b["error"]["type"] == "invalid_request" and "sim-gpt-large" in b["error"]["message"] for _, _, b in refused)
    docs = await finished(api, list(accepted), timeout=120)
    statuses = Counter((accepted[d["request_id"]], d["status"]) for d in docs)
    report(f"  accepted {len(accepted)}, refused {len(refused)} (all sim-gpt-large, after the change); outcomes {dict(statuses)}")
    assert {s for _, s in statuses} == {"completed"}, statuses  # every accepted request, the retired route's too
    assert {d["backend"] for d in docs if d["model"] == "sim-gpt-small"} == {"small-b"}
    status, body, _ = await api.call("GET", "/v1/models")
    assert {m["id"] for m in body["data"]} == {"all-MiniLM-L6-v2", "sim-gpt", "sim-gpt-small"}
    rabbit = RabbitClient(pipeline.settings)
    try:
        queue = rabbit.work_queue_name("generate", "sim-gpt-large")
        await wait_for(lambda: _empty(rabbit, queue), timeout=30, what="the retired route's queue drained")
    finally:
        await rabbit.close()


async def _empty(rabbit: RabbitClient, queue: str) -> bool:
    return await rabbit.message_count(queue) == 0


async def test_a_broken_file_is_refused_with_its_line_and_the_old_routes_stay(
    api: Api, http: aiohttp.ClientSession, worker: WorkerProcess, routes_file: Path
) -> None:
    good = read_text(routes_file)
    before = (await readyz(http, worker))["checks"]["routes"]
    lines = good.splitlines()
    line = next(i for i, text in enumerate(lines, 1) if "weight: 3" in text)
    lines[line - 1] = lines[line - 1].replace("weight: 3", "weight: -3")
    replace_file(routes_file, "\n".join(lines) + "\n")

    async def refused() -> dict[str, Any] | None:
        routes = (await readyz(http, worker))["checks"]["routes"]
        return routes if routes["reload_error"] else None

    routes = await wait_for(refused, timeout=15, what="the broken file refused")
    message = routes["reload_error"]["message"]
    report(f"broken file refused: {message!r}")
    assert f"{routes_file}:{line}:" in message and "weight" in message
    assert routes["digest"] == before["digest"]  # the old routes stay
    status, body = await submit(api, "sim-gpt-small")
    assert status == 202, body
    (doc,) = await finished(api, [body["request_id"]])
    assert doc["status"] == "completed"
    replace_file(routes_file, good)
    await wait_for(lambda: _error_cleared(http, worker), timeout=15, what="the good file loaded again")


async def _error_cleared(http: aiohttp.ClientSession, worker: WorkerProcess) -> bool:
    return (await readyz(http, worker))["checks"]["routes"]["reload_error"] is None


async def test_sighup_reloads(http: aiohttp.ClientSession, worker: WorkerProcess, routes_file: Path, api: Api) -> None:
    """A change the file poll cannot see (same inode, size and time stamp) is loaded on SIGHUP."""
    before = (await readyz(http, worker))["checks"]["routes"]
    rewrite_in_place(routes_file, "weight: 3", "weight: 1")  # 3:1 becomes 1:1
    assert worker.proc is not None
    worker.proc.send_signal(signal.SIGHUP)

    async def reloaded() -> dict[str, Any] | None:
        routes = (await readyz(http, worker))["checks"]["routes"]
        return routes if routes["digest"] != before["digest"] else None

    routes = await wait_for(reloaded, timeout=15, what="the SIGHUP reload")
    assert routes["reloads"] == before["reloads"] + 1 and worker.proc.poll() is None
    ids = []
    for i in range(8):
        status, body = await submit(api, "sim-gpt", f"after sighup {i}")
        assert status == 202
        ids.append(body["request_id"])
    served = Counter(d["backend"] for d in await finished(api, ids))
    assert served == {"gpu-a": 4, "gpu-b": 4}  # 1:1 now, exactly, by weighted round robin


async def test_a_worker_refuses_to_start_on_a_broken_file(pipeline: Pipeline, tmp_path: Path) -> None:
    broken = tmp_path / "routes.yaml"
    broken.write_text(EXAMPLE.read_text().replace("concurrency: 32", "concurrency: many"))
    line = next(i for i, t in enumerate(broken.read_text().splitlines(), 1) if "concurrency: many" in t)
    worker = await pipeline.start_worker(wait=False, routes_file=str(broken))
    assert worker.proc is not None
    proc = worker.proc
    await wait_for(lambda: proc.poll() is not None, timeout=60, what="the worker to exit")
    assert proc.returncode != 0
    log = worker.log_tail(200)
    assert f"{broken}:{line}:" in log and "concurrency" in log, log
