"""The writer of the ``quota`` and ``reservations`` tables: the rules of :mod:`tables.quota` applied to them.

Checks and writes are synchronous (no ``await`` between a read and its write);
the methods that await do so only for the broker's acks, in the order that
keeps a crash from losing or doubling anything (see each method).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, MutableMapping, Sequence
from typing import Any

from inferstream import clock
from schemas.plans import Plan
from tables.acked import changelog_written
from tables.quota import (
    Admission,
    Logged,
    Settlement,
    StoredState,
    admission_of,
    confirm,
    current,
    decide,
    decide_batch,
    orphans,
    quota_doc,
    release,
    release_batch,
    release_buckets,
    settle,
)
from tables.reservations import Reservations

UNLOGGED_KEEP_S = 600.0
UNLOGGED_PRUNE_AT = 10_000


class QuotaBook:
    """The only writer of the ``quota`` and ``reservations`` tables; no await between a read and its write."""

    def __init__(
        self,
        table: MutableMapping[str, StoredState],
        reservations: Reservations | None = None,
        now: Callable[[], float] = clock.now,
    ) -> None:
        self.table = table
        self.reservations = Reservations() if reservations is None else reservations
        self.now = now
        # Admissions of this process whose request the forward agent has not read yet: what the
        # gateway may still give back (kept in memory: a crash ends the admission with the process).
        # Request id -> when admitted; an admission ended some other way (its handler cancelled before
        # the write) is dropped after UNLOGGED_KEEP_S, long past any admission timeout.
        self._unlogged: dict[str, float] = {}
        self._pruned_at = 0.0

    def admit(self, user_id: str, plan: Plan, request_id: str, estimated: int, at: float | None = None) -> Admission:
        """``at`` must be the request's ``created_at``: its pending bucket is found again by it."""
        now = self.now() if at is None else at
        new, admission = decide(self.table.get(user_id), plan, request_id, estimated, now)
        self.table[user_id] = new
        self._unlogged[request_id] = now
        if len(self._unlogged) > UNLOGGED_PRUNE_AT and now - self._pruned_at > UNLOGGED_KEEP_S / 10:
            horizon, self._pruned_at = now - UNLOGGED_KEEP_S, now
            self._unlogged = {rid: when for rid, when in self._unlogged.items() if when >= horizon}
        return admission

    def admit_batch(self, user_id: str, plan: Plan, batch_id: str, lines: int, estimated: int) -> Admission:
        """Charge a whole batch at once (or raise ``QuotaExceeded`` saying what is missing); await
        :meth:`written` before any of its lines is written."""
        new, admission = decide_batch(self.table.get(user_id), plan, batch_id, lines, estimated, self.now())
        self.table[user_id] = new
        return admission

    def release_batch(self, user_id: str, batch_id: str, lines: int, estimated: int) -> bool:
        """Undo a batch's charge when its creation failed before any line was written."""
        new = release_batch(self.table.get(user_id), batch_id, lines, estimated, self.now())
        if new is None:
            return False
        self.table[user_id] = new
        return True

    def logged(self, request_id: str) -> None:
        """The admission's request is in the log (the broker acknowledged it): it can no longer be released."""
        self._unlogged.pop(request_id, None)

    def release(self, user_id: str, request_id: str, created_at: float, estimated: int) -> bool:
        """Give back an admission whose request's write failed or timed out (unless the log has it already)."""
        if self._unlogged.pop(request_id, None) is None:
            return False  # the forward agent read it: it runs, and stays charged
        new = release(self.table.get(user_id), request_id, created_at, estimated, self.now())
        if new is None:
            return False
        self.table[user_id] = new
        return True

    async def confirm_requests(
        self, requests: Sequence[Logged], copies: set[str] | None = None
    ) -> list[asyncio.Future[Any]]:
        """Confirm requests read from the log, in log order; the acks of the users' latest writes
        (every user's: a retried batch confirms nothing new, and must still wait for the write its first
        attempt made). The request ids of batch lines that are copies of lines confirmed before (written
        again after a crash: not to be run) are added to ``copies``.

        Each confirmed request's reservation entry is written and acknowledged before the user's state
        records it as confirmed: a crash in between leaves it unconfirmed, and the replay confirms it again."""
        per_user: dict[str, list[Logged]] = {}
        for r in requests:
            per_user.setdefault(r.user_id, []).append(r)
            self._unlogged.pop(r.request_id, None)
        now = self.now()
        for user, reqs in per_user.items():
            found = confirm(self.table.get(user), reqs, now)
            if found is not None:
                for r in found.held:
                    self.reservations.hold(user, r.request_id, r.estimated, found.state["day"])
                if copies is not None:
                    copies.update(r.request_id for r in found.copies)
        await asyncio.gather(*(self.reservations.written(r.user_id, r.request_id) for r in requests))
        now = self.now()
        for user, reqs in per_user.items():
            # On the state as it is now: admissions, settlements or a sweep may have written it meanwhile
            # (which requests hold a reservation does not depend on them, only the counters do).
            found = confirm(self.table.get(user), reqs, now)
            if found is not None and (found.held or found.state is not self.table.get(user)):
                self.table[user] = found.state
        return [asyncio.ensure_future(self.written(user)) for user in per_user]

    async def settle_results(self, results: Iterable[Settlement]) -> list[Settlement]:
        """Apply terminal results ``(user_id, request_id, status, tokens used, results offset)`` in log
        order; those that changed a state.

        The states' writes are acknowledged before the settled requests' reservation entries are removed,
        and the removals before this returns: a crash before the first leaves the result to be applied
        again, one after it leaves its offset at or below ``settled_upto`` (not applied again; the
        replay removes the entry)."""
        now = self.now()
        users: set[str] = set()
        done: set[tuple[str, str]] = set()  # (user, request id) whose reservation ends with this batch
        applied: list[Settlement] = []
        for result in results:
            user, request_id, status, used_tokens, offset = result
            users.add(user)
            if (user, request_id) in done:
                continue  # a second terminal result of a request this batch settled
            held = self.reservations.get(user, request_id)
            new = settle(self.table.get(user), request_id, status, used_tokens, now, held, offset)
            if new is not None:
                self.table[user] = new
                applied.append(result)
            if new is not None or held is not None:
                done.add((user, request_id))
        await asyncio.gather(*(self.written(user) for user in users))
        for user, request_id in done:
            self.reservations.drop(user, request_id)
        await asyncio.gather(*(self.reservations.written(user, rid) for user, rid in done))
        return applied

    def release_orphans(self, user_id: str, admission_timeout_s: float, orphan_after_s: float) -> int:
        """Release ``user_id``'s orphaned admissions in one write; how many."""
        now = self.now()
        state = self.table.get(user_id)
        found = release_buckets(state, orphans(state, now, admission_timeout_s, orphan_after_s), now)
        if found is None:
            return 0
        self.table[user_id], count = found
        return count

    def written(self, user_id: str) -> Awaitable[Any]:
        """Resolves once the broker holds this user's latest write: await it before answering 202."""
        return changelog_written(self.table, user_id)

    def snapshot(self, user_id: str, plan: Plan) -> Admission:
        now = self.now()
        return admission_of(current(self.table.get(user_id), now), plan, now)

    def doc(self, user_id: str, plan: Plan) -> dict[str, Any]:
        return quota_doc(user_id, plan, self.table.get(user_id), self.now())
