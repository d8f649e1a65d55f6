"""Wall-clock access in one injectable place, so tests can cross UTC midnight."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime

Clock = Callable[[], float]


def now() -> float:
    """Seconds since the epoch (tests hand a :data:`Clock` of their own where time matters)."""
    return time.time()


def utc_day(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d")


def day_start(ts: float) -> float:
    return float(int(ts // 86_400) * 86_400)


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
