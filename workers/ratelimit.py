"""A token bucket limiting model calls per endpoint (calls per second; 0 means unlimited)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


class TokenBucket:
    """``rate`` tokens a second, holding at most ``burst``; ``acquire()`` waits for one token.

    Waiters are served in arrival order (one lock), so nobody starves.
    """

    def __init__(self, rate: float, burst: float | None = None, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = burst if burst is not None else max(1.0, rate)
        self._clock = clock
        self._tokens = self.burst
        self._updated = clock()
        self._lock = asyncio.Lock()

    @property
    def unlimited(self) -> bool:
        return self.rate <= 0

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._updated) * self.rate)
        self._updated = now

    def try_acquire(self) -> float:
        """Take a token if there is one and return 0, else return the seconds until there is."""
        if self.unlimited:
            return 0.0
        self._refill()
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return 0.0
        return (1.0 - self._tokens) / self.rate

    async def acquire(self) -> None:
        if self.unlimited:
            return
        async with self._lock:
            wait = self.try_acquire()
            if wait > 0:
                await asyncio.sleep(wait)
                # The token we waited for has accrued; float rounding may leave a tiny debt, which is fine.
                self._refill()
                self._tokens -= 1.0
