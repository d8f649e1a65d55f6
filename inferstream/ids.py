"""Request ids that sort by creation time, so 'newest first' is 'id descending'."""

from __future__ import annotations

import hashlib
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


def new_batch_id(now: float | None = None) -> str:
    """``batch_`` + 12 hex digits of milliseconds + 12 random hex digits (sorts by creation time)."""
    ms = int((time.time() if now is None else now) * 1000)
    return f"batch_{ms:012x}{os.urandom(6).hex()}"


def new_file_id(now: float | None = None) -> str:
    """``file-`` + 12 hex digits of milliseconds + 12 random hex digits (OpenAI's ``file-`` prefix)."""
    ms = int((time.time() if now is None else now) * 1000)
    return f"file-{ms:012x}{os.urandom(6).hex()}"


def batch_line_id(batch_id: str, line: int) -> str:
    """The request id of line ``line`` (0-based) of a batch: a request id, the same every time it is
    derived (a batch written twice after a crash gives its lines the same ids), sorting with its batch."""
    ms = batch_id[len("batch_") : len("batch_") + 12]
    digest = hashlib.sha256(f"{batch_id}:{line}".encode()).hexdigest()[:12]
    return f"req_{ms}{digest}"


def is_batch_id(value: str) -> bool:
    if len(value) != 30 or not value.startswith("batch_"):
        return False
    try:
        int(value[6:], 16)
    except ValueError:
        return False
    return True


def is_file_id(value: str) -> bool:
    if len(value) != 29 or not value.startswith("file-"):
        return False
    try:
        int(value[5:], 16)
    except ValueError:
        return False
    return True
