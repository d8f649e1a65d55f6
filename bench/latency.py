"""End-to-end latency of one request at a time: POST -> terminal SSE event, simulated model at zero latency.

Starts its own Tansu broker, model server (generate only) and one worker in a
fresh namespace, then submits requests one after another and measures, per
request, the time from sending the POST to receiving the terminal SSE event
(the client holds the event stream open from the 202 on). Prints p50/p90/p99
and the per-stage breakdown from the stored timestamps.

    .venv/bin/python -m bench.latency [--requests 50] [--worker-env NAME=VALUE ...]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from datetime import datetime

import aiohttp

from bench.measure import worker_settings
from devtools.localbroker import LocalBroker
from tests.support.modelserver import running_modelserver
from tests.support.pipeline import Api, Pipeline


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def one(http: aiohttp.ClientSession, api: Api, task: str) -> float:
    body = {"task": task, "input": "latency probe", **({"params": {"max_tokens": 8}} if task == "generate" else {})}
    started = time.perf_counter()
    status, accepted, _ = await api.submit(body)
    assert status == 202, accepted
    async with http.get(
        f"{api.base_url}/v1/requests/{accepted['request_id']}/events", headers=api.headers()
    ) as r:
        async for raw in r.content:
            if raw.startswith(b"event: ") and raw.strip().split(b": ")[1] in (b"completed", b"failed"):
                break
    return time.perf_counter() - started


async def main(n: int, extra: dict[str, str]) -> None:
    with LocalBroker() as broker:
        async with running_modelserver() as model_url:
            pipeline = await Pipeline.create(broker.url, model_url + "/v1")
            try:
                worker = await pipeline.start_worker(**extra)
                await pipeline.set_plan("bench", requests_per_day=10**6, tokens_per_day=10**9)
                async with aiohttp.ClientSession() as http:
                    api = await Api(http, worker.url, await pipeline.create_key("bench", "bench")).wait_key_active()
                    for task in ("generate", "embed"):
                        for _ in range(5):  # warm-up: connections, JIT-free but caches and batchers
                            await one(http, api, task)
                        samples = [await one(http, api, task) for _ in range(n)]
                        print(
                            f"{task:9s} n={n} POST->terminal SSE event: p50 {statistics.median(samples) * 1000:.1f} ms"
                            f"  p90 {pct(samples, 0.9) * 1000:.1f} ms  p99 {pct(samples, 0.99) * 1000:.1f} ms"
                        )
                pool = await pipeline.store.connect()
                rows = await pool.fetch(
                    "SELECT created_at, dispatched_at, started_at, completed_at FROM requests"
                    " WHERE status = 'completed' ORDER BY request_id DESC LIMIT $1",
                    n,
                )

                def gap(a: datetime, b: datetime) -> float:
                    return (b - a).total_seconds() * 1000

                for name, (x, y) in {
                    "admitted -> dispatched (log, forward agent, RabbitMQ confirm)": ("created_at", "dispatched_at"),
                    "dispatched -> running (RabbitMQ -> ML worker)": ("dispatched_at", "started_at"),
                    "running -> completed (model call, result publish)": ("started_at", "completed_at"),
                }.items():
                    gaps = [gap(r[x], r[y]) for r in rows if r[x] and r[y]]
                    if gaps:
                        print(f"  {name}: median {statistics.median(gaps):.1f} ms")
            finally:
                await pipeline.cleanup()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument(
        "--worker-env", action="append", default=[], metavar="NAME=VALUE",
        help="extra INFERSTREAM_* setting of the worker, without the prefix (e.g. FETCH_MAX_WAIT_MS=5)",
    )  # fmt: skip
    args = parser.parse_args()
    asyncio.run(main(args.requests, worker_settings(args.worker_env)))
