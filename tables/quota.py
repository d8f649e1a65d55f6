"""Per-user quota state and its rules: admission, settlement and refunds.

The state of one user lives under the key ``user_id`` in the changelog-backed
``quota`` table; what each of the user's requests in flight reserved lives in
the ``reservations`` table (:mod:`tables.reservations`), on the same partition.
:class:`QuotaBook` is the only writer of both. Its methods are synchronous on
purpose: a check and its write happen with no ``await`` between them, and only
the worker that owns the user's partition calls them (views through
``table_route``-style forwarding, agents through the co-partitioned topics), so
admission is exact without locks.

A user's state is counters, plus the admissions not yet read back from the log
(``pending``): its size, and so the cost of every admission and settlement,
does not grow with the work the user has in flight (the forward agent confirms
a pending admission within milliseconds of its write).

Rules, per UTC day (``window``):

* admission checks requests per day, requests per minute (fixed minute
  windows) and tokens (``used + reserved + estimated <= limit``), then reserves
  the estimate (``tokens_reserved``) and records the admission as *pending*
  (``pending``: request id -> ``[created_at, estimated]``);
* the forward agent reads the request from the log and *confirms* it: the
  reservation becomes an entry of the ``reservations`` table (written and
  acknowledged first), then the pending record goes (:meth:`QuotaBook.confirm_requests`);
* a terminal result turns the reservation into the actual
  ``usage.total_tokens`` (``completed``) or releases it (``failed``,
  ``cancelled``, ``expired``; tokens the model did report are still charged).
  The request itself stays counted: it was admitted;
* settling is idempotent: a result whose request holds no reservation (a
  second terminal result of it) changes nothing, and a result already applied
  (its results-topic offset at or below ``settled_upto``, a replay after a
  crash) is not applied again; the state is written and acknowledged before the
  reservation entry is removed, so a crash in between leaves nothing to lose
  (:meth:`QuotaBook.settle_results`). Counters never go below zero;
* a reservation made on an earlier day is dropped when it settles; its usage
  is not charged to the new day (that day's window started from zero);
* a worker killed between an admission's changelog ack and its request's
  write leaves a pending admission that no result will ever settle:
  :func:`orphans` finds it (pending past the admission timeout, and either a
  later request of the user already confirmed or pending past a long bound)
  and :func:`release` gives it back. A released request that reaches the log
  after all (``released``) is charged again when confirmed, so the table
  keeps matching the log.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias, TypedDict, cast

from inferstream import clock
from inferstream.errors import QuotaExceeded
from schemas.plans import Plan
from tables.acked import changelog_written
from tables.reservations import Reservations


class QuotaState(TypedDict):
    """One user's quota in one UTC day, as the changelog carries it (JSON; a plain dict at run time)."""

    day: str
    requests_used: int
    tokens_used: int
    tokens_reserved: int
    minute: int  # the fixed minute window (epoch seconds // 60) of minute_count
    minute_count: int
    pending: dict[str, list[float]]  # admitted, not yet confirmed from the log: request id -> [created_at, estimated]
    confirmed_upto: float  # the latest created_at the forward agent confirmed
    released: dict[str, float]  # released as orphans this day: request id -> when
    settled_upto: int  # the results-topic offset of the latest settlement applied (-1: none yet)


StoredState: TypeAlias = Mapping[str, Any]  # what a table value decodes to: any QuotaState ever written
Settlement: TypeAlias = tuple[str, str, str, int, int | None]  # user, request id, status, tokens used, offset
# Allowance for clock skew between the worker that admitted a request and the one that sweeps it.
ORPHAN_GRACE_S = 2.0


def empty_state(day: str, settled_upto: int = -1) -> QuotaState:
    return {
        "day": day,
        "requests_used": 0,
        "tokens_used": 0,
        "tokens_reserved": 0,
        "minute": 0,
        "minute_count": 0,
        "pending": {},
        "confirmed_upto": 0.0,
        "released": {},
        "settled_upto": settled_upto,
    }


def current(state: StoredState | None, now: float) -> QuotaState:
    """The state for the window containing ``now`` (a fresh one after midnight UTC)."""
    day = clock.utc_day(now)
    if state is None:
        return empty_state(day)
    if state.get("day") != day:
        return empty_state(day, int(state.get("settled_upto", -1)))  # offsets only grow: keep the mark
    if "settled_upto" not in state:  # written by an earlier version: fill in what it lacked
        return cast(QuotaState, {**empty_state(day), **state})
    return cast(QuotaState, state)


def pending_of(state: StoredState, request_id: str) -> tuple[float, int] | None:
    """``(created_at, estimated)`` of a pending admission, or None."""
    entry = state["pending"].get(request_id)
    if entry is None:
        return None
    if isinstance(entry, int | float):  # an earlier version kept the estimate in a per-user map
        return float(entry), int(state.get("reservations", {}).get(request_id, 0))
    return float(entry[0]), int(entry[1])


def seconds_to_reset(now: float) -> int:
    return max(1, math.ceil(clock.day_start(now) + 86_400 - now))


@dataclass(frozen=True)
class Admission:
    """What admission answered: the figures behind the ``X-RateLimit-*`` headers."""

    requests_limit: int
    requests_remaining: int
    tokens_limit: int
    tokens_remaining: int
    reset_s: int
    window_day: str

    def headers(self) -> dict[str, str]:
        return {
            "X-RateLimit-Limit-Requests": str(self.requests_limit),
            "X-RateLimit-Remaining-Requests": str(self.requests_remaining),
            "X-RateLimit-Limit-Tokens": str(self.tokens_limit),
            "X-RateLimit-Remaining-Tokens": str(self.tokens_remaining),
            "X-RateLimit-Reset": str(self.reset_s),
        }


def _details(state: QuotaState, plan: Plan, estimated: int) -> dict[str, Any]:
    return {
        "requests": {"used": state["requests_used"], "limit": plan.requests_per_day},
        "tokens": {
            "used": state["tokens_used"],
            "reserved": state["tokens_reserved"],
            "limit": plan.tokens_per_day,
            "estimated": estimated,
        },
    }


def decide(
    state: StoredState | None, plan: Plan, request_id: str, estimated: int, now: float
) -> tuple[QuotaState, Admission]:
    """Admit one request or raise :class:`QuotaExceeded`; pure, returns the new state."""
    st = current(state, now)
    minute = int(now // 60)
    minute_count = st["minute_count"] if st["minute"] == minute else 0
    if st["requests_used"] + 1 > plan.requests_per_day:
        raise QuotaExceeded(
            "request_quota_exceeded",
            f"daily request quota of {plan.requests_per_day} exhausted",
            retry_after=seconds_to_reset(now),
            **_details(st, plan, estimated),
        )
    if plan.requests_per_minute > 0 and minute_count + 1 > plan.requests_per_minute:
        raise QuotaExceeded(
            "rate_limited",
            f"rate limit of {plan.requests_per_minute} requests per minute reached",
            retry_after=max(1, math.ceil((minute + 1) * 60 - now)),
            **_details(st, plan, estimated),
        )
    if st["tokens_used"] + st["tokens_reserved"] + estimated > plan.tokens_per_day:
        raise QuotaExceeded(
            "token_quota_exceeded",
            f"daily token quota of {plan.tokens_per_day} cannot cover {estimated} more tokens",
            retry_after=seconds_to_reset(now),
            **_details(st, plan, estimated),
        )
    new: QuotaState = {
        **st,
        "requests_used": st["requests_used"] + 1,
        "tokens_reserved": st["tokens_reserved"] + estimated,
        "pending": {**st["pending"], request_id: [now, estimated]},
        "minute": minute,
        "minute_count": minute_count + 1,
    }
    return new, admission_of(new, plan, now)


def admission_of(state: QuotaState, plan: Plan, now: float) -> Admission:
    return Admission(
        requests_limit=plan.requests_per_day,
        requests_remaining=max(0, plan.requests_per_day - state["requests_used"]),
        tokens_limit=plan.tokens_per_day,
        tokens_remaining=max(0, plan.tokens_per_day - state["tokens_used"] - state["tokens_reserved"]),
        reset_s=seconds_to_reset(now),
        window_day=state["day"],
    )


def charge(status: str, used_tokens: int, reserved: int) -> int:
    """Tokens a terminal result costs: what ``completed`` used; otherwise what the model reported, at most the reservation."""
    return max(0, used_tokens) if status == "completed" else max(0, min(used_tokens, reserved))


def _without(mapping: Mapping[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in mapping.items() if k != key}


def settle(
    state: StoredState | None,
    request_id: str,
    status: str,
    used_tokens: int,
    now: float,
    reserved: tuple[int, str] | None = None,
    offset: int | None = None,
) -> QuotaState | None:
    """Turn a reservation into usage; ``None`` when there is nothing to change (idempotent).

    ``reserved`` is the request's ``(estimated, day)`` entry of the reservations table, if it has one;
    without it the reservation is looked for among the pending admissions (a result that came before its
    request was confirmed) and in the per-user map an earlier version kept. ``offset`` is the result's
    results-topic offset: at or below ``settled_upto`` it was applied already."""
    if state is None:
        return None
    st = current(state, now)
    if offset is not None and offset <= st["settled_upto"]:
        return None
    legacy: Mapping[str, int] = st.get("reservations", {})  # type: ignore[assignment]
    new: QuotaState = {**st}
    if reserved is not None:
        estimated, day = reserved
        if day != st["day"]:
            return None  # reserved on an earlier day, whose window is gone: nothing to give back or charge
        if request_id in st["pending"]:
            new["pending"] = _without(st["pending"], request_id)
    elif (found := pending_of(st, request_id)) is not None:
        estimated = found[1]
        new["pending"] = _without(st["pending"], request_id)
    elif request_id in legacy:
        estimated = int(legacy[request_id])
    else:
        return None
    if request_id in legacy:
        new["reservations"] = _without(legacy, request_id)  # type: ignore[typeddict-unknown-key]
    new["tokens_reserved"] = max(0, st["tokens_reserved"] - estimated)
    new["tokens_used"] = st["tokens_used"] + charge(status, used_tokens, estimated)
    if offset is not None:
        new["settled_upto"] = offset
    return new


def release(state: StoredState | None, request_id: str, now: float) -> QuotaState | None:
    """Undo a pending admission whose request never reached the log (the request is not charged).

    ``None`` when it is not pending: settled, or confirmed (it is in the log and will be processed)."""
    if state is None:
        return None
    st = current(state, now)
    found = pending_of(st, request_id)
    if found is None:
        return None
    return {
        **st,
        "requests_used": max(0, st["requests_used"] - 1),
        "tokens_reserved": max(0, st["tokens_reserved"] - found[1]),
        "minute_count": max(0, st["minute_count"] - 1),
        "pending": _without(st["pending"], request_id),
        "released": {**st["released"], request_id: now},
    }


def to_confirm(
    state: StoredState | None, requests: Iterable[tuple[str, float, int]], now: float
) -> list[tuple[str, int]]:
    """``(request_id, estimated)`` of the requests read from the log that will hold a reservation once
    confirmed: the pending ones and the released ones (charged again)."""
    if state is None:
        return []
    st = current(state, now)
    held: list[tuple[str, int]] = []
    for request_id, _, estimated in requests:
        found = pending_of(st, request_id)
        if found is not None:
            held.append((request_id, found[1]))
        elif request_id in st["released"]:
            held.append((request_id, estimated))
    return held


def confirm(
    state: StoredState | None, requests: Iterable[tuple[str, float, int]], now: float
) -> QuotaState | None:
    """``(request_id, created_at, estimated)`` of requests read from the log: pending ones are confirmed,
    released ones charged again; ``None`` when nothing changes (a replay of settled requests)."""
    st = current(state, now)
    pending, released = st["pending"], st["released"]
    found = [r for r in requests if r[0] in pending or r[0] in released]
    if not found:
        return None
    pending, released = dict(pending), dict(released)
    used, reserved, upto = st["requests_used"], st["tokens_reserved"], st["confirmed_upto"]
    for request_id, created_at, estimated in found:
        if pending.pop(request_id, None) is None and released.pop(request_id, None) is not None:
            used, reserved = used + 1, reserved + estimated
        upto = max(upto, created_at)
    return {
        **st,
        "requests_used": used,
        "tokens_reserved": reserved,
        "pending": pending,
        "released": released,
        "confirmed_upto": upto,
    }


def orphans(state: StoredState | None, now: float, admission_timeout_s: float, orphan_after_s: float) -> list[str]:
    """Pending admissions whose request will not reach the log now: past the admission timeout (the
    gateway has stopped trying) and either overtaken by a later confirmed request or past the long bound."""
    if state is None:
        return []
    st = current(state, now)
    settled_by = admission_timeout_s + ORPHAN_GRACE_S
    found = []
    for request_id in st["pending"]:
        entry = pending_of(st, request_id)
        assert entry is not None
        created_at = entry[0]
        if now - created_at > settled_by and (
            st["confirmed_upto"] > created_at + settled_by or now - created_at > orphan_after_s
        ):
            found.append(request_id)
    return found


def quota_doc(user_id: str, plan: Plan, state: StoredState | None, now: float) -> dict[str, Any]:
    """``GET /v1/quota``."""
    st = current(state, now)
    start = clock.day_start(now)
    return {
        "user_id": user_id,
        "plan": plan.name,
        "window": {"start": clock.iso(start), "reset_at": clock.iso(start + 86_400)},
        "requests": {
            "used": st["requests_used"],
            "limit": plan.requests_per_day,
            "remaining": max(0, plan.requests_per_day - st["requests_used"]),
        },
        "tokens": {
            "used": st["tokens_used"],
            "reserved": st["tokens_reserved"],
            "limit": plan.tokens_per_day,
            "remaining": max(0, plan.tokens_per_day - st["tokens_used"] - st["tokens_reserved"]),
        },
    }


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

    def admit(self, user_id: str, plan: Plan, request_id: str, estimated: int) -> Admission:
        new, admission = decide(self.table.get(user_id), plan, request_id, estimated, self.now())
        self.table[user_id] = new
        return admission

    def release(self, user_id: str, request_id: str) -> bool:
        new = release(self.table.get(user_id), request_id, self.now())
        if new is None:
            return False
        self.table[user_id] = new
        return True

    async def confirm_requests(self, requests: Sequence[tuple[str, str, float, int]]) -> list[asyncio.Future[Any]]:
        """Confirm ``(user_id, request_id, created_at, estimated)`` read from the log; the acks of the
        users' latest writes (every user's: a retried batch confirms nothing new, and must still wait
        for the write its first attempt made).

        Each confirmed request's reservation entry is written and acknowledged before its pending record
        leaves the user's state: a crash in between leaves it pending, and the replay confirms it again."""
        per_user: dict[str, list[tuple[str, float, int]]] = {}
        for user, request_id, created_at, estimated in requests:
            per_user.setdefault(user, []).append((request_id, created_at, estimated))
        now = self.now()
        for user, reqs in per_user.items():
            state = self.table.get(user)
            day = current(state, now)["day"]
            for request_id, estimated in to_confirm(state, reqs, now):
                self.reservations.hold(user, request_id, estimated, day)
        await asyncio.gather(*(self.reservations.written(user, rid) for user, rid, _, _ in requests))
        now = self.now()
        for user, reqs in per_user.items():
            new = confirm(self.table.get(user), reqs, now)
            if new is not None:
                self.table[user] = new
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

    def release_orphans(self, user_id: str, admission_timeout_s: float, orphan_after_s: float) -> list[str]:
        """Release ``user_id``'s orphaned admissions in one write; their request ids."""
        now = self.now()
        state = self.table.get(user_id)
        found = orphans(state, now, admission_timeout_s, orphan_after_s)
        for request_id in found:
            state = release(state, request_id, now) or state
        if found and state is not None:
            self.table[user_id] = state
        return found

    def written(self, user_id: str) -> Awaitable[Any]:
        """Resolves once the broker holds this user's latest write: await it before answering 202."""
        return changelog_written(self.table, user_id)

    def snapshot(self, user_id: str, plan: Plan) -> Admission:
        now = self.now()
        return admission_of(current(self.table.get(user_id), now), plan, now)

    def doc(self, user_id: str, plan: Plan) -> dict[str, Any]:
        return quota_doc(user_id, plan, self.table.get(user_id), self.now())
