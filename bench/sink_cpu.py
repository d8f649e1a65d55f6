"""Sink CPU per request with small batches: this process and its PostgreSQL backend, split or merged.

``bench/sink.py`` measures rows/s with large batches; under ``bench.cpu`` the sink agents
write a few events per batch, so what counts there is the CPU of each small upsert. This
writes ``--requests`` requests through :class:`bridges.sink.ResultSink` (no ``on_applied``
work) in groups of ``--batch``: with ``--mode split`` each group is two writes, as the two
sink agents do (the queued events; then the dispatched and completed ones), with ``merged``
one write of all three (what one agent reading both topics could write). It prints CPU ms per
request of this process and of the pool's one PostgreSQL backend (``/proc/PID/stat``; needs
PostgreSQL on this machine), and wall time. The schema is fresh, so the table grows from
empty, as in ``bench.cpu``; the upsert's plan, and so its cost, depends on that size.

    .venv/bin/python bench/sink_cpu.py [--requests 3000] [--batch 4] [--mode split|merged]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.cpu import cpu_ms
from bench.sink import sample_requests, scratch_schema
from bridges.clients.store import Store
from bridges.clients.store.rows import Event
from bridges.sink import ResultSink
from inferstream.settings import Settings
from schemas.records import ResultEvent


async def nothing(rows: list[dict[str, Any]]) -> None:
    return None


async def run(sink: ResultSink, n: int, batch: int, merged: bool, t0: float) -> None:
    reqs = sample_requests(n, t0)
    for i in range(0, n, batch):
        queued: list[Event] = list(reqs[i : i + batch])
        results: list[Event] = []
        for r in reqs[i : i + batch]:
            results.append(ResultEvent.for_request(r, "dispatched", r.created_at + 0.01))
        for r in reqs[i : i + batch]:
            results.append(
                ResultEvent.for_request(
                    r,
                    "completed",
                    r.created_at + 0.02,
                    result={"text": "lorem ipsum " * 20},
                    usage={"total_tokens": 250},
                    attempts=1,
                    started_at=r.created_at + 0.015,
                )  # fmt: skip
            )
        if merged:
            await sink.write(queued + results)
        else:
            await sink.write(queued)
            await sink.write(results)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", default=Settings().postgres_dsn)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=4, help="requests per group")
    parser.add_argument("--mode", choices=("split", "merged"), default="split")
    args = parser.parse_args()

    merged = args.mode == "merged"
    async with scratch_schema(args.dsn) as schema:
        store = Store(Settings(namespace=schema, postgres_dsn=args.dsn), min_size=1, max_size=1)
        sink = ResultSink(Settings(), store.requests, nothing)
        try:
            pool = await store.connect()
            backend = int(await pool.fetchval("SELECT pg_backend_pid()"))
            await run(sink, 300, args.batch, merged, time.time() - 10_000)  # warm up
            writes = sink.batches_written
            c0, p0, w0 = time.process_time(), cpu_ms(backend) / 1000, time.perf_counter()
            await run(sink, args.requests, args.batch, merged, time.time())
            c1, p1, w1 = time.process_time(), cpu_ms(backend) / 1000, time.perf_counter()
        finally:
            await store.close()
    n = args.requests
    print(
        f"{args.mode}, {args.batch} requests per group, {n} requests, "
        f"{sink.batches_written - writes} writes: this process {1000 * (c1 - c0) / n:.3f} ms/request, "
        f"PostgreSQL backend {1000 * (p1 - p0) / n:.3f} ms/request, wall {1000 * (w1 - w0) / n:.3f} ms/request"
    )


if __name__ == "__main__":
    asyncio.run(main())
