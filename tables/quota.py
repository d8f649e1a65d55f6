"""Per-user quota state and its rules: admission, settlement and refunds.

The state of one user lives under the key ``user_id`` in the changelog-backed
``quota`` table. :class:`QuotaBook` is the table's only writer. Its methods
are synchronous on purpose: a check and its write happen with no ``await``
between them, and only the worker that owns the user's partition calls them
(views through ``table_route``-style forwarding, agents through the
co-partitioned results topic), so admission is exact without locks.

Rules, per UTC day (``window``):

* admission checks requests per day, requests per minute (fixed minute
  windows) and tokens (``used + reserved + estimated <= limit``), then reserves
  the estimate under the request id;
* a terminal result turns the reservation into the actual
  ``usage.total_tokens`` (``completed``) or releases it (``failed``,
  ``cancelled``, ``expired``; tokens the model did report are still charged).
  The request itself stays counted: it was admitted;
* settling is idempotent: a request id without a reservation is ignored, so an
  event seen twice after a crash changes nothing, and counters never go below
  zero;
* a reservation made on an earlier day is dropped when that day's window is
  reset; its usage is not charged to the new day;
* an admission is *pending* (``pending``: request id -> ``created_at``) until
  the forward agent reads its request from the log and confirms it. A worker
  killed between the reservation's changelog ack and the request's write leaves
  a pending entry that no result will ever settle: :func:`orphans` finds it
  (pending past the admission timeout, and either a later request of the user
  already confirmed or pending past a long bound) and :func:`release` gives it
  back. A released request that reaches the log after all (``released``) is
  charged again when confirmed, so the table keeps matching the log.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any, TypeAlias, TypedDict, cast

from inferstream import clock
from inferstream.errors import QuotaExceeded
from schemas.plans import Plan
from tables.definitions import changelog_written


class QuotaState(TypedDict):
    """One user's quota in one UTC day, as the changelog carries it (JSON; a plain dict at run time)."""

    day: str
    requests_used: int
    tokens_used: int
    tokens_reserved: int
    reservations: dict[str, int]  # request id -> tokens reserved at admission
    minute: int  # the fixed minute window (epoch seconds // 60) of minute_count
    minute_count: int
    pending: dict[str, float]  # admitted, not yet confirmed from the log: request id -> created_at
    confirmed_upto: float  # the latest created_at the forward agent confirmed
    released: dict[str, float]  # released as orphans this day: request id -> when


StoredState: TypeAlias = Mapping[str, Any]  # what a table value decodes to: any QuotaState ever written
# Allowance for clock skew between the worker that admitted a request and the one that sweeps it.
ORPHAN_GRACE_S = 2.0


def empty_state(day: str) -> QuotaState:
    return {
        "day": day,
        "requests_used": 0,
        "tokens_used": 0,
        "tokens_reserved": 0,
        "reservations": {},
        "minute": 0,
        "minute_count": 0,
        "pending": {},
        "confirmed_upto": 0.0,
        "released": {},
    }


def current(state: StoredState | None, now: float) -> QuotaState:
    """The state for the window containing ``now`` (a fresh one after midnight UTC)."""
    day = clock.utc_day(now)
    if state is None or state.get("day") != day:
        return empty_state(day)
    if "pending" not in state:  # written before admissions were confirmed: nothing is pending
        return cast(QuotaState, {**empty_state(day), **state})
    return cast(QuotaState, state)


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
        "reservations": {**st["reservations"], request_id: estimated},
        "pending": {**st["pending"], request_id: now},
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


def _without_reservation(state: StoredState | None, request_id: str, now: float) -> tuple[QuotaState, int] | None:
    """The current window's state with ``request_id``'s reservation taken out (tokens_reserved
    lowered), and the amount that was reserved; ``None`` when there is no such reservation."""
    if state is None:
        return None
    st = current(state, now)
    reserved = st["reservations"].get(request_id)
    if reserved is None:
        return None
    reservations = {k: v for k, v in st["reservations"].items() if k != request_id}
    pending = {k: v for k, v in st["pending"].items() if k != request_id}
    new: QuotaState = {
        **st,
        "tokens_reserved": max(0, st["tokens_reserved"] - reserved),
        "reservations": reservations,
        "pending": pending,
    }
    return new, reserved


def charge(status: str, used_tokens: int, reserved: int) -> int:
    """Tokens a terminal result costs: what ``completed`` used; otherwise what the model reported, at most the reservation."""
    return max(0, used_tokens) if status == "completed" else max(0, min(used_tokens, reserved))


def settle(state: StoredState | None, request_id: str, status: str, used_tokens: int, now: float) -> QuotaState | None:
    """Turn a reservation into usage; ``None`` when there is nothing to change (idempotent)."""
    found = _without_reservation(state, request_id, now)
    if found is None:
        return None
    st, reserved = found
    return {**st, "tokens_used": st["tokens_used"] + charge(status, used_tokens, reserved)}


def release(state: StoredState | None, request_id: str, now: float) -> QuotaState | None:
    """Undo a pending admission whose request never reached the log (the request is not charged).

    ``None`` when it is not pending: settled, or confirmed (it is in the log and will be processed)."""
    if state is None or request_id not in current(state, now)["pending"]:
        return None
    found = _without_reservation(state, request_id, now)
    if found is None:
        return None
    st, _ = found
    return {
        **st,
        "requests_used": max(0, st["requests_used"] - 1),
        "minute_count": max(0, st["minute_count"] - 1),
        "released": {**st["released"], request_id: now},
    }


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
    pending, released, reservations = dict(pending), dict(released), dict(st["reservations"])
    used, reserved, upto = st["requests_used"], st["tokens_reserved"], st["confirmed_upto"]
    for request_id, created_at, estimated in found:
        if pending.pop(request_id, None) is None and released.pop(request_id, None) is not None:
            reservations[request_id] = estimated
            used, reserved = used + 1, reserved + estimated
        upto = max(upto, created_at)
    return {
        **st,
        "requests_used": used,
        "tokens_reserved": reserved,
        "reservations": reservations,
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
    return [
        request_id
        for request_id, created_at in st["pending"].items()
        if now - created_at > settled_by
        and (st["confirmed_upto"] > created_at + settled_by or now - created_at > orphan_after_s)
    ]


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
    """The ``quota`` table's single writer. Every method is synchronous: no await between read and write."""

    def __init__(self, table: MutableMapping[str, StoredState], now: Callable[[], float] = clock.now) -> None:
        self.table = table
        self.now = now

    def admit(self, user_id: str, plan: Plan, request_id: str, estimated: int) -> Admission:
        new, admission = decide(self.table.get(user_id), plan, request_id, estimated, self.now())
        self.table[user_id] = new
        return admission

    def settle(self, user_id: str, request_id: str, status: str, used_tokens: int) -> bool:
        new = settle(self.table.get(user_id), request_id, status, used_tokens, self.now())
        if new is None:
            return False
        self.table[user_id] = new
        return True

    def release(self, user_id: str, request_id: str) -> bool:
        new = release(self.table.get(user_id), request_id, self.now())
        if new is None:
            return False
        self.table[user_id] = new
        return True

    def confirm(self, user_id: str, requests: Iterable[tuple[str, float, int]]) -> bool:
        """One write for all of ``user_id``'s ``(request_id, created_at, estimated)`` read from the log."""
        new = confirm(self.table.get(user_id), requests, self.now())
        if new is None:
            return False
        self.table[user_id] = new
        return True

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
