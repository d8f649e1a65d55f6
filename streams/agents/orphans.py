"""Timer: releases quota reservations whose request never reached the log (a crash between charge and write).

Admission awaits the reservation's changelog ack, then writes the request to
the log. A worker killed between the two leaves a reservation no result will
settle, and the user's allowance leaks until the day ends. The forward agent
confirms every admission whose request it reads (:mod:`streams.agents.forward`);
this sweep releases the ones that stay pending past the rules of
:func:`tables.quota.orphans`. Every pipeline worker runs it, for the users of
the partitions it actively owns (never for a standby replica's: only the owner
writes a user's quota), and only once its tables are recovered.
"""

from __future__ import annotations

import logging

import faust
from faust.types import TableT

from inferstream.settings import Settings
from streams.agents import metrics
from streams.quirks import known_to_producer, tables_recovered
from tables.acked import changelog_partition
from tables.quota import orphans
from tables.quota_book import QuotaBook

log = logging.getLogger(__name__)

SWEEP_INTERVAL_S = 5.0


def owns(app: faust.App, table: TableT, user_id: str) -> bool:
    """Whether this worker actively owns ``user_id``'s quota partition (a standby copy is not ownership)."""
    return bool(app.assignor.is_active(changelog_partition(table, user_id)))


def sweep(app: faust.App, table: TableT, book: QuotaBook, settings: Settings) -> dict[str, int]:
    """Release the orphans of the users this worker owns; how many admissions released, per user."""
    if app.rebalancing or not tables_recovered(app):
        return {}
    if not known_to_producer(app, table.changelog_topic.get_topic_name()):
        return {}  # the partition of a key cannot be told yet
    now = book.now()
    timeout, bound = settings.admission_timeout_s, settings.orphan_reservation_s
    # Cheap rules first: the ownership check hashes the key, and most users have nothing pending.
    candidates = [user for user, state in list(table.items()) if orphans(state, now, timeout, bound)]
    released: dict[str, int] = {}
    for user in candidates:
        if owns(app, table, user):
            count = book.release_orphans(user, timeout, bound)
            if count:
                released[user] = count
    return released


def register_orphan_sweep(app: faust.App, settings: Settings, table: TableT, book: QuotaBook) -> None:
    @app.timer(interval=SWEEP_INTERVAL_S)
    async def release_orphan_reservations() -> None:
        # Not awaiting the writes' acks: a release lost in a crash is found again by the next sweep.
        for user, count in sweep(app, table, book, settings).items():
            metrics.ORPHANS_RELEASED.inc(count)
            log.warning(
                "released %d orphaned admissions of user %r (their requests were not read from the log in time)",
                count, user,
            )  # fmt: skip
