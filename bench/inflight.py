"""Cost against work in flight (issue 10, target 5): admissions/s by band of one user's requests in flight.

ONE user (plan limits never reached) submits ``--requests`` generate requests
at ``--concurrency`` in flight to ONE pipeline worker, and nothing ever
settles: no ML worker runs, so every admitted request stays in flight
(reserved in the user's quota, its work message waiting in RabbitMQ). The
k-th admission of the run is made with k-1 of the user's requests in flight.
Prints, per band of that in-flight count (``--band`` wide): admissions/s,
p50 and p99 latency, and the bytes Tansu received per admission (TCP
counters sampled every 0.25 s, :mod:`bench.measure`: every request its
clients sent it, fetch requests included); the ratio of the last band's rate
to the first (O(1) in the in-flight count means ~1.0); and the size of the
user's latest record in each table changelog of the namespace (the quota
changelog's value carried every reservation on main: ~40 bytes each), with
its largest fields, at the last answer and again ``--idle-s`` later (what the
agents had not caught up with by the end, against what stays). A warm-up by
another user (on another partition) comes first, unmeasured.

    .venv/bin/python -m bench.inflight [--requests 10000] [--band 1000] [--concurrency 64]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import orjson
from aiokafka import TopicPartition
from aiokafka.partitioner import DefaultPartitioner

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import loadgen
from bench.measure import (
    Profiles,
    bytes_between,
    calibrate,
    calibration_line,
    percentile,
    tcp_bytes,
)
from devtools.localbroker import LocalBroker
from streams.logread import group_less_consumer, true_ends
from tests.support.pipeline import Api, Pipeline

PLAN = "bench"
USER = "inflight-user"
BODY = (
    b'{"task": "generate", "input": "a short prompt held in flight", "params": {"max_tokens": 8}}'
)
WARMUP = 500
SAMPLE_S = 0.25
RATIO_TARGET = 1.0  # issue 10, target 5: the last band as fast as the first
OLD = "815 admissions/s at 0-1k in flight, 412/s at 2k-3k, 320/s at 7k-8k (issue 10, on main)"


def partition_of(user: str, partitions: int) -> int:
    """The partition of ``user``'s key in our topics and changelogs (JSON key, default partitioner)."""
    ids = list(range(partitions))
    return int(DefaultPartitioner()(orjson.dumps(user), ids, ids))


def warmup_user(partitions: int) -> str:
    """A user whose partition is not USER's, so USER's changelog partition ends with USER's record."""
    home = partition_of(USER, partitions)
    return next(u for i in range(1000) if partition_of(u := f"warm-up-{i}", partitions) != home)


@dataclass
class Band:
    low: int
    high: int
    per_s: float
    p50_ms: float
    p99_ms: float
    bytes_per: float


def bands(out: loadgen.Outcome, width: int, samples: list[tuple[float, int, int]]) -> list[Band]:
    """Figures per band of admissions ``[k*width, (k+1)*width)``; ``samples``: (time, admitted, bytes)."""
    times = out.accepted_times()
    latencies = out.accepted_in_order()
    found: list[Band] = []
    for low in range(0, len(times) - width + 1, width):
        high = low + width
        start = out.began if low == 0 else times[low - 1]
        window = sorted(latencies[low:high])
        # Bytes between the samples nearest the band's first and last admissions.
        at_start = max((s for s in samples if s[1] <= low), default=samples[0])
        at_end = min((s for s in samples if s[1] >= high), default=samples[-1])
        admitted = max(1, at_end[1] - at_start[1])
        found.append(
            Band(
                low,
                high,
                width / (times[high - 1] - start),
                percentile(window, 0.50) * 1000,
                percentile(window, 0.99) * 1000,
                (at_end[2] - at_start[2]) / admitted,
            )
        )
    return found


def largest_fields(value: bytes | None, top: int = 3) -> str:
    """The biggest top-level fields of a JSON object value, with their sizes (and entries, for maps)."""
    try:
        doc = orjson.loads(value or b"null")
    except orjson.JSONDecodeError:
        return "not JSON"
    if not isinstance(doc, dict):
        return type(doc).__name__
    sized = sorted(((len(orjson.dumps(v)), k, v) for k, v in doc.items()), reverse=True)[:top]
    return ", ".join(
        f"{k} {n:,} bytes" + (f" ({len(v):,} entries)" if isinstance(v, dict | list) else "")
        for n, k, v in sized
    )


async def latest_records(pipeline: Pipeline, user: str) -> dict[str, tuple[int, str]]:
    """Changelog topic -> (size in bytes, largest fields) of ``user``'s latest record there."""
    settings = pipeline.settings
    sizes: dict[str, tuple[int, str]] = {}
    async with group_less_consumer(settings.bootstrap_servers, max_records=1) as consumer:
        changelogs = sorted(
            t
            for t in await consumer.topics()
            if t.startswith(f"{pipeline.namespace}-") and t.endswith("-changelog")
        )
        wanted = {t: TopicPartition(t, partition_of(user, settings.partitions)) for t in changelogs}
        listed = await consumer.end_offsets(list(wanted.values()))
    ends = await true_ends(settings.bootstrap_servers, listed)
    async with group_less_consumer(settings.bootstrap_servers, max_records=1) as consumer:
        for topic, tp in wanted.items():
            if ends[tp] == 0:
                continue
            consumer.assign([tp])
            consumer.seek(tp, ends[tp] - 1)
            records = (await consumer.getmany(tp, timeout_ms=5000)).get(tp, [])
            for rec in records:
                if rec.key is not None and orjson.loads(rec.key) == user:
                    size = len(rec.key) + len(rec.value or b"")
                    sizes[topic] = (size, largest_fields(rec.value))
            if topic not in sizes:
                print(
                    f"({topic}: its last record on partition {tp.partition} is not keyed by {user}: not measured)"
                )
    return sizes


async def run(broker: LocalBroker, args: argparse.Namespace) -> None:
    async with Pipeline.session(
        broker.url, "http://127.0.0.1:9/v1", roles="pipeline", partitions=str(args.partitions)
    ) as pipeline:
        await pipeline.set_plan(
            PLAN, requests_per_day=10**9, tokens_per_day=10**12, requests_per_minute=10**9
        )
        key = await pipeline.create_key(USER, PLAN)
        warm_key = await pipeline.create_key(warmup_user(args.partitions), PLAN)
        worker = await pipeline.start_worker(wait=False)
        await worker.wait_ready(120)
        async with aiohttp.ClientSession() as http:
            for k in (key, warm_key):
                await Api(http, worker.url, k).wait_key_active(timeout=60)
        warm = await loadgen.submit([worker.url], [warm_key], BODY, args.concurrency, total=WARMUP)
        assert broker.port is not None and worker.proc is not None
        port = broker.port
        out = loadgen.Outcome()
        samples: list[tuple[float, int, int]] = []
        sockets = tcp_bytes(port)

        async def sample() -> None:
            while True:
                got, _ = bytes_between(sockets, tcp_bytes(port))
                samples.append((time.perf_counter(), len(out.accepted), got))
                await asyncio.sleep(SAMPLE_S)

        with Profiles(args.profile, {"pipeline worker": worker.proc.pid}):
            sampler = asyncio.create_task(sample())
            await asyncio.sleep(0)
            await loadgen.submit(
                [worker.url], [key], BODY, args.concurrency, total=args.requests, out=out
            )
            sampler.cancel()
            received, sent = bytes_between(sockets, tcp_bytes(port))
            samples.append((time.perf_counter(), len(out.accepted), received))
        if worker.proc.poll() is not None:
            raise SystemExit(f"the worker exited during the run:\n{worker.log_tail()}")
        sizes = await latest_records(pipeline, USER)
        await asyncio.sleep(args.idle_s)  # the agents catch up (the forward agent confirms pending)
        later = await latest_records(pipeline, USER)

    print(
        f"one user, {args.requests:,} generate requests at {args.concurrency} in flight, one pipeline worker, "
        f"no ML worker (nothing settles), {args.partitions} partitions; warm-up {warm.counts} by another user; "
        f"answers {out.counts}"
    )
    print("| in flight | admissions/s | p50 ms | p99 ms | bytes Tansu received per admission |")
    print("|---|---|---|---|---|")
    found = bands(out, args.band, samples)
    for b in found:
        print(
            f"| {b.low:,}-{b.high:,} | {b.per_s:,.0f} | {b.p50_ms:.1f} | {b.p99_ms:.1f} | {b.bytes_per:,.0f} |"
        )
    admitted = max(1, len(out.accepted))
    print(
        f"all: {len(out.accepted) / (out.ended - out.began):,.0f} admissions/s; Tansu received "
        f"{received / admitted:,.0f} bytes per admission (all its clients' requests, fetch requests "
        f"included), sent {sent / admitted:,.0f}"
    )
    if len(found) >= 2:
        ratio = found[-1].per_s / found[0].per_s
        print(
            f"last band / first band: {ratio:.2f} (target 5: ~{RATIO_TARGET:.1f}, cost independent of "
            f"the work in flight); before: {OLD}"
        )
    in_flight = len(out.accepted)
    for when, found_sizes in (("at the last answer", sizes), (f"{args.idle_s:.0f} s later", later)):
        for topic, (size, fields) in found_sizes.items():
            print(
                f"{USER}'s latest record in {topic} {when}: {size:,} bytes with {in_flight:,} in flight "
                f"({size / max(1, in_flight):.1f} bytes per request in flight); largest fields: {fields}"
            )


async def main(args: argparse.Namespace) -> None:
    print(calibration_line(calibrate()))
    with LocalBroker() as broker:
        await run(broker, args)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=10_000, help="submissions of the one user")
    parser.add_argument("--band", type=int, default=1000, help="width of an in-flight band")
    parser.add_argument(
        "--concurrency", type=int, default=64, help="requests in flight on the wire"
    )
    parser.add_argument("--partitions", type=int, default=8, help="log partitions")
    parser.add_argument(
        "--profile", type=Path, help="py-spy raw profile of the worker into this directory"
    )
    parser.add_argument(
        "--idle-s", type=float, default=15.0, help="read the changelog again after this idle time"
    )
    asyncio.run(main(parser.parse_args()))
