"""Embeddings per second from the model server directly: one text per request vs batches.

Run from the repository root: ``python -m bench.direct_model [--url http://H:P] [--seconds 8] [--pin]``.
Without ``--url`` it starts its own server (``python -m modelserver``) on a free port;
``--pin`` runs that server on CPU 1 alone with one torch thread and this client on
CPU 0 (what ``taskset -c`` does), the setting of ``bench.batching --pin``.
Both modes send requests one after another, so the figures compare the cost of
a model call per text with one model call per batch; report the ratio, not the
absolute numbers, which depend on the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
MODEL = "all-MiniLM-L6-v2"
MODEL_CPU = 1  # with pinning: the model server's core
REST_CPU = 0  # with pinning: everything else's
WORDS = (
    "the a quick slow model stream worker queue request result user answer log event "
    "reads writes sends waits fails retries finishes starts with from over under into "
    "data table partition broker message batch token quota limit window day night"
).split()


def sentences(n: int) -> list[str]:
    """``n`` distinct, deterministic short sentences (8 to 15 words)."""
    out = []
    for i in range(n):
        digest = hashlib.sha256(str(i).encode()).digest()
        length = 8 + digest[0] % 8
        out.append(" ".join(WORDS[b % len(WORDS)] for b in digest[1 : 1 + length]) + ".")
    return out


def cpus_available() -> int:
    return len(os.sched_getaffinity(0))


@contextlib.contextmanager
def starting_on(cpus: set[int] | None) -> Iterator[None]:
    """Processes started in the block run on ``cpus`` from their first instruction (None: unchanged).

    Sets the calling thread's affinity for the block, which a child inherits at
    fork, so no thread of the child ever runs elsewhere (``taskset -c``).
    """
    if cpus is None:
        yield
        return
    saved = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, saved)


def affinity(pid: int) -> str:
    """The CPUs the threads of ``pid`` may run on, as ``taskset`` lists them ("0", "1", "0-1")."""
    cpus: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(ProcessLookupError):
            cpus |= os.sched_getaffinity(int(task.name))
    ordered = sorted(cpus)
    if len(ordered) > 1 and ordered == list(range(ordered[0], ordered[-1] + 1)):
        return f"{ordered[0]}-{ordered[-1]}"
    return ",".join(map(str, ordered))


async def measure(session: aiohttp.ClientSession, url: str, batch: int, seconds: float) -> float:
    """Texts embedded per second, sending ``batch`` texts per request for about ``seconds``."""
    texts = sentences(4096)
    done = 0
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        chunk = [texts[(done + i) % len(texts)] for i in range(batch)]
        async with session.post(f"{url}/v1/embeddings", json={"model": MODEL, "input": chunk}) as r:
            r.raise_for_status()
            body = await r.json()
        assert len(body["data"]) == batch
        done += batch
    return done / (time.perf_counter() - started)


async def run(url: str, seconds: float, batch: int) -> dict[str, float]:
    async with aiohttp.ClientSession() as session:
        await measure(session, url, batch, 1.0)  # warm-up: first calls pay for lazy init
        single = await measure(session, url, 1, seconds)
        batched = await measure(session, url, batch, seconds)
    return {"single": single, "batched": batched, "ratio": batched / single}


async def main_async(args: argparse.Namespace) -> dict[str, float]:
    if args.url:
        return await run(args.url.rstrip("/"), args.seconds, args.batch)
    sys.path.insert(0, str(ROOT))
    from tests.support.modelserver import (
        HOST,
        free_port,
        start_modelserver,
        stop_modelserver,
        wait_healthy,
    )

    port = free_port()
    threads = ["--torch-threads", "1"] if args.pin else []
    with starting_on({MODEL_CPU} if args.pin else None):
        proc = start_modelserver(port, *threads)
    try:
        url = f"http://{HOST}:{port}"
        started = time.monotonic()
        await wait_healthy(url, started + 90, proc)
        print(f"server ready in {time.monotonic() - started:.1f} s", flush=True)
        if args.pin:
            print(
                f"model server on CPU {affinity(proc.pid)}, this client on CPU {affinity(os.getpid())}"
            )
        return await run(url, args.seconds, args.batch)
    finally:
        stop_modelserver(proc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", help="an already running model server (base URL, no /v1)")
    parser.add_argument("--seconds", type=float, default=8.0, help="duration of each mode")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument(
        "--pin",
        action="store_true",
        help=f"the server on CPU {MODEL_CPU} with one torch thread, this client on CPU {REST_CPU}",
    )
    args = parser.parse_args()
    if args.pin:
        if args.url or cpus_available() < 2:
            parser.error("--pin needs 2 CPUs and a server this script starts (no --url)")
        os.sched_setaffinity(0, {REST_CPU})
    result = asyncio.run(main_async(args))
    print(f"one text per request: {result['single']:8.1f} embeddings/s")
    print(f"batches of {args.batch:<3}       : {result['batched']:8.1f} embeddings/s")
    print(f"ratio batched/single: {result['ratio']:8.2f}x")


if __name__ == "__main__":
    main()
