"""Embeddings per second from the model server directly: one text per request vs batches.

Run from the repository root: ``python -m bench.direct_model [--url http://H:P] [--seconds 8]``.
Without ``--url`` it starts its own server (``python -m modelserver``) on a free port.
Both modes send requests one after another, so the figures compare the cost of
a model call per text with one model call per batch; report the ratio, not the
absolute numbers, which depend on the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import sys
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
MODEL = "all-MiniLM-L6-v2"
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
    proc = start_modelserver(port)
    try:
        url = f"http://{HOST}:{port}"
        started = time.monotonic()
        await wait_healthy(url, started + 90, proc)
        print(f"server ready in {time.monotonic() - started:.1f} s", flush=True)
        return await run(url, args.seconds, args.batch)
    finally:
        stop_modelserver(proc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", help="an already running model server (base URL, no /v1)")
    parser.add_argument("--seconds", type=float, default=8.0, help="duration of each mode")
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    result = asyncio.run(main_async(args))
    print(f"one text per request: {result['single']:8.1f} embeddings/s")
    print(f"batches of {args.batch:<3}       : {result['batched']:8.1f} embeddings/s")
    print(f"ratio batched/single: {result['ratio']:8.2f}x")


if __name__ == "__main__":
    main()
