"""A circuit breaker per model endpoint: closed, open after consecutive failures, half-open probes.

Closed: every call passes; ``threshold`` failures in a row open it. Open: no
call passes until ``reset_s`` has gone by; then it is half-open and exactly one
caller gets through as the probe while the others wait. The probe's success
closes the breaker, its failure opens it again for another ``reset_s``.
A fatal (4xx) answer counts as a success here: the endpoint answered.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Literal

BreakerState = Literal["closed", "open", "half_open"]
STATE_VALUE: dict[str, int] = {"closed": 0, "half_open": 1, "open": 2}

log = logging.getLogger(__name__)


class CircuitBreaker:
    """Async circuit breaker; ``acquire()`` returns whether the caller is the half-open probe."""

    def __init__(
        self,
        name: str,
        threshold: int,
        reset_s: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[str, BreakerState, BreakerState], None] | None = None,
    ) -> None:
        self.name = name
        self.threshold = max(1, threshold)
        self.reset_s = reset_s
        self._clock = clock
        self._on_change = on_change
        self._state: BreakerState = "closed"
        self._failures = 0
        self._opened_at = 0.0
        self._probe_out = False
        self._changed = asyncio.Event()

    @property
    def state(self) -> BreakerState:
        """The state now; an open breaker whose time is up reads (and becomes) half-open."""
        if self._state == "open" and self._clock() - self._opened_at >= self.reset_s:
            self._set("half_open")
        return self._state

    @property
    def consecutive_failures(self) -> int:
        return self._failures

    def _set(self, new: BreakerState) -> None:
        old, self._state = self._state, new
        if old == new:
            return
        if new == "open":
            self._opened_at = self._clock()
        level = logging.WARNING if new == "open" else logging.INFO
        log.log(level, "circuit breaker %s: %s -> %s", self.name, old, new)
        if self._on_change is not None:
            self._on_change(self.name, old, new)
        self._changed.set()
        self._changed = asyncio.Event()

    def try_acquire(self) -> bool | None:
        """Without waiting: None when no call may go out now, else whether this caller is the probe."""
        state = self.state
        if state == "closed":
            return False
        if state == "half_open" and not self._probe_out:
            self._probe_out = True
            return True
        return None

    @property
    def probe_free(self) -> bool:
        """Half-open with nobody probing: the next caller would be the probe."""
        return self.state == "half_open" and not self._probe_out

    def seconds_until_probe(self) -> float | None:
        """How long an open breaker stays shut (0 when a probe may go now); None when not open."""
        if self.state != "open":
            return None
        return max(0.0, self.reset_s - (self._clock() - self._opened_at))

    async def acquire(self) -> bool:
        """Wait until a call may go out. True when this caller is the half-open probe."""
        while True:
            probe = self.try_acquire()
            if probe is not None:
                return probe
            timeout = self.seconds_until_probe()
            try:
                await asyncio.wait_for(self._changed.wait(), timeout)
            except TimeoutError:
                pass

    def on_success(self, probe: bool) -> None:
        if probe:
            self._probe_out = False
        self._failures = 0
        # A call that started before the breaker opened proves little; only the probe closes it.
        if self._state == "half_open" and probe:
            self._set("closed")

    def on_failure(self, probe: bool) -> None:
        if probe:
            self._probe_out = False
        self._failures += 1
        if self._state == "half_open" and probe:
            self._set("open")
        elif self._state == "closed" and self._failures >= self.threshold:
            self._set("open")

    def release(self, probe: bool) -> None:
        """The call was abandoned (cancelled) without an answer: let another caller probe."""
        if probe:
            self._probe_out = False
            self._changed.set()
            self._changed = asyncio.Event()
