"""Idempotency-Key memory: per user, partitioned like the quota table, 24 hours.

The ``idempotency`` table maps ``user_id`` to ``{idempotency_key: entry}``; an
entry keeps a fingerprint of the request body and the first answer (status,
headers, body). Same key as the quota table, same partitioner, so both live on
the worker that owns the user. :class:`IdempotencyBook` is its only writer.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from inferstream import clock
from inferstream.errors import IdempotencyMismatch
from tables.acked import changelog_written

Entries = dict[str, dict[str, Any]]


def fingerprint(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


class IdempotencyBook:
    def __init__(
        self, table: MutableMapping[str, Entries], ttl_s: float, now: Callable[[], float] = clock.now
    ) -> None:
        self.table = table
        self.ttl_s = ttl_s
        self.now = now

    def lookup(self, user_id: str, key: str, body_fingerprint: str) -> dict[str, Any] | None:
        """The first answer for this key, or None; raises when the body differs."""
        entry = (self.table.get(user_id) or {}).get(key)
        if entry is None or entry["at"] + self.ttl_s < self.now():
            return None
        if entry["fingerprint"] != body_fingerprint:
            raise IdempotencyMismatch(
                "this Idempotency-Key was used with a different request body",
                idempotency_key=key,
                request_id=entry["response"]["body"].get("request_id"),
            )
        response: dict[str, Any] = entry["response"]
        return response

    def remember(self, user_id: str, key: str, body_fingerprint: str, response: dict[str, Any]) -> None:
        now = self.now()
        live = {k: v for k, v in (self.table.get(user_id) or {}).items() if v["at"] + self.ttl_s >= now}
        live[key] = {"fingerprint": body_fingerprint, "at": now, "response": response}
        self.table[user_id] = live

    def written(self, user_id: str) -> Awaitable[Any]:
        """Resolves once the broker holds this user's latest write."""
        return changelog_written(self.table, user_id)

    def forget(self, user_id: str, key: str) -> None:
        entries = dict(self.table.get(user_id) or {})
        if entries.pop(key, None) is not None:
            self.table[user_id] = entries
