"""Admission throughput and latency over HTTP: admissions/s, p50 and p99, for one worker and for two.

Starts its own Tansu, a fresh namespace, pipeline-only workers (no ML role: the
model is not called) and a plan with limits nobody reaches; many users submit
small embed requests over keep-alive connections at a fixed concurrency, spread
over every worker's URL (a request that reaches a non-owner is forwarded).
The load generator shares the machine's cores with the workers and the broker:
``--client wrk`` (the default when ``wrk`` is installed: ``apt-get install wrk``)
costs far less CPU per request than the Python client (``--client aiohttp``),
so it leaves more of the two cores to the system under test.

    .venv/bin/python bench/admission.py [--duration 15] [--concurrency 64] [--users 200] [--workers 1,2]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from devtools.localbroker import LocalBroker
from tests.support.pipeline import Api, Pipeline

PLAN = "bench"
BODY = b'{"task": "embed", "input": "a short sentence to embed"}'


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


async def drive(urls: list[str], keys: list[str], concurrency: int, seconds: float) -> dict[str, float]:
    """Submit for ``seconds`` with ``concurrency`` requests in flight; figures of the 202s."""
    latencies: list[float] = []
    outcomes: Counter[int] = Counter()
    targets = itertools.cycle([(u, k) for k in keys for u in urls])
    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=concurrency)
    async with aiohttp.ClientSession(connector=connector) as http:
        end = time.perf_counter() + seconds

        async def client() -> None:
            while (start := time.perf_counter()) < end:
                url, key = next(targets)
                async with http.post(
                    url + "/v1/requests",
                    data=BODY,
                    headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
                ) as r:
                    await r.read()
                    outcomes[r.status] += 1
                    if r.status == 202:
                        latencies.append(time.perf_counter() - start)

        began = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        elapsed = time.perf_counter() - began
    latencies.sort()
    others = {s: n for s, n in outcomes.items() if s != 202}
    if others:
        print(f"  non-202 answers: {others}")
    return {
        "admitted": float(outcomes[202]),
        "per_s": outcomes[202] / elapsed,
        "p50_ms": percentile(latencies, 0.50) * 1000,
        "p99_ms": percentile(latencies, 0.99) * 1000,
    }


WRK_SCRIPT = """
local keys = {%s}
local body = [[%s]]
local i = 0
request = function()
  i = i + 1
  local headers = {["Authorization"] = "Bearer " .. keys[(i %% #keys) + 1], ["Content-Type"] = "application/json"}
  return wrk.format("POST", "/v1/requests", headers, body)
end
"""
_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0}


def _wrk_ms(text: str, label: str) -> float:
    match = re.search(rf"^\s*{label}\s+([\d.]+)(us|ms|s)\s*$", text, re.M)
    return float(match.group(1)) * _UNITS[match.group(2)] if match else float("nan")


def drive_wrk(urls: list[str], keys: list[str], concurrency: int, seconds: float) -> dict[str, float]:
    """The same load from ``wrk`` (one process per worker URL, started together)."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(WRK_SCRIPT % (", ".join(f'"{k}"' for k in keys), BODY.decode()))
        script = f.name
    per_url = max(1, concurrency // len(urls))
    procs = [
        subprocess.Popen(
            ["wrk", "-t1", f"-c{per_url}", f"-d{max(1, round(seconds))}s", "--latency", "-s", script, url],
            stdout=subprocess.PIPE,
            text=True,
        )
        for url in urls
    ]
    outputs = [p.communicate()[0] for p in procs]
    total = admitted = 0.0
    p50s, p99s = [], []
    for out in outputs:
        rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
        done = float(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
        bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
        failed = float(bad.group(1)) if bad else 0.0
        if failed:
            print(f"  non-2xx answers: {failed:.0f}")
        total += rate * (done - failed) / done if done else 0.0
        admitted += done - failed
        p50s.append(_wrk_ms(out, "50%"))
        p99s.append(_wrk_ms(out, "99%"))
    return {"admitted": admitted, "per_s": total, "p50_ms": max(p50s), "p99_ms": max(p99s)}


async def measure(broker_url: str, workers: int, args: argparse.Namespace) -> dict[str, float]:
    """One configuration in its own namespace, its workers started idle (a backlog slows a join)."""
    pipeline = await Pipeline.create(
        broker_url, "http://127.0.0.1:9/v1", roles="pipeline", partitions=str(args.partitions)
    )
    try:
        await pipeline.set_plan(
            PLAN, requests_per_day=10**9, tokens_per_day=10**12, requests_per_minute=10**9
        )
        keys = [await pipeline.create_key(f"bench-user-{i}", PLAN) for i in range(args.users)]
        for _ in range(workers):
            await pipeline.start_worker()
        urls = [w.url for w in pipeline.workers]
        async with aiohttp.ClientSession() as http:
            for w in pipeline.workers:
                await w.wait_ready()
                for key in (keys[0], keys[-1]):  # keys loaded, owners answering
                    await Api(http, w.url, key).wait_key_active(timeout=60)
        if args.client == "wrk":
            drive_wrk(urls, keys, args.concurrency, args.warmup)
            return drive_wrk(urls, keys, args.concurrency, args.duration)
        await drive(urls, keys, args.concurrency, args.warmup)
        return await drive(urls, keys, args.concurrency, args.duration)
    finally:
        await pipeline.cleanup()


async def main(args: argparse.Namespace) -> None:
    counts = sorted({int(n) for n in args.workers.split(",")})
    print(
        f"settings: duration {args.duration:.0f} s per configuration (+{args.warmup:.0f} s warm-up), "
        f"concurrency {args.concurrency}, users {args.users}, partitions {args.partitions}, "
        f"workers {counts}, roles pipeline, table store memory://, broker Tansu (in memory), client {args.client}"
    )
    results: dict[int, dict[str, float]] = {}
    with LocalBroker() as broker:
        for n in counts:
            results[n] = await measure(broker.url, n, args)
            r = results[n]
            print(
                f"{n} worker(s): {r['per_s']:,.0f} admissions/s, p50 {r['p50_ms']:.1f} ms, "
                f"p99 {r['p99_ms']:.1f} ms ({r['admitted']:,.0f} admitted)",
                flush=True,
            )
    if 1 in results and 2 in results:
        print(f"ratio two/one: {results[2]['per_s'] / results[1]['per_s']:.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=15.0, help="seconds measured per configuration")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of unmeasured load first")
    parser.add_argument("--concurrency", type=int, default=64, help="requests in flight")
    parser.add_argument("--users", type=int, default=200, help="users (one API key each)")
    parser.add_argument("--partitions", type=int, default=8, help="log partitions")
    parser.add_argument("--workers", default="1,2", help="worker counts to measure, e.g. 1,2")
    parser.add_argument(
        "--client", choices=["wrk", "aiohttp"], default="wrk" if shutil.which("wrk") else "aiohttp",
        help="load generator (wrk: apt-get install wrk)",
    )
    asyncio.run(main(parser.parse_args()))
