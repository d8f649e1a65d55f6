"""Fair share on one route: ten users' time to start with and without one user's burst ahead of them.

Starts its own Tansu broker, model server (generate only, ``--latency-ms``) and
two workers (a pipeline worker and an ML worker with ``ml_concurrency``) in a
fresh namespace. Then, on the one ``generate`` route:

1. baseline: ten users submit ``--each`` (20) requests each at once;
2. burst: one user submits ``--burst`` (2,000) requests as fast as it can, and
   ``--delay`` (1 s) after its first submission (``--delay-from start``) or
   after its last 202 (``--delay-from end``) the same ten users submit
   ``--each`` each again;
3. with ``--fifo-reference``, the burst again on an ML worker restarted with
   ``INFERSTREAM_ML_PREFETCH`` = ``--ml-concurrency`` (the gate then sees no more than the route's
   concurrency: RabbitMQ's FIFO), to show the starvation fair share removes.

The ML worker runs with ``INFERSTREAM_ML_PREFETCH=--prefetch`` (4,096): the
gate can only reorder what the worker holds (docs/fairshare.md).

Time to start is ``started_at - created_at`` of the stored rows. It prints the
ten users' p50/p95 in each run and the ratio burst/baseline (target <= 2).

    .venv/bin/python -m bench.fairshare [--burst 2000] [--users 10] [--each 20] [--fifo-reference]
"""

from __future__ import annotations

import argparse
import asyncio
import time

import aiohttp

from bench.measure import wait_terminal
from devtools.localbroker import LocalBroker
from tests.support.modelserver import running_modelserver
from tests.support.pipeline import Api, Pipeline, WorkerProcess

TARGET_RATIO = 2.0


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def submit_many(api: Api, n: int, concurrency: int, tag: str) -> list[str]:
    gate = asyncio.Semaphore(concurrency)
    body = {"task": "generate", "input": f"fair share {tag}", "params": {"max_tokens": 8}}

    async def one() -> str:
        async with gate:
            for _ in range(50):  # a 503 while a worker rebalances: try again
                status, accepted, _ = await api.submit(body)
                if status == 202:
                    return str(accepted["request_id"])
                await asyncio.sleep(0.1)
            raise AssertionError(f"submission refused: {status} {accepted}")

    return list(await asyncio.gather(*(one() for _ in range(n))))


async def start_times(pipeline: Pipeline, ids: list[str]) -> list[float]:
    """Each request's time to start; prints where it went (admitted -> dispatched -> started)."""
    pool = await pipeline.store.connect()
    rows = await pool.fetch(
        f'SELECT created_at, dispatched_at, started_at, status FROM "{pipeline.settings.db_schema}".requests'
        " WHERE request_id = ANY($1)",
        ids,
    )
    assert len(rows) == len(ids) and all(r["status"] == "completed" for r in rows), {r["status"] for r in rows}
    forward = [(r["dispatched_at"] - r["created_at"]).total_seconds() for r in rows]
    queue = [(r["started_at"] - r["dispatched_at"]).total_seconds() for r in rows]
    print(
        f"  admitted -> dispatched p50 {pct(forward, 0.5):.2f} s p95 {pct(forward, 0.95):.2f} s;"
        f" dispatched -> started p50 {pct(queue, 0.5):.2f} s p95 {pct(queue, 0.95):.2f} s",
        flush=True,
    )
    return [(r["started_at"] - r["created_at"]).total_seconds() for r in rows]


async def run_once(
    pipeline: Pipeline, light: list[Api], heavy: Api | None, args: argparse.Namespace, done: int
) -> tuple[list[float], int]:
    """One run: the light users' times to start, and the rows now terminal in the namespace."""
    burst: asyncio.Task[list[str]] | None = None
    if heavy is not None:
        burst = asyncio.create_task(submit_many(heavy, args.burst, args.concurrency, "burst"))
        if args.delay_from == "end":
            await burst
        await asyncio.sleep(args.delay)
    ids_each = await asyncio.gather(*(submit_many(a, args.each, args.concurrency, "light") for a in light))
    ids = [i for each in ids_each for i in each]
    total = done + len(ids)
    if burst is not None:
        total += len(await burst)
    await wait_terminal(pipeline, total, args.timeout)
    return await start_times(pipeline, ids), total


def line(name: str, times: list[float]) -> str:
    return f"{name:48s} n={len(times)}  p50 {pct(times, 0.5):6.2f} s  p95 {pct(times, 0.95):6.2f} s"


async def start_ml(pipeline: Pipeline, args: argparse.Namespace, prefetch: int) -> WorkerProcess:
    return await pipeline.start_worker(roles="ml", ml_concurrency=str(args.ml_concurrency), ml_prefetch=str(prefetch))


async def main(args: argparse.Namespace) -> None:
    with LocalBroker() as broker:
        async with running_modelserver("--no-embeddings", "--latency-ms", str(args.latency_ms)) as model_url:
            pipeline = await Pipeline.create(broker.url, model_url + "/v1", models="generate:sim-gpt")
            try:
                gateway = await pipeline.start_worker(roles="pipeline")
                ml = await start_ml(pipeline, args, args.prefetch)
                await pipeline.set_plan("bench", requests_per_day=10**6, tokens_per_day=10**9)
                async with aiohttp.ClientSession() as http:
                    apis = [
                        await Api(http, gateway.url, await pipeline.create_key(f"user{i}", "bench")).wait_key_active()
                        for i in range(args.users + 1)
                    ]
                    heavy, light = apis[0], apis[1:]
                    started = time.monotonic()
                    await run_once(pipeline, light, None, argparse.Namespace(**{**vars(args), "each": 2}), 0)
                    done = 2 * len(light)  # warm-up: connections and caches
                    baseline, done = await run_once(pipeline, light, None, args, done)
                    with_burst, done = await run_once(pipeline, light, heavy, args, done)
                    fifo: list[float] | None = None
                    if args.fifo_reference:
                        ml.stop()
                        await start_ml(pipeline, args, prefetch=args.ml_concurrency)
                        fifo, done = await run_once(pipeline, light, heavy, args, done)
                print(
                    f"route generate/sim-gpt: ml_concurrency {args.ml_concurrency}, model latency {args.latency_ms} ms,"
                    f" burst {args.burst} from one user, {args.users} users x {args.each}"
                    f" ({args.delay:.1f} s after the burst's {args.delay_from}), prefetch {args.prefetch};"
                    f" {time.monotonic() - started:.0f} s"
                )
                print(line(f"{args.users} users alone (baseline)", baseline))
                print(line(f"{args.users} users behind the burst (fair share)", with_burst))
                if fifo is not None:
                    print(line(f"{args.users} users behind the burst (FIFO reference)", fifo))
                ratio = pct(with_burst, 0.95) / pct(baseline, 0.95)
                print(
                    f"p95 ratio burst/baseline: {ratio:.2f} (target <= {TARGET_RATIO:.1f}:"
                    f" {'met' if ratio <= TARGET_RATIO else 'NOT met'})"
                )
                if fifo is not None:
                    print(f"p95 ratio FIFO reference/baseline: {pct(fifo, 0.95) / pct(baseline, 0.95):.2f}")
            finally:
                await pipeline.cleanup()


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--burst", type=int, default=2000)
    p.add_argument("--users", type=int, default=10)
    p.add_argument("--each", type=int, default=20)
    p.add_argument("--delay", type=float, default=1.0, help="seconds between the burst and the others' submissions")
    p.add_argument(
        "--delay-from", choices=("start", "end"), default="start",
        help="count --delay from the burst's first submission, or from its last 202",
    )
    p.add_argument("--latency-ms", type=int, default=100, help="the simulated model's latency per call")
    p.add_argument("--ml-concurrency", type=int, default=8)
    p.add_argument("--concurrency", type=int, default=64, help="submissions in flight per user")
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--prefetch", type=int, default=4096, help="INFERSTREAM_ML_PREFETCH: the gate's horizon")
    p.add_argument("--fifo-reference", action="store_true")
    return p.parse_args(argv)


if __name__ == "__main__":
    asyncio.run(main(parse()))
