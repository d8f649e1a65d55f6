"""Wall-clock access in one injectable place, so tests can cross UTC midnight."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime

Clock = Callable[[], float]

_offset = 0.0


def now() -> float:
    """Seconds since the epoch, plus any offset a test injected."""
    return time.time() + _offset


def set_offset(seconds: float) -> None:
    """Shift this process's clock (tests and the INFERSTREAM_CLOCK_OFFSET_S hook only)."""
    global _offset
    _offset = seconds


def utc_day(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d")


def day_start(ts: float) -> float:
    return float(int(ts // 86_400) * 86_400)


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
