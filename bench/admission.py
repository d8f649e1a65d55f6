"""Admission bursts over HTTP (issue 10, target 3): admissions/s, p50 and p99, then the downstream's catch-up.

Issue 10's target 3 is the default run: 20,000 submissions from 200 users at
64 in flight on ONE pipeline worker, against >= 3,000 admissions/s with p99
<= 50 ms::

    .venv/bin/python -m bench.admission            # admission only: no ML worker, the work stays queued
    .venv/bin/python -m bench.admission --drain    # + an ML worker and a 0 ms model: nothing lost, catch-up time

Starts its own Tansu, a fresh namespace, pipeline-only workers and a plan with
limits nobody reaches; users submit small generate requests over keep-alive
connections at a fixed concurrency, spread over every worker's URL (a request
that reaches a non-owner is forwarded). Each configuration is warmed up
first (``--warmup`` seconds of the same load, unmeasured). Prints, per worker
count: admissions/s, p50 and p99 of the 202s and their ratio to the targets,
and the bytes Tansu received per admission.

With ``--drain`` an ML worker (role ``ml``, its own process) and a model
server at 0 ms run beside the pipeline worker, as in ``bench.cpu``; the
warm-up is drained before the burst, and after the burst the benchmark waits
(up to ``--deadline-s``) until PostgreSQL shows every accepted request
terminal, prints how long the downstream took to catch up after the last
answer, and fails unless every 202 has exactly one row, in a terminal status.

The load generator (``--client``) shares the two cores with the system under
test: ``raw`` (the default, :mod:`bench.loadgen`) costs a fraction of the CPU
of ``aiohttp``; ``wrk`` (``apt-get install wrk``) runs for ``--duration`` only
and cannot collect request ids (so no ``--drain``). Other modes::

    .venv/bin/python -m bench.admission --duration 15 --workers 1,2   # fixed time, one and two workers
    .venv/bin/python bench/admission.py --client aiohttp --requests 5000
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import loadgen
from bench.measure import (
    Profiles,
    bytes_between,
    calibrate,
    calibration_line,
    percentile,
    slowness,
    statuses_of,
    tcp_bytes,
    wait_terminal,
)
from devtools.localbroker import LocalBroker, free_port
from tests.support.modelserver import start_modelserver, stop_modelserver, wait_healthy
from tests.support.pipeline import Api, Pipeline

PLAN = "bench"
BODY = b'{"task": "generate", "input": "a short prompt to admit", "params": {"max_tokens": 8}}'
TARGET_PER_S = 3000.0  # issue 10, target 3
TARGET_P99_MS = 50.0
TERMINAL = {"completed", "failed", "cancelled", "expired"}


@dataclass
class Figures:
    admitted: int
    per_s: float
    p50_ms: float
    p99_ms: float
    answers: dict[int, int]
    accepted: list[str]
    elapsed: float  # first submission -> last answer, seconds
    ended: float  # time.monotonic() of the last answer


def figures(out: loadgen.Outcome) -> Figures:
    latencies = out.accepted_latencies()
    return Figures(
        admitted=len(out.accepted),
        per_s=len(out.accepted) / (out.ended - out.began),
        p50_ms=percentile(latencies, 0.50) * 1000,
        p99_ms=percentile(latencies, 0.99) * 1000,
        answers=out.counts,
        accepted=out.accepted,
        elapsed=out.ended - out.began,
        ended=time.monotonic(),
    )


async def drive_aiohttp(
    urls: list[str], keys: list[str], concurrency: int, total: int | None, seconds: float | None
) -> loadgen.Outcome:
    """The same load from aiohttp's client (costs the machine more CPU per request)."""
    out = loadgen.Outcome()
    targets = itertools.cycle([(u, k) for k in keys for u in urls])
    budget = iter(range(total)) if total is not None else itertools.count()
    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=concurrency)
    async with aiohttp.ClientSession(connector=connector) as http:
        out.began = time.perf_counter()
        end = out.began + seconds if seconds is not None else float("inf")

        async def client() -> None:
            for _ in budget:
                if (start := time.perf_counter()) >= end:
                    break
                url, key = next(targets)
                async with http.post(
                    url + "/v1/requests",
                    data=BODY,
                    headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
                ) as r:
                    answer = await r.read()
                now = time.perf_counter()
                out.statuses.append(r.status)
                out.latencies.append(now - start)
                out.done_at.append(now)
                if r.status == 202:
                    out.accepted.append(orjson.loads(answer)["request_id"])

        await asyncio.gather(*(client() for _ in range(concurrency)))
        out.ended = time.perf_counter()
    return out


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


def drive_wrk(urls: list[str], keys: list[str], concurrency: int, seconds: float) -> Figures:
    """The same load from ``wrk`` for ``seconds`` (one process per worker URL, started together)."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(WRK_SCRIPT % (", ".join(f'"{k}"' for k in keys), BODY.decode()))
        script = f.name
    per_url = max(1, concurrency // len(urls))
    command = [
        "wrk",
        "-t1",
        f"-c{per_url}",
        f"-d{max(1, round(seconds))}s",
        "--latency",
        "-s",
        script,
    ]
    procs = [subprocess.Popen([*command, url], stdout=subprocess.PIPE, text=True) for url in urls]
    outputs = [p.communicate()[0] for p in procs]
    total = admitted = failed_all = 0.0
    p50s, p99s = [], []
    for out in outputs:
        rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
        done = float(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
        bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
        failed = float(bad.group(1)) if bad else 0.0
        failed_all += failed
        total += rate * (done - failed) / done if done else 0.0
        admitted += done - failed
        p50s.append(_wrk_ms(out, "50%"))
        p99s.append(_wrk_ms(out, "99%"))
    answers = {202: int(admitted), **({0: int(failed_all)} if failed_all else {})}
    return Figures(
        int(admitted), total, max(p50s), max(p99s), answers, [], seconds, time.monotonic()
    )


async def burst(
    urls: list[str],
    keys: list[str],
    args: argparse.Namespace,
    total: int | None,
    seconds: float | None,
) -> Figures:
    if args.client == "wrk":
        return drive_wrk(urls, keys, args.concurrency, seconds or 0.0)
    if args.client == "aiohttp":
        return figures(await drive_aiohttp(urls, keys, args.concurrency, total, seconds))
    return figures(
        await loadgen.submit(urls, keys, BODY, args.concurrency, total=total, seconds=seconds)
    )


@contextlib.asynccontextmanager
async def model_server(drain: bool) -> AsyncIterator[str]:
    """A 0 ms generate-only model server with ``drain``; otherwise a URL where nothing listens."""
    if not drain:
        yield "http://127.0.0.1:9/v1"
        return
    port = free_port()
    proc = start_modelserver(port, "--no-embeddings", "--latency-ms", "0")
    try:
        await wait_healthy(f"http://127.0.0.1:{port}", time.monotonic() + 90, proc)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        stop_modelserver(proc)


async def measure(broker: LocalBroker, workers: int, args: argparse.Namespace) -> Figures:
    """One configuration in its own namespace, its workers started idle (a backlog slows a join)."""
    async with (
        model_server(args.drain) as model_url,
        Pipeline.session(
            broker.url, model_url, roles="pipeline", partitions=str(args.partitions)
        ) as pipeline,
    ):
        await pipeline.set_plan(
            PLAN, requests_per_day=10**9, tokens_per_day=10**12, requests_per_minute=10**9
        )
        keys = [await pipeline.create_key(f"bench-user-{i}", PLAN) for i in range(args.users)]
        gateways = [await pipeline.start_worker(wait=False) for _ in range(workers)]
        ml = await pipeline.start_worker(wait=False, roles="ml") if args.drain else None
        urls = [w.url for w in gateways]
        async with aiohttp.ClientSession() as http:
            for w in pipeline.workers:
                await w.wait_ready(120)
            for w in gateways:
                for key in (keys[0], keys[-1]):  # keys loaded, owners answering
                    await Api(http, w.url, key).wait_key_active(timeout=60)
        warm = await burst(urls, keys, args, None, args.warmup)
        if args.drain:
            await wait_terminal(pipeline, warm.admitted, args.deadline_s)
            await asyncio.sleep(1.0)  # the sinks' last batches and acks
        assert broker.port is not None
        sockets = tcp_bytes(broker.port)
        pids = {f"pipeline worker {i + 1}": w.proc.pid for i, w in enumerate(gateways) if w.proc}
        if ml is not None and ml.proc is not None:
            pids["ML worker"] = ml.proc.pid
        with Profiles(args.profile, pids):
            total, seconds = (None, args.duration) if args.duration else (args.requests, None)
            cpu = time.process_time()
            result = await burst(urls, keys, args, total, seconds)
            cpu = time.process_time() - cpu
            received, sent = bytes_between(sockets, tcp_bytes(broker.port))
            report(workers, result, args.calibration)
            per = max(1, result.admitted)
            print(
                f"  Tansu received {received / per:,.0f} bytes per admission during the burst "
                f"(all its clients' requests: produces, fetches, commits, heartbeats; TCP counters), "
                f"sent {sent / per:,.0f}; "
                + (
                    "the load generator's CPU: not measured (wrk)"
                    if args.client == "wrk"
                    else f"the load generator used {cpu * 1000 / per:.3f} ms CPU per admission"
                ),
                flush=True,
            )
            if args.drain:
                await drain(pipeline, warm, result, args.deadline_s)
        for w in pipeline.workers:
            if w.proc is None or w.proc.poll() is not None:
                raise SystemExit(f"worker {w.url} exited during the run:\n{w.log_tail()}")
        return result


async def drain(pipeline: Pipeline, warm: Figures, result: Figures, deadline_s: float) -> None:
    """Wait until every accepted request is terminal in PostgreSQL; fail if one is missing."""
    caught_up = await wait_terminal(pipeline, warm.admitted + result.admitted, deadline_s)
    counts = await statuses_of(pipeline, result.accepted)
    terminal = sum(n for s, n in counts.items() if s in TERMINAL)
    lag = caught_up - result.ended
    print(
        f"  downstream caught up {lag:.1f} s after the last answer (burst {result.elapsed:.1f} s; "
        f"{result.admitted / (result.elapsed + lag):,.0f} completions/s from the first submission); "
        f"rows of the accepted requests by status: {counts}"
    )
    if terminal != result.admitted or sum(counts.values()) != result.admitted:
        raise SystemExit(
            f"LOST: {result.admitted} accepted, {sum(counts.values())} rows, {terminal} terminal "
            f"(deadline {deadline_s:.0f} s)"
        )
    print(f"  nothing lost: each of the {result.admitted:,} 202s has exactly one terminal row")


def report(n: int, r: Figures, calibration: float) -> None:
    others = {s: c for s, c in r.answers.items() if s != 202}
    print(
        f"{n} worker(s): {r.per_s:,.0f} admissions/s ({r.per_s * slowness(calibration):,.0f}/s normalised "
        f"to the reference calibration), p50 {r.p50_ms:.1f} ms, p99 {r.p99_ms:.1f} ms "
        f"({r.admitted:,} admitted{f', other answers {others}' if others else ''}); "
        f"target 3: {r.per_s / TARGET_PER_S:.2f}x the rate ({TARGET_PER_S:,.0f}/s), "
        f"p99 {r.p99_ms / TARGET_P99_MS:.2f}x the bound ({TARGET_P99_MS:.0f} ms)",
        flush=True,
    )


async def main(args: argparse.Namespace) -> None:
    if args.client == "wrk" and (args.drain or not args.duration):
        raise SystemExit(
            "wrk runs for a time and collects no request ids: use --duration, no --drain"
        )
    args.calibration = calibrate()
    print(calibration_line(args.calibration))
    counts = sorted({int(n) for n in args.workers.split(",")})
    load = f"{args.duration:.0f} s" if args.duration else f"{args.requests:,} submissions"
    print(
        f"settings: {load} per configuration (+{args.warmup:.0f} s warm-up), "
        f"concurrency {args.concurrency}, users {args.users}, partitions {args.partitions}, "
        f"workers {counts}, roles pipeline{' + an ML worker, model 0 ms' if args.drain else ''}, "
        f"generate requests, table store memory://, broker Tansu (in memory), client {args.client}"
    )
    results: dict[int, Figures] = {}
    with LocalBroker() as broker:
        for n in counts:
            results[n] = await measure(broker, n, args)
    if 1 in results and 2 in results:
        print(f"ratio two/one: {results[2].per_s / results[1].per_s:.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--requests", type=int, default=20_000, help="submissions measured per configuration"
    )
    parser.add_argument(
        "--duration", type=float, default=0.0, help="measure for this many seconds instead"
    )
    parser.add_argument(
        "--warmup", type=float, default=3.0, help="seconds of unmeasured load first"
    )
    parser.add_argument("--concurrency", type=int, default=64, help="requests in flight")
    parser.add_argument("--users", type=int, default=200, help="users (one API key each)")
    parser.add_argument("--partitions", type=int, default=8, help="log partitions")
    parser.add_argument(
        "--workers", default="1", help="pipeline worker counts to measure, e.g. 1,2"
    )
    parser.add_argument(
        "--drain", action="store_true", help="run the downstream too and check nothing is lost"
    )
    parser.add_argument(
        "--deadline-s", type=float, default=600.0, help="longest wait for the drain"
    )
    parser.add_argument(
        "--profile", type=Path,
        help="py-spy raw profiles of the workers into this directory (the burst; with --drain the catch-up too)",
    )  # fmt: skip
    parser.add_argument(
        "--client", choices=["raw", "aiohttp", "wrk"], default="raw",
        help="load generator (raw: bench.loadgen; wrk: apt-get install wrk, --duration only)",
    )  # fmt: skip
    asyncio.run(main(parser.parse_args()))
