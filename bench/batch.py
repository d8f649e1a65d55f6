"""A Batch API batch against the same texts sent as single requests (issue 14): lines/s of each, from one run.

Starts its own Tansu broker, reference model server (real embeddings) and two
workers (a pipeline worker and an ML worker, as ``scripts/up`` starts them) in
a fresh namespace on the local PostgreSQL, Redis and RabbitMQ, with a plan
whose limits never bind. After a warm-up of both paths:

1. **batch**: ``--lines`` embedding lines, one text each, uploaded as one JSONL
   file (``POST /v1/files``) and run as one batch (``POST /v1/batches``), then
   ``GET /v1/batches/{id}`` every 50 ms until it is ``completed``. Lines/s is
   lines over the time from the upload's start to the poll that saw
   ``completed``; also shown without the finalization (to the last line's
   result) and the finalization alone: the time from the last line's result
   (the latest ``completed_at`` of the batch's rows in PostgreSQL) to the poll
   that saw ``completed`` (the batch object's own timestamps are whole seconds).
2. **singles**: the same texts as ``--lines`` ``POST /v1/requests`` embed
   requests, ``--concurrency`` in flight (as ``bench.batching`` sends them),
   until PostgreSQL shows every one completed.

Target: batch lines/s >= singles lines/s. Everything shares the machine's
cores (no pinning): compare the ratio, not the absolute rates.

    .venv/bin/python -m bench.batch [--lines 20000] [--concurrency 64] [--worker-env NAME=VALUE ...]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from bench.batching import Stack, model_counters, progress, through_pipeline
from bench.direct_model import MODEL, sentences
from bench.measure import calibrate, calibration_line, worker_settings
from devtools.localbroker import LocalBroker, free_port
from inferstream.settings import Settings
from tests.support.modelserver import HOST, start_modelserver, stop_modelserver, wait_healthy
from tests.support.pipeline import Api, Pipeline
from tests.support.wait import wait_for

TARGET_RATIO = 1.0  # batch lines/s over singles lines/s
POLL_S = 0.05
WARM_LINES = 256


@dataclass
class BatchRun:
    lines: int
    upload_s: float  # POST /v1/files
    create_s: float  # POST /v1/batches
    to_last_result_s: float  # from the upload's start to the last line's result
    total_s: float  # from the upload's start to the poll that saw `completed`
    finalize_s: float  # last line's result -> `completed` seen
    first_result_s: float  # from the upload's start to the first line's result
    counts: dict[str, int]
    model_calls: float
    texts: float

    @property
    def rate(self) -> float:
        return self.lines / self.total_s


def jsonl_of(texts: list[str]) -> bytes:
    return b"".join(
        orjson.dumps(
            {
                "custom_id": f"line-{i}",
                "method": "POST",
                "url": "/v1/embeddings",
                "body": {"model": MODEL, "input": t},
            }
        )
        + b"\n"
        for i, t in enumerate(texts)
    )


async def run_batch(
    stack: Stack, http: aiohttp.ClientSession, user: str, texts: list[str], timeout: float
) -> BatchRun:
    key = await stack.pipeline.create_key(user, "bench")
    api = await Api(http, stack.gateway.url, key).wait_key_active()
    content = jsonl_of(texts)
    form = aiohttp.FormData()
    form.add_field("purpose", "batch")
    form.add_field("file", content, filename="bench.jsonl", content_type="application/jsonl")
    before = await model_counters(http, stack.ml)
    started = time.time()
    async with http.post(stack.gateway.url + "/v1/files", data=form, headers=api.headers()) as r:
        uploaded = await r.json()
        if r.status != 200:
            raise RuntimeError(f"upload answered {r.status}: {uploaded}")
    uploaded_at = time.time()
    body = {
        "input_file_id": uploaded["id"],
        "endpoint": "/v1/embeddings",
        "completion_window": "24h",
    }
    status, batch, _ = await api.call("POST", "/v1/batches", json=body)
    if status != 200:
        raise RuntimeError(f"batch create answered {status}: {batch}")
    created_at = time.time()

    async def completed() -> dict[str, Any] | None:
        status, doc, _ = await api.call("GET", f"/v1/batches/{batch['id']}")
        if status != 200:
            raise RuntimeError(f"batch read answered {status}: {doc}")
        if doc["status"] in ("failed", "expired", "cancelled"):
            raise RuntimeError(f"batch ended {doc['status']}: {doc}")
        return doc if doc["status"] == "completed" else None

    done = await wait_for(
        completed, timeout=timeout, interval=POLL_S, what=f"batch of {len(texts)} lines completed"
    )
    seen_at = time.time()
    after = await model_counters(http, stack.ml)
    pool = await stack.pipeline.store.connect()
    first, last = await pool.fetchrow(
        "SELECT min(completed_at), max(completed_at) FROM requests WHERE batch_id = $1", batch["id"]
    )
    last_at = last.timestamp()
    return BatchRun(
        lines=len(texts),
        upload_s=uploaded_at - started,
        create_s=created_at - uploaded_at,
        to_last_result_s=last_at - started,
        total_s=seen_at - started,
        finalize_s=seen_at - last_at,
        first_result_s=first.timestamp() - started,
        counts=dict(done["request_counts"]),
        model_calls=after["calls"] - before["calls"],
        texts=after["texts"] - before["texts"],
    )


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
                    "bench",
                    requests_per_day=10**9,
                    tokens_per_day=10**12,
                    requests_per_minute=10**9,
                )
                extra = worker_settings(args.worker_env)
                gateway, ml = await asyncio.gather(
                    pipeline.start_worker(wait=False, **{**extra, "roles": "pipeline"}),
                    pipeline.start_worker(wait=False, **{**extra, "roles": "ml"}),
                )
                await asyncio.gather(gateway.wait_ready(120), ml.wait_ready(120))
                progress(f"workers ready, logs {gateway.log_path} {ml.log_path}")
                await measure_all(args, Stack(pipeline, gateway, ml, model_url))
            finally:
                await pipeline.cleanup()
    finally:
        stop_modelserver(model_proc)


async def measure_all(args: argparse.Namespace, stack: Stack) -> None:
    texts = sentences(args.lines + WARM_LINES)
    warm, measured = texts[args.lines :], texts[: args.lines]
    timeout = max(300.0, args.lines / 10)
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=args.concurrency + 8)
    ) as http:
        # Warm-up: the first calls of each path pay for lazy connections, imports and the first chunk.
        await run_batch(stack, http, "bench-warm-batch", warm, timeout)
        singles_warm = [{"task": "embed", "model": MODEL, "input": t} for t in warm]
        await through_pipeline(
            stack, http, "bench-warm-singles", singles_warm, args.concurrency, timeout
        )
        progress("warmed up")
        batch = await run_batch(stack, http, "bench-batch", measured, timeout)
        progress(f"batch: {batch.rate:.1f} lines/s")
        bodies = [{"task": "embed", "model": MODEL, "input": t} for t in measured]
        singles = await through_pipeline(
            stack, http, "bench-singles", bodies, args.concurrency, timeout
        )
        progress(f"singles: {singles.rate:.1f} lines/s")
    calibration = calibrate()

    settings = Settings.from_env(stack.gateway.env)  # with --worker-env applied
    print(
        f"settings: {args.lines} lines (one text each, {MODEL}); singles {args.concurrency} in flight; "
        f"BATCH_CHUNK_LINES {settings.batch_chunk_lines}, BATCH_POLL_S {settings.batch_poll_s}, "
        f"ML_BATCH_SIZE {settings.ml_batch_size}, model server torch threads {args.torch_threads}; "
        f"worker env {args.worker_env or 'defaults'}"
    )
    print(calibration_line(calibration))
    print(
        f"batch   : {batch.rate:8.1f} lines/s  ({batch.total_s:.1f} s: upload {batch.upload_s:.2f} s, "
        f"create {batch.create_s:.2f} s; request_counts {batch.counts})"
    )
    print(f"batch, to the last line's result: {batch.lines / batch.to_last_result_s:8.1f} lines/s  ({batch.to_last_result_s:.1f} s; first line's result after {batch.first_result_s:.2f} s; {batch.model_calls:.0f} model calls, {batch.texts / max(batch.model_calls, 1):.1f} texts/call)")  # fmt: skip
    print(f"singles : {singles.rate:8.1f} lines/s  ({singles.seconds:.1f} s, {singles.model_calls:.0f} model calls, {singles.texts / max(singles.model_calls, 1):.1f} texts/call)")  # fmt: skip
    verdict = "met" if batch.rate / singles.rate >= TARGET_RATIO else "NOT met"
    print(
        f"batch / singles : {batch.rate / singles.rate:8.2f}  (target >= {TARGET_RATIO:.2f}: {verdict})"
    )
    print(f"last line's result -> completed seen: {batch.finalize_s:.2f} s  (polled every {POLL_S * 1000:.0f} ms)")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--lines", type=int, default=20_000, help="lines of the batch, and single requests"
    )
    parser.add_argument("--concurrency", type=int, default=64, help="single requests in flight")
    parser.add_argument(
        "--torch-threads", type=int, default=2, help="the model server's torch threads"
    )
    parser.add_argument(
        "--worker-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra INFERSTREAM_* setting of the workers, without the prefix",
    )
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
