"""The tokens each confirmed request holds until its result settles: one small table entry per request in flight.

A user's quota state (:mod:`tables.quota`) is counters plus the admissions not
yet read back from the log, so writing it costs the same however many requests
the user has in flight. What each request in flight reserved lives here, in the
``reservations`` table: key ``request_id/user_id``, value ``[estimated, day]``.
An entry is written when the forward agent reads its request from the log and
removed when its terminal result settles; a second terminal result of the same
request finds no entry and changes nothing.

Every entry goes to the changelog partition of its *user* (the partition of the
user's requests, results and quota state), never to the one the whole key would
hash to: :class:`ReservationTable` picks it, so the worker that owns a user owns
that user's reservations too, and recovers them with the user's quota.
"""

from __future__ import annotations

from collections.abc import Awaitable, Mapping, MutableMapping
from typing import Any, TypeAlias

from tables.acked import AckedTable, changelog_partition, changelog_written

SEP = "/"  # request ids never contain it; user ids may: the user is everything after the first one
Reservation: TypeAlias = list[Any]  # [estimated tokens, quota day]


def reservation_key(request_id: str, user_id: str) -> str:
    return f"{request_id}{SEP}{user_id}"


def user_of(key: str) -> str:
    """The part of a reservation key its partition is chosen by."""
    return key.split(SEP, 1)[-1]


class ReservationTable(AckedTable):
    """An :class:`AckedTable` whose entries are partitioned by the user part of their key."""

    def partition_for_key(self, key: Any) -> int | None:
        """The partition of the key's user (the RocksDB store asks this too: :mod:`tables.rocksdb_store`)."""
        return int(changelog_partition(self, user_of(key)).partition)


class Reservations:
    """Reads and writes of the ``reservations`` table (a plain dict in unit tests)."""

    def __init__(self, table: MutableMapping[str, Reservation] | None = None) -> None:
        self.table: MutableMapping[str, Reservation] = {} if table is None else table

    def hold(self, user_id: str, request_id: str, estimated: int, day: str) -> None:
        self.table[reservation_key(request_id, user_id)] = [estimated, day]

    def get(self, user_id: str, request_id: str) -> tuple[int, str] | None:
        entry = self.table.get(reservation_key(request_id, user_id))
        return None if entry is None else (int(entry[0]), str(entry[1]))

    def drop(self, user_id: str, request_id: str) -> None:
        key = reservation_key(request_id, user_id)
        if key in self.table:
            del self.table[key]

    def written(self, user_id: str, request_id: str) -> Awaitable[Any]:
        """The broker's ack of the entry's latest write (or removal)."""
        return changelog_written(self.table, reservation_key(request_id, user_id))

    def held(self) -> Mapping[str, Reservation]:
        return self.table
