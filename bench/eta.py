"""ETA accuracy (issue 13, part 2): the ``queue.eta_s`` a request gets at admission against its actual start.

Starts its own Tansu broker, a model server whose generator takes
``--latency-ms`` per call, and one worker with every role and
``--concurrency`` model calls at a time (prefetch twice that), then submits
``--requests`` generate requests at a steady ``--rate`` per second, above the
worker's capacity so that a backlog builds and the ETA means something. Right
after each 202 it reads the request (GET) and keeps ``queue.eta_s``: the
prediction at admission. When every request is terminal, each one's actual
wait is ``started_at - created_at`` from PostgreSQL; the error is
``|eta_s - wait| / wait``. Prints the median and p90 absolute error, the
median against the target (25%), and how many admissions had no ETA yet (the
route's rate is measured after about a second of backlog).

    .venv/bin/python -m bench.eta [--requests 2000] [--rate 50] [--latency-ms 200] [--concurrency 8]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import aiohttp

from bench.measure import wait_terminal
from devtools.localbroker import LocalBroker, free_port
from tests.support.modelserver import start_modelserver, stop_modelserver, wait_healthy
from tests.support.pipeline import Api, Pipeline

TARGET = 0.25  # median absolute error, relative to the actual wait
USERS = 20


async def submit_steady(url: str, keys: list[str], total: int, rate: float) -> dict[str, float | None]:
    """``total`` submissions, one every ``1/rate`` s whatever the answers take; request id -> eta_s at admission."""
    predicted: dict[str, float | None] = {}
    start = time.monotonic()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256)) as http:

        async def one(i: int) -> None:
            api = Api(http, url, keys[i % len(keys)])
            body = {"task": "generate", "input": f"eta bench {i}", "params": {"max_tokens": 8}}
            status, answer, _ = await api.submit(body)
            if status != 202:
                raise SystemExit(f"submission {i} answered {status}: {answer}")
            rid = answer["request_id"]
            status, doc, _ = await api.get(rid)
            queue = doc.get("queue") if status == 200 else None
            predicted[rid] = None if queue is None else queue["eta_s"]

        tasks = []
        for i in range(total):
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)  # pacing the load, not waiting for a condition
            tasks.append(asyncio.create_task(one(i)))
        await asyncio.gather(*tasks)
    return predicted


async def actual_waits(pipeline: Pipeline, ids: list[str]) -> dict[str, float]:
    pool = await pipeline.store.connect()
    query = (
        "SELECT request_id, extract(epoch FROM started_at - created_at) AS wait"
        f' FROM "{pipeline.settings.db_schema}".requests WHERE request_id = ANY($1) AND started_at IS NOT NULL'
    )
    return {r["request_id"]: float(r["wait"]) for r in await pool.fetch(query, ids)}


async def main(args: argparse.Namespace) -> None:
    with LocalBroker() as broker:
        port = free_port()
        model = start_modelserver(port, "--no-embeddings", "--latency-ms", str(args.latency_ms))
        try:
            model_url = f"http://127.0.0.1:{port}"
            await wait_healthy(model_url, time.monotonic() + 90, model)
            async with Pipeline.session(broker.url, model_url + "/v1") as pipeline:
                await pipeline.set_plan("bench", requests_per_day=10**7, tokens_per_day=10**10)
                keys = [await pipeline.create_key(f"u{u}", "bench") for u in range(USERS)]
                worker = await pipeline.start_worker(
                    ml_concurrency=str(args.concurrency), ml_prefetch=str(2 * args.concurrency)
                )
                async with aiohttp.ClientSession() as http:
                    await asyncio.gather(*(Api(http, worker.url, k).wait_key_active(30) for k in keys))
                predicted = await submit_steady(worker.url, keys, args.requests, args.rate)
                await wait_terminal(pipeline, len(predicted), args.deadline_s)
                waits = await actual_waits(pipeline, list(predicted))
        finally:
            stop_modelserver(model)

    capacity = args.concurrency / (args.latency_ms / 1000)
    errors = [
        abs(eta - waits[rid]) / waits[rid]
        for rid, eta in predicted.items()
        if eta is not None and rid in waits and waits[rid] > 0
    ]
    no_eta = sum(1 for eta in predicted.values() if eta is None)
    print(
        f"{args.requests} generate requests at {args.rate:g}/s against about {capacity:g}/s of capacity "
        f"({args.concurrency} calls of {args.latency_ms} ms at a time); started {len(waits)}, "
        f"ETA at admission for {len(predicted) - no_eta} (none yet for {no_eta}: the rate was still unmeasured)"
    )
    if not errors:
        raise SystemExit("no request had both an ETA and a start")
    median = statistics.median(errors)
    p90 = statistics.quantiles(errors, n=10)[-1]
    walls = sorted(waits.values())
    print(f"actual wait: median {statistics.median(walls):.2f} s, max {walls[-1]:.2f} s")
    print(f"ETA absolute error: median {median:.1%}, p90 {p90:.1%} over {len(errors)} requests")
    print(f"median = {median / TARGET:.2f}x the target ({TARGET:.0%})")
    with_none = sorted(errors + [1.0] * no_eta)
    print(f"counting an admission without an ETA as 100% error: median {statistics.median(with_none):.1%}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rate", type=float, default=50.0, help="submissions per second")
    parser.add_argument("--latency-ms", type=int, default=200, help="the model's time per call")
    parser.add_argument("--concurrency", type=int, default=8, help="the worker's model calls at a time")
    parser.add_argument("--deadline-s", type=float, default=300.0, help="wait this long for every terminal status")
    asyncio.run(main(parser.parse_args()))
