"""Token bucket arithmetic (fake clock) and its real-time pacing."""

from __future__ import annotations

import asyncio
import time

from workers.ratelimit import TokenBucket


def test_bucket_refills_at_rate_up_to_burst() -> None:
    now = [0.0]
    b = TokenBucket(10.0, burst=2, clock=lambda: now[0])
    assert b.try_acquire() == 0 and b.try_acquire() == 0
    assert abs(b.try_acquire() - 0.1) < 1e-9
    now[0] = 0.05
    assert abs(b.try_acquire() - 0.05) < 1e-9
    now[0] = 10.0
    assert b.try_acquire() == 0 and b.try_acquire() == 0 and b.try_acquire() > 0


async def test_zero_rate_is_unlimited_and_a_rate_paces_calls() -> None:
    assert TokenBucket(0).unlimited
    await asyncio.gather(*(TokenBucket(0).acquire() for _ in range(1000)))
    b = TokenBucket(50.0, burst=1)
    start = time.monotonic()
    await asyncio.gather(*(b.acquire() for _ in range(11)))
    assert time.monotonic() - start >= 0.19  # 10 tokens after the first at 50/s
