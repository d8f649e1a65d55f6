"""Tables whose latest changelog write of a key can be awaited (the ack a writer needs before it answers)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any

import faust
from faust.types import TP, FutureMessage, TableT


class AckedTable(faust.Table):
    """A table whose latest changelog write of a key can be awaited.

    Faust sends a table's changelog entry in the background (``send_soon``) and
    drops the future. A view that answers "admitted" before the broker holds
    that entry can lose the admission in a kill -9: the restarted worker
    recovers the table from the changelog and admits past the limit (seen: 73
    answered 202 before the kill, 62 recovered). Writers await :meth:`written`
    before they answer.
    """

    _acks: dict[Any, FutureMessage]

    def send_changelog(self, partition: int | None, key: Any, value: Any, *args: Any, **kwargs: Any) -> FutureMessage:
        fut = super().send_changelog(partition, key, value, *args, **kwargs)
        acks = self.__dict__.setdefault("_acks", {})
        acks[key] = fut
        # One entry per key with a write in flight; per-partition order makes the latest ack cover earlier ones.
        fut.add_done_callback(lambda done: acks.pop(key) if acks.get(key) is done else None)
        return fut

    def written(self, key: Any) -> Awaitable[Any]:
        """Resolves when the broker acknowledged the latest changelog write of ``key``."""
        fut: FutureMessage | None = self.__dict__.get("_acks", {}).get(key)
        # Shielded: a caller's timeout must not cancel Faust's future (Faust would then
        # fail to set its result, in a producer callback).
        return asyncio.shield(fut) if fut is not None else _done()


def changelog_written(table: Any, key: Any) -> Awaitable[Any]:
    """The ack of ``table``'s latest changelog write of ``key``; done at once for a plain mapping."""
    return table.written(key) if isinstance(table, AckedTable) else _done()


def _done() -> asyncio.Future[None]:
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    done.set_result(None)
    return done


def changelog_partition(table: TableT, key: Any) -> TP:
    """The changelog partition the producer's partitioner picks for ``key``: where a
    ``use_partitioner`` table writes it, and so which worker owns it."""
    changelog = table.changelog_topic
    key_bytes = changelog.prepare_key(key, None)[0]
    return table.app.producer.key_partition(changelog.get_topic_name(), key_bytes)
