"""Request ids that sort by creation time, so 'newest first' is 'id descending'."""

from __future__ import annotations

import os
import time


def new_request_id(now: float | None = None) -> str:
    """``req_`` + 12 hex digits of milliseconds + 12 random hex digits."""
    ms = int((time.time() if now is None else now) * 1000)
    return f"req_{ms:012x}{os.urandom(6).hex()}"


def is_request_id(value: str) -> bool:
    if len(value) != 28 or not value.startswith("req_"):
        return False
    try:
        int(value[4:], 16)
    except ValueError:
        return False
    return True
