"""The tests' one wait-until helper: poll a check (plain or async) until it answers something truthy."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable
from typing import Any


async def wait_for(
    check: Callable[[], Any],
    *,
    timeout: float,
    interval: float = 0.05,
    what: str = "condition",
) -> Any:
    """Return ``check()``'s first truthy answer (awaited when it is awaitable); fail after ``timeout`` seconds.

    The check runs at least once, and once more at the deadline, so a slow poll cannot miss the end.
    """
    deadline = time.monotonic() + timeout
    while True:
        last = check()
        if inspect.isawaitable(last):
            last = await last
        if last:
            return last
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"timed out after {timeout}s waiting for {what}; last value: {last!r}"
            )
        await asyncio.sleep(interval)
