"""Keeps a batch's offsets unacked while its processing fails, whatever the failure.

faust-streaming acks an event whose agent raised and restarts the agent, so an
exception would silently drop the batch (FINDINGS.md). Transient faults are
retried inside the bridges; anything that still escapes (a missing table after
a bad deploy, a bug) is retried here with capped backoff and logged with its
traceback each time, so the partition stalls visibly instead of losing data.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable

from prometheus_client import Counter

log = logging.getLogger(__name__)

STALLS = Counter(
    "inferstream_agent_batch_failures_total", "Agent batches that failed and will be retried", ["agent"]
)


async def until_done(agent: str, work: Callable[[], Awaitable[None]], *, cap_s: float = 30.0) -> None:
    attempt = 0
    while True:
        try:
            await work()
            return
        except asyncio.CancelledError:
            raise
        except Exception:  # see the module docstring: never let Faust ack a failed batch
            attempt += 1
            STALLS.labels(agent).inc()
            log.exception("%s: batch failed (attempt %d); retrying, offsets held", agent, attempt)
            await asyncio.sleep(random.uniform(0, min(cap_s, 0.2 * 2 ** min(attempt, 10))))
