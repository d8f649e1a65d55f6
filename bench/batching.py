"""Embeddings per second through the whole pipeline against the model server called directly, from one run.

Starts its own Tansu broker, reference model server and workers (``--topology``:
``split``, a pipeline worker and an ML worker as ``scripts/up`` starts them, or
``all-in-one``), in a fresh namespace on the local PostgreSQL, Redis and
RabbitMQ, with a plan whose limits never bind. Then, one after another:

1. the model server directly, one text per call, calls one after another;
2. the model server directly, batches of ``--batch`` texts per call (again
   after step 3, and the mean of both is reported);
3. the pipeline: ``--requests`` single-text embed requests submitted over
   HTTP, ``--concurrency`` at a time, until PostgreSQL shows every one
   completed (the ML worker batches them into model calls);
4. the pipeline with the simulated generator at zero latency: requests/s.

    .venv/bin/python -m bench.batching [--requests 3000] [--concurrency 64] [--seconds 5] [--no-pin]

``--pin`` (the default with 2 CPUs or more; issue 10, target 4): the model
server runs on CPU 1 alone with one torch thread, and everything else on CPU 0:
this process, Tansu and the workers (started from a thread pinned there, as
``taskset -c`` would), and RabbitMQ, PostgreSQL and Redis, whose threads are
re-pinned for the run like ``taskset -a -p -c 0 PID`` and put back afterwards,
each thread to its previous CPUs (``--no-pin-services``, or no permission: they
float on every CPU, and the script says so). The direct rates are then the
model's on its own core, and the ratio says what the pipeline keeps of it.

Without pinning everything shares the cores: compare the ratios, not the
absolute figures. ``--worker-env NAME=VALUE`` (repeatable) passes extra
``INFERSTREAM_*`` settings to the workers, e.g. ``ML_BATCH_SIZE=64``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from bench.direct_model import (
    MODEL,
    MODEL_CPU,
    REST_CPU,
    affinity,
    cpus_available,
    measure,
    sentences,
    starting_on,
)
from bench.measure import worker_settings
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
TOPOLOGIES: dict[str, dict[str, str]] = {  # worker name -> INFERSTREAM_ROLES
    "split": {"pipeline worker": "pipeline", "ML worker": "ml"},
    "all-in-one": {"worker (all roles)": "pipeline,ml"},
}
SERVICES = {"RabbitMQ": "beam.smp", "PostgreSQL": "postgres", "Redis": "redis-server"}  # by comm
TARGET_BATCHED = 0.8  # issue 10, target 4
TARGET_UNBATCHED = 3.0


@dataclass
class PipelineRun:
    requests: int
    seconds: float
    model_calls: float
    texts: float

    @property
    def rate(self) -> float:
        return self.requests / self.seconds


def pids_named(comm: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if (entry / "comm").read_text().strip() == comm:
                    found.append(int(entry.name))
    return sorted(found)


def threads_of(pid: int) -> list[int]:
    try:
        return [int(t.name) for t in Path(f"/proc/{pid}/task").iterdir()]
    except OSError:
        return []  # exited


@dataclass
class ServicePins:
    """RabbitMQ, PostgreSQL and Redis moved to some CPUs for a run (``taskset -a -p``), then put back.

    Nothing is restarted. Each thread gets back the CPUs it had; a process or
    thread started during the run (a PostgreSQL backend forks from the
    postmaster, so it inherits the pin) gets those of its service's oldest process.
    """

    saved: dict[int, set[int]] = field(default_factory=dict)  # thread id -> CPUs before
    default: dict[str, set[int]] = field(default_factory=dict)  # comm -> CPUs of its oldest process
    outcome: dict[str, str] = field(default_factory=dict)  # label -> what happened, for the report

    def pin(self, cpus: set[int]) -> None:
        for label, comm in SERVICES.items():
            pids = pids_named(comm)
            if not pids:
                self.outcome[label] = "not found"
                continue
            self.default[comm] = os.sched_getaffinity(pids[0])
            try:
                for pid in pids:
                    for tid in threads_of(pid):
                        with contextlib.suppress(ProcessLookupError):
                            before = os.sched_getaffinity(tid)
                            os.sched_setaffinity(tid, cpus)
                            self.saved.setdefault(tid, before)
            except PermissionError:
                self._restore(comm)
                del self.default[comm]
                self.outcome[label] = "floats on every CPU (not allowed to re-pin it)"
                continue
            self.outcome[label] = f"CPU {affinity(pids[0])} for the run ({len(pids)} processes)"

    def _restore(self, comm: str) -> None:
        for pid in pids_named(comm):
            for tid in threads_of(pid):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.sched_setaffinity(tid, self.saved.get(tid, self.default[comm]))

    def restore(self) -> None:
        for comm in self.default:
            self._restore(comm)


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


async def model_counters(http: aiohttp.ClientSession, worker: WorkerProcess) -> dict[str, float]:
    """Model calls and embedded texts so far, from an ML worker's /metrics."""
    async with http.get(worker.url + "/metrics") as r:
        text = await r.text()
    out = {"calls": 0.0, "texts": 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            ok = sample.labels.get("outcome") == "ok"
            if sample.name == "inferstream_model_calls_total" and ok:
                out["calls"] += sample.value
            elif sample.name == "inferstream_model_batch_texts_sum":
                out["texts"] += sample.value
    return out


@dataclass
class Stack:
    """The pipeline under test: where requests go in, and the worker that calls the model."""

    pipeline: Pipeline
    gateway: WorkerProcess
    ml: WorkerProcess
    model_url: str


async def through_pipeline(
    stack: Stack,
    http: aiohttp.ClientSession,
    user: str,
    bodies: list[dict[str, Any]],
    concurrency: int,
    timeout: float,
) -> PipelineRun:
    key = await stack.pipeline.create_key(user, "bench")
    api = await Api(http, stack.gateway.url, key).wait_key_active()
    pool = await stack.pipeline.store.connect()

    async def finished() -> bool:
        row = await pool.fetchrow(
            "SELECT count(*) FILTER (WHERE status = 'completed') AS done,"
            " count(*) FILTER (WHERE status = ANY($2::text[])) AS bad"
            " FROM requests WHERE user_id = $1",
            user,
            list(TERMINAL_FAILURES),
        )
        if row["bad"]:
            raise RuntimeError(f"{row['bad']} requests of {user} did not complete")
        return bool(row["done"] == len(bodies))

    before = await model_counters(http, stack.ml)
    started = time.perf_counter()
    await submit_all(api, bodies, concurrency)
    what = f"{len(bodies)} requests of {user} completed"
    await wait_for(finished, timeout=timeout, interval=0.05, what=what)
    elapsed = time.perf_counter() - started
    after = await model_counters(http, stack.ml)
    calls, texts = after["calls"] - before["calls"], after["texts"] - before["texts"]
    return PipelineRun(len(bodies), elapsed, calls, texts)


def progress(what: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {what}", flush=True)


async def start_workers(pipeline: Pipeline, args: argparse.Namespace) -> dict[str, WorkerProcess]:
    extra = worker_settings(args.worker_env)
    roles = TOPOLOGIES[args.topology]
    started = [pipeline.start_worker(wait=False, **{**extra, "roles": r}) for r in roles.values()]
    workers = dict(zip(roles, await asyncio.gather(*started), strict=True))
    await asyncio.gather(*(w.wait_ready(120) for w in workers.values()))
    return workers


async def run(args: argparse.Namespace) -> None:
    port = free_port()
    threads = args.torch_threads or (1 if args.pin else 2)
    with starting_on({MODEL_CPU} if args.pin else None):
        model_proc = start_modelserver(port, "--torch-threads", str(threads))
    services = ServicePins()
    try:
        if args.pin and args.pin_services:
            services.pin({REST_CPU})
        with LocalBroker() as broker:
            model_url = f"http://{HOST}:{port}"
            await wait_healthy(model_url, time.monotonic() + 120, model_proc)
            progress(f"model server ready ({threads} torch threads)")
            pipeline = await Pipeline.create(broker.url, model_url + "/v1")
            try:
                await pipeline.set_plan(
                    "bench",
                    requests_per_day=10**9,
                    tokens_per_day=10**12,
                    requests_per_minute=10**9,
                )
                workers = await start_workers(pipeline, args)
                for name, w in workers.items():
                    progress(f"{name} ready, log {w.log_path}")
                roles = TOPOLOGIES[args.topology]
                gateway = next(w for n, w in workers.items() if "pipeline" in roles[n])
                ml = next(w for n, w in workers.items() if "ml" in roles[n])
                stack = Stack(pipeline, gateway, ml, model_url)
                placement = {
                    "model server": affinity(model_proc.pid),
                    "this process": affinity(os.getpid()),
                    "Tansu": affinity(broker.pid) if broker.pid else "?",
                    **{name: affinity(w.proc.pid) for name, w in workers.items() if w.proc},
                }
                await measure_all(args, stack, placement, services.outcome)
            finally:
                await pipeline.cleanup()
    finally:
        services.restore()
        stop_modelserver(model_proc)


async def measure_all(
    args: argparse.Namespace, stack: Stack, placement: dict[str, str], services: dict[str, str]
) -> None:
    texts = sentences(args.requests + 256)
    embed = [{"task": "embed", "model": MODEL, "input": t} for t in texts]
    generate = [
        {"task": "generate", "input": t, "params": {"max_tokens": 16}}
        for t in texts[: args.requests]
    ]
    timeout = max(120.0, args.requests / 20)
    limit = aiohttp.TCPConnector(limit=args.concurrency + 8)
    url, batch, seconds, concurrency = stack.model_url, args.batch, args.seconds, args.concurrency
    async with aiohttp.ClientSession(connector=limit) as http:
        # Warm-up: the first calls of each path pay for lazy connections and imports.
        await measure(http, url, batch, 1.0)
        await through_pipeline(stack, http, "bench-warm", embed[-256:], concurrency, timeout)
        progress("warmed up")

        single = await measure(http, url, 1, seconds)
        progress(f"direct unbatched: {single:.1f}/s")
        batched = await measure(http, url, batch, seconds)
        progress(f"direct batched: {batched:.1f}/s")
        emb = await through_pipeline(
            stack, http, "bench-embed", embed[: args.requests], concurrency, timeout
        )
        progress(f"pipeline embeddings: {emb.rate:.1f}/s")
        # Measured again after the pipeline: the mean evens out drift in what else runs on the machine.
        batched_after = await measure(http, url, batch, seconds)
        progress(f"direct batched again: {batched_after:.1f}/s")
        batched = (batched + batched_after) / 2
        gen = await through_pipeline(stack, http, "bench-generate", generate, concurrency, timeout)

    where = ", ".join(f"{name} {cpus}" for name, cpus in placement.items())
    print(f"topology {args.topology}; CPUs: {where}")
    if args.pin:
        shown = (
            ", ".join(f"{name} {what}" for name, what in services.items()) or "float (not pinned)"
        )
        print(f"services: {shown}")
    on = f" on CPU {MODEL_CPU}" if args.pin else ""
    print(f"direct{on}, one text per call     : {single:8.1f} embeddings/s")
    print(f"direct{on}, batches of {batch:<3}        : {batched:8.1f} embeddings/s  (mean of before and after)")  # fmt: skip
    per_call = emb.texts / max(emb.model_calls, 1)
    print(
        f"pipeline, {emb.requests} single-text requests: {emb.rate:8.1f} embeddings/s"
        f"  ({emb.seconds:.1f} s, {emb.model_calls:.0f} model calls, {per_call:.1f} texts/call)"
    )
    print(f"pipeline / direct batched     : {emb.rate / batched:8.2f}  (target >= {TARGET_BATCHED:.2f})")  # fmt: skip
    print(f"pipeline / direct unbatched   : {emb.rate / single:8.2f}  (target >= {TARGET_UNBATCHED:.2f})")  # fmt: skip
    print(f"pipeline, generate at 0 ms    : {gen.rate:8.1f} requests/s  ({gen.requests} in {gen.seconds:.1f} s)")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=3000, help="requests per pipeline phase")
    parser.add_argument("--concurrency", type=int, default=64, help="HTTP submissions in flight")
    parser.add_argument("--seconds", type=float, default=5.0, help="duration of each direct mode")
    parser.add_argument("--batch", type=int, default=32, help="texts per direct batched call")
    parser.add_argument("--topology", choices=sorted(TOPOLOGIES), default="split")
    parser.add_argument(
        "--pin",
        action=argparse.BooleanOptionalAction,
        default=cpus_available() >= 2,
        help=f"model server on CPU {MODEL_CPU}, everything else on CPU {REST_CPU} (default with 2+ CPUs)",
    )
    parser.add_argument(
        "--pin-services",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="with --pin, re-pin RabbitMQ, PostgreSQL and Redis for the run (put back after)",
    )
    parser.add_argument(
        "--torch-threads", type=int, help="the model server's torch threads (1 pinned, else 2)"
    )
    parser.add_argument(
        "--worker-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra INFERSTREAM_* setting of the workers, without the prefix",
    )
    args = parser.parse_args()
    if args.pin:
        if cpus_available() < 2:
            parser.error("--pin needs 2 CPUs")
        os.sched_setaffinity(0, {REST_CPU})  # this process, and everything it starts but the model
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
