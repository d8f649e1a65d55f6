"""Sink throughput: rows/s of ``Store.upsert_events`` in batches versus one event per call.

Each measured request goes through its whole lifecycle (queued, dispatched,
running, completed), so every event is a real insert or status change. Both
modes run in one process against the same PostgreSQL, in a fresh schema that
is dropped afterwards; the ratio is the figure to quote.

    .venv/bin/python bench/sink.py [--rows 20000] [--batch 500] [--single-rows 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bridges.clients.store import Store
from bridges.clients.store.rows import Event
from inferstream.ids import new_request_id
from inferstream.settings import Settings
from schemas.migrate import migrate
from schemas.records import InferenceRequest, ResultEvent

STAGES = ("queued", "dispatched", "running", "completed")


@asynccontextmanager
async def scratch_schema(dsn: str) -> AsyncIterator[str]:
    """A new schema with every migration applied for the block, dropped afterwards (also bench/sink_cpu.py's)."""
    schema = f"bench{uuid.uuid4().hex[:8]}"
    await migrate(dsn, schema)
    try:
        yield schema
    finally:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
        finally:
            await conn.close()


def sample_requests(n: int, t0: float) -> list[InferenceRequest]:
    """``n`` generate requests of 50 users, admitted 0.1 ms apart from ``t0`` (also bench/sink_cpu.py's)."""
    return [
        InferenceRequest(
            request_id=new_request_id(t0 + i / 1e4),
            user_id=f"user{i % 50}",
            task="generate",
            model="sim-gpt",
            input=[f"prompt number {i} with a few words in it"],
            estimated_tokens=270,
            created_at=t0 + i / 1e4,
            quota_day="2027-01-15",
            params={"max_tokens": 256},
            metadata={"n": i},
        )
        for i in range(n)
    ]


def make_stages(n: int, t0: float) -> list[list[Event]]:
    """Four lists of n events: every request's queued, then dispatched, running, completed events."""
    reqs = sample_requests(n, t0)
    stages: list[list[Event]] = [list(reqs)]
    for k, status in enumerate(STAGES[1:], start=1):
        extra = (
            {"result": {"text": "lorem ipsum " * 20}, "usage": {"total_tokens": 250}, "attempts": 1}
            if status == "completed"
            else {}
        )
        stages.append([ResultEvent.for_request(r, status, r.created_at + k, **extra) for r in reqs])
    return stages


async def run(store: Store, stages: list[list[Event]], batch: int) -> tuple[float, int]:
    """Events per second and rows changed, writing each stage in slices of ``batch``."""
    changed = 0
    started = time.perf_counter()
    for events in stages:
        for i in range(0, len(events), batch):
            changed += len(await store.requests.upsert_events(events[i : i + batch]))
    elapsed = time.perf_counter() - started
    return sum(len(s) for s in stages) / elapsed, changed


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", default=Settings().postgres_dsn)
    parser.add_argument("--rows", type=int, default=20_000, help="requests written in batches")
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument(
        "--single-rows", type=int, default=2_000, help="requests written one event at a time"
    )
    args = parser.parse_args()

    async with scratch_schema(args.dsn) as schema:
        store = Store(Settings(namespace=schema, postgres_dsn=args.dsn))
        try:
            await run(store, make_stages(200, time.time() - 10_000), 100)  # warm the pool and plans
            batched, changed_b = await run(store, make_stages(args.rows, time.time()), args.batch)
            single, changed_s = await run(
                store, make_stages(args.single_rows, time.time() + 1000), 1
            )
        finally:
            await store.close()
    assert changed_b == 4 * args.rows and changed_s == 4 * args.single_rows, (
        "every event is a transition"
    )
    print(
        f"events per request: {len(STAGES)} ({', '.join(STAGES)}); PostgreSQL at {args.dsn.split('@')[-1]}"
    )
    print(f"batched  (batch={args.batch}, {args.rows} requests): {batched:10,.0f} rows/s")
    print(f"one by one ({args.single_rows} requests):          {single:10,.0f} rows/s")
    print(f"ratio batched / one by one: {batched / single:.1f}x")


if __name__ == "__main__":
    asyncio.run(main())
