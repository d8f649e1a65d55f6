"""Declares the changelog-backed tables on the app; the books in this package are their writers."""

from __future__ import annotations

from dataclasses import dataclass

import faust
from faust.types import TableT

from inferstream.settings import Settings


@dataclass(frozen=True)
class StateTables:
    quota: TableT
    idempotency: TableT


def define_tables(app: faust.App, settings: Settings) -> StateTables:
    # use_partitioner=True lets the owning worker write from a web view, and puts
    # each user on the partition the default partitioner picks for ``user_id``:
    # the same partition the requests and results topics (same key, same
    # partition count) carry that user on.
    quota = app.Table(
        "quota",
        default=None,
        key_type=str,
        partitions=settings.partitions,
        use_partitioner=True,
        help="user_id -> quota state of the current UTC day (tables.quota)",
    )
    idempotency = app.Table(
        "idempotency",
        default=None,
        key_type=str,
        partitions=settings.partitions,
        use_partitioner=True,
        help="user_id -> {Idempotency-Key: first answer} (tables.idempotency)",
    )
    return StateTables(quota=quota, idempotency=idempotency)
