"""Declares the changelog-backed tables on the app; the books in this package are their writers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import faust

from inferstream.settings import Settings
from tables import rocksdb_store
from tables.acked import AckedTable
from tables.reservations import ReservationTable


@dataclass(frozen=True)
class StateTables:
    quota: AckedTable
    reservations: AckedTable
    idempotency: AckedTable
    batches: AckedTable


def _acked_table(
    app: faust.App, name: str, cls: type[AckedTable] = AckedTable, **kwargs: Any
) -> AckedTable:
    # What ``app.Table`` does, with our class.
    table = cls(app, name=name, beacon=app.tables.beacon, **kwargs)
    app.tables.add(table)
    return table


def define_tables(app: faust.App, settings: Settings) -> StateTables:
    rocksdb_store.install()
    # use_partitioner=True lets the owning worker write from a web view, and puts
    # each user on the partition the default partitioner picks for ``user_id``:
    # the same partition the requests and results topics (same key, same
    # partition count) carry that user on.
    quota = _acked_table(
        app,
        "quota",
        default=None,
        key_type=str,
        partitions=settings.partitions,
        use_partitioner=True,
        help="user_id -> quota state of the current UTC day (tables.quota)",
    )
    reservations = _acked_table(
        app,
        "reservations",
        ReservationTable,
        default=None,
        key_type=str,
        partitions=settings.partitions,
        use_partitioner=True,  # ReservationTable picks the partition of the key's user
        help="request_id/user_id -> [estimated tokens, day] of a confirmed request in flight (tables.reservations)",
    )
    idempotency = _acked_table(
        app,
        "idempotency",
        default=None,
        key_type=str,
        partitions=settings.partitions,
        use_partitioner=True,
        help="user_id -> {Idempotency-Key: first answer} (tables.idempotency)",
    )
    batches = _acked_table(
        app,
        "batches",
        ReservationTable,
        default=None,
        key_type=str,
        partitions=settings.partitions,
        use_partitioner=True,  # ReservationTable picks the partition of the key's user
        help="batch_id/user_id -> live state and progress of an OpenAI-style batch (tables.batches)",
    )
    return StateTables(
        quota=quota, reservations=reservations, idempotency=idempotency, batches=batches
    )
