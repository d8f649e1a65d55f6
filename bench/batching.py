"""Embeddings per second through the whole pipeline against the model server called directly, from one run.

Starts its own Tansu broker, reference model server and one worker (every
role), in a fresh namespace on the local PostgreSQL, Redis and RabbitMQ, with
a plan whose limits never bind. Then, one after another on the same machine:

1. the model server directly, one text per call, calls one after another;
2. the model server directly, batches of ``--batch`` texts per call (again
   after step 3, and the mean of both is reported);
3. the pipeline: ``--requests`` single-text embed requests submitted over
   HTTP, ``--concurrency`` at a time, until PostgreSQL shows every one
   completed (the worker's ML role batches them into model calls);
4. the pipeline with the simulated generator at zero latency: requests/s.

    .venv/bin/python -m bench.batching [--requests 3000] [--concurrency 64] [--seconds 5]

Everything shares the machine's cores (the model, the worker, the broker,
RabbitMQ, PostgreSQL, Redis and this client): compare the ratios, not the
absolute figures. ``--worker-env NAME=VALUE`` (repeatable) passes extra
``INFERSTREAM_*`` settings to the worker, e.g. ``ML_BATCH_SIZE=64``.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from bench.direct_model import MODEL, measure, sentences
from devtools.localbroker import LocalBroker
from tests.support.modelserver import (
    HOST,
    free_port,
    start_modelserver,
    stop_modelserver,
    wait_healthy,
)
from tests.support.pipeline import Api, Pipeline, WorkerProcess, wait_for

TERMINAL_FAILURES = ("failed", "cancelled", "expired")


@dataclass
class PipelineRun:
    requests: int
    seconds: float
    model_calls: float
    texts: float

    @property
    def rate(self) -> float:
        return self.requests / self.seconds


async def submit_all(api: Api, bodies: list[dict[str, Any]], concurrency: int) -> None:
    """Submit every body, at most ``concurrency`` at a time; a 503 is retried after its Retry-After."""
    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)

    async def client() -> None:
        while not queue.empty():
            body = queue.get_nowait()
            while True:
                status, answer, headers = await api.submit(body)
                if status == 202:
                    break
                if status != 503:
                    raise RuntimeError(f"submission answered {status}: {answer}")
                await asyncio.sleep(float(headers.get("Retry-After", "1")))

    await asyncio.gather(*(client() for _ in range(concurrency)))


async def worker_counters(http: aiohttp.ClientSession, worker: WorkerProcess) -> dict[str, float]:
    """Model calls and embedded texts so far, from the worker's /metrics."""
    async with http.get(worker.url + "/metrics") as r:
        text = await r.text()
    out = {"calls": 0.0, "texts": 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "inferstream_model_calls_total" and sample.labels.get("outcome") == "ok":
                out["calls"] += sample.value
            elif sample.name == "inferstream_model_batch_texts_sum":
                out["texts"] += sample.value
    return out


async def through_pipeline(
    pipeline: Pipeline, http: aiohttp.ClientSession, worker: WorkerProcess, user: str,
    bodies: list[dict[str, Any]], concurrency: int, timeout: float,
) -> PipelineRun:
    api = await Api(http, worker.url, await pipeline.create_key(user, "bench")).wait_key_active()
    pool = await pipeline.store.connect()

    async def finished() -> bool:
        row = await pool.fetchrow(
            "SELECT count(*) FILTER (WHERE status = 'completed') AS done,"
            " count(*) FILTER (WHERE status = ANY($2::text[])) AS bad FROM requests WHERE user_id = $1",
            user, list(TERMINAL_FAILURES),
        )
        if row["bad"]:
            raise RuntimeError(f"{row['bad']} requests of {user} did not complete")
        return bool(row["done"] == len(bodies))

    before = await worker_counters(http, worker)
    started = time.perf_counter()
    await submit_all(api, bodies, concurrency)
    await wait_for(finished, timeout=timeout, interval=0.05, what=f"{len(bodies)} requests of {user} completed")
    elapsed = time.perf_counter() - started
    after = await worker_counters(http, worker)
    return PipelineRun(len(bodies), elapsed, after["calls"] - before["calls"], after["texts"] - before["texts"])


def progress(what: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {what}", flush=True)


async def run(args: argparse.Namespace) -> None:
    port = free_port()
    model_proc = start_modelserver(port, "--torch-threads", str(args.torch_threads))
    try:
        with LocalBroker() as broker:
            model_url = f"http://{HOST}:{port}"
            await wait_healthy(model_url, time.monotonic() + 120, model_proc)
            progress("model server ready")
            pipeline = await Pipeline.create(broker.url, model_url + "/v1")
            try:
                await pipeline.set_plan(
                    "bench", requests_per_day=10**9, tokens_per_day=10**12, requests_per_minute=10**9
                )
                extra = dict(item.split("=", 1) for item in args.worker_env)
                worker = await pipeline.start_worker(**{k.lower(): v for k, v in extra.items()})
                progress(f"worker ready, log {worker.log_path}")
                await measure_all(args, pipeline, worker, model_url)
            finally:
                await pipeline.cleanup()
    finally:
        stop_modelserver(model_proc)


async def measure_all(args: argparse.Namespace, pipeline: Pipeline, worker: WorkerProcess, model_url: str) -> None:
    texts = sentences(args.requests + 256)
    embed = [{"task": "embed", "model": MODEL, "input": t} for t in texts]
    generate = [{"task": "generate", "input": t, "params": {"max_tokens": 16}} for t in texts[: args.requests]]
    timeout = max(120.0, args.requests / 20)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=args.concurrency + 8)) as http:
        # Warm-up: the first calls of each path pay for lazy connections and imports.
        await measure(http, model_url, args.batch, 1.0)
        await through_pipeline(pipeline, http, worker, "bench-warm", embed[-256:], args.concurrency, timeout)
        progress("warmed up")

        single = await measure(http, model_url, 1, args.seconds)
        progress(f"direct unbatched: {single:.1f}/s")
        batched = await measure(http, model_url, args.batch, args.seconds)
        progress(f"direct batched: {batched:.1f}/s")
        emb = await through_pipeline(
            pipeline, http, worker, "bench-embed", embed[: args.requests], args.concurrency, timeout
        )
        progress(f"pipeline embeddings: {emb.rate:.1f}/s")
        # Measured again after the pipeline: the mean evens out drift in what else runs on the machine.
        batched_after = await measure(http, model_url, args.batch, args.seconds)
        progress(f"direct batched again: {batched_after:.1f}/s")
        batched = (batched + batched_after) / 2
        gen = await through_pipeline(pipeline, http, worker, "bench-generate", generate, args.concurrency, timeout)

    print(f"direct, one text per call     : {single:8.1f} embeddings/s")
    print(f"direct, batches of {args.batch:<3}        : {batched:8.1f} embeddings/s  (mean of before and after)")
    print(
        f"pipeline, {emb.requests} single-text requests: {emb.rate:8.1f} embeddings/s"
        f"  ({emb.seconds:.1f} s, {emb.model_calls:.0f} model calls, {emb.texts / max(emb.model_calls, 1):.1f} texts/call)"
    )
    print(f"pipeline / direct batched     : {emb.rate / batched:8.2f}  (target >= 0.80)")
    print(f"pipeline / direct unbatched   : {emb.rate / single:8.2f}  (target >= 3.00)")
    print(f"pipeline, generate at 0 ms    : {gen.rate:8.1f} requests/s  ({gen.requests} in {gen.seconds:.1f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=3000, help="requests per pipeline phase")
    parser.add_argument("--concurrency", type=int, default=64, help="HTTP submissions in flight")
    parser.add_argument("--seconds", type=float, default=5.0, help="duration of each direct mode")
    parser.add_argument("--batch", type=int, default=32, help="texts per direct batched call")
    parser.add_argument("--torch-threads", type=int, default=2, help="the model server's torch threads")
    parser.add_argument("--worker-env", action="append", default=[], metavar="NAME=VALUE",
                        help="extra INFERSTREAM_* setting of the worker, without the prefix")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
