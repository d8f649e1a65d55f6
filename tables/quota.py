"""Per-user quota state and its rules: admission, settlement and refunds.

The state of one user lives under the key ``user_id`` in the changelog-backed
``quota`` table; what each of the user's confirmed requests in flight reserved
lives in the ``reservations`` table (:mod:`tables.reservations`), on the same
partition. :class:`tables.quota_book.QuotaBook` is the only writer of both. Its checks and writes
are synchronous: a check and its write happen with no ``await`` between them,
and only the worker that owns the user's partition makes them (views through
``table_route``-style forwarding, agents through the co-partitioned topics), so
admission is exact without locks.

A user's state is counters and a few small maps whose size does not depend on
how many requests the user has in flight, nor on how fast they arrive: the cost
of every admission and settlement stays the same at 10 or 10,000 in flight.

Rules, per UTC day (``window``):

* admission checks requests per day, requests per minute (fixed minute
  windows) and tokens (``used + reserved + estimated <= limit``), then reserves
  the estimate (``tokens_reserved``) and counts the admission as *pending* in
  the bucket of its second (``pending``: epoch second -> ``[admissions, tokens]``);
* the forward agent reads the request from the log and *confirms* it: the
  reservation becomes an entry of the ``reservations`` table (written and
  acknowledged first), then the request leaves its pending bucket and the
  request's log offset becomes ``confirmed_offset``: a batch replayed after a
  crash is recognised and confirms nothing twice (:meth:`tables.quota_book.QuotaBook.confirm_requests`);
* a batch (:func:`decide_batch`) is charged whole at its creation: its lines count as requests
  and its estimate is reserved at once, with no per-minute limit, and the batch is remembered in
  ``batches`` with the next line to confirm. The forward agent confirms its lines in line order
  (each gets its reservation entry, as a request does); a line at or below one already confirmed
  is a second copy written after a crash: not confirmed again, and not run
  (:func:`confirm` reports it);
* a terminal result turns the reservation into the actual
  ``usage.total_tokens`` (``completed``) or releases it (``failed``,
  ``cancelled``, ``expired``; tokens the model did report are still charged).
  The request itself stays counted: it was admitted;
* settling is idempotent: a result whose request holds no reservation (a
  second terminal result of it) changes nothing, and a result already applied
  (its results-topic offset at or below ``settled_upto``, a replay after a
  crash) is not applied again; the state is written and acknowledged before the
  reservation entry is removed, so a crash in between leaves nothing to lose
  (:meth:`tables.quota_book.QuotaBook.settle_results`). Counters never go below zero;
* a reservation made on an earlier day is dropped when it settles; its usage
  is not charged to the new day (that day's window started from zero);
* a worker killed between an admission's changelog ack and its request's
  write leaves a pending admission that no request will ever confirm:
  :func:`orphans` finds the buckets that still count one (older than the
  admission timeout, and either overtaken by a later confirmed request or past
  a long bound) and :meth:`tables.quota_book.QuotaBook.release_orphans` gives them back
  (``orphaned`` keeps how many per second). A request whose bucket was
  released, or that the gateway gave up on and released itself (``released``),
  is charged again if it reaches the log after all, so the table keeps matching
  the log. A request in the log that no admission counted (written around the
  gateway, or a redrive) is not charged; the audit shows the former.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeAlias, TypedDict, cast

from inferstream import clock
from inferstream.errors import QuotaExceeded
from schemas.plans import Plan


class QuotaState(TypedDict):
    """One user's quota in one UTC day, as the changelog carries it (JSON; a plain dict at run time)."""

    day: str
    requests_used: int
    tokens_used: int
    tokens_reserved: int
    minute: int  # the fixed minute window (epoch seconds // 60) of minute_count
    minute_count: int
    pending: dict[str, list[int]]  # admitted, not yet confirmed from the log: epoch second -> [admissions, tokens]
    confirmed_upto: float  # the latest created_at the forward agent confirmed
    confirmed_offset: int  # the requests-topic offset of the latest request confirmed (-1: none yet)
    released: dict[str, float]  # given up by the gateway this day: request id -> when
    orphaned: dict[str, int]  # released as orphans this day: epoch second -> admissions not in the log yet
    settled_upto: int  # the results-topic offset of the latest settlement applied (-1: none yet)
    # Batches charged whose lines are not all confirmed yet: batch id -> [next line to confirm, lines,
    # gaps (line ranges skipped over, normally none), the batch's estimate (what a sweep gives back)].
    # Absent in states written before the Batch API (read with .get).
    batches: dict[str, list[Any]]


class Logged(NamedTuple):
    """A request as the forward agent read it from the log: what confirming it needs."""

    user_id: str
    request_id: str
    created_at: float
    estimated: int
    quota_day: str
    offset: int | None  # its requests-topic offset; None: not known (no replay check)
    admitted: bool = True  # False for a request written by an operator (redrive): never charged
    batch_id: str | None = None  # a batch line: charged with its batch (decide_batch), confirmed by line
    batch_line: int = -1


StoredState: TypeAlias = Mapping[str, Any]  # what a table value decodes to: any QuotaState ever written
Settlement: TypeAlias = tuple[str, str, str, int, int | None]  # user, request id, status, tokens used, offset
# Allowance for clock skew between the worker that admitted a request and the one that sweeps it.
ORPHAN_GRACE_S = 2.0


def empty_state(day: str, settled_upto: int = -1, confirmed_offset: int = -1) -> QuotaState:
    return {
        "day": day,
        "requests_used": 0,
        "tokens_used": 0,
        "tokens_reserved": 0,
        "minute": 0,
        "minute_count": 0,
        "pending": {},
        "confirmed_upto": 0.0,
        "confirmed_offset": confirmed_offset,
        "released": {},
        "orphaned": {},
        "settled_upto": settled_upto,
        "batches": {},
    }


def second_of(created_at: float) -> str:
    """The key of an admission's pending bucket."""
    return str(int(created_at))


def current(state: StoredState | None, now: float) -> QuotaState:
    """The state for the window containing ``now`` (a fresh one after midnight UTC)."""
    day = clock.utc_day(now)
    if state is None:
        return empty_state(day)
    if "settled_upto" not in state:
        state = _from_previous_version(state)
    if state.get("day") != day:  # offsets only grow: keep the marks
        return empty_state(day, int(state["settled_upto"]), int(state["confirmed_offset"]))
    return cast(QuotaState, state)


def _from_previous_version(state: StoredState) -> dict[str, Any]:
    """A state written by the version that kept every reservation in the user's state: its pending
    admissions go into buckets; its confirmed reservations stay in ``reservations`` until they settle."""
    legacy: Mapping[str, int] = state.get("reservations") or {}
    pending: dict[str, list[int]] = {}
    for request_id, created_at in (state.get("pending") or {}).items():
        bucket = pending.setdefault(second_of(float(created_at)), [0, 0])
        bucket[0] += 1
        bucket[1] += int(legacy.get(request_id, 0))
    confirmed = {k: int(v) for k, v in legacy.items() if k not in (state.get("pending") or {})}
    new: dict[str, Any] = {  # its ``released`` (orphans, by request id) keeps its meaning
        **empty_state(str(state.get("day", ""))),
        **{k: v for k, v in state.items() if k not in ("pending", "reservations")},
        "pending": pending,
    }
    if confirmed:
        new["reservations"] = confirmed
    return new


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
        "pending": _bucket_add(st["pending"], second_of(now), 1, estimated),
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


def decide_batch(
    state: StoredState | None, plan: Plan, batch_id: str, lines: int, estimated: int, now: float
) -> tuple[QuotaState, Admission]:
    """Admit a whole batch (``lines`` requests, ``estimated`` tokens in all) or raise :class:`QuotaExceeded`
    saying how much is missing; pure. The per-minute rate does not apply to a batch's lines."""
    st = current(state, now)
    missing_requests = st["requests_used"] + lines - plan.requests_per_day
    missing_tokens = st["tokens_used"] + st["tokens_reserved"] + estimated - plan.tokens_per_day
    details = _details(st, plan, estimated)
    details["requests"]["needed"] = lines
    details["requests"]["missing"] = max(0, missing_requests)
    details["tokens"]["missing"] = max(0, missing_tokens)
    if missing_requests > 0:
        raise QuotaExceeded(
            "request_quota_exceeded",
            f"daily request quota of {plan.requests_per_day} cannot cover a batch of {lines} requests:"
            f" {missing_requests} missing",
            retry_after=seconds_to_reset(now),
            **details,
        )
    if missing_tokens > 0:
        raise QuotaExceeded(
            "token_quota_exceeded",
            f"daily token quota of {plan.tokens_per_day} cannot cover the batch's {estimated} estimated tokens:"
            f" {missing_tokens} missing",
            retry_after=seconds_to_reset(now),
            **details,
        )
    new: QuotaState = {
        **st,
        "requests_used": st["requests_used"] + lines,
        "tokens_reserved": st["tokens_reserved"] + estimated,
        "batches": {**st.get("batches", {}), batch_id: [0, lines, [], estimated]},
    }
    return new, admission_of(new, plan, now)


def release_batch(
    state: StoredState | None, batch_id: str, lines: int, estimated: int, now: float
) -> QuotaState | None:
    """Undo a batch's charge before any of its lines was written (its creation failed); ``None`` when
    there is nothing to undo (another day, or lines confirmed already)."""
    if state is None:
        return None
    st = current(state, now)
    entry = st.get("batches", {}).get(batch_id)
    if entry is None or entry[0] != 0:
        return None
    return {
        **st,
        "requests_used": max(0, st["requests_used"] - lines),
        "tokens_reserved": max(0, st["tokens_reserved"] - estimated),
        "batches": _without(st["batches"], batch_id),
    }


def charge(status: str, used_tokens: int, reserved: int) -> int:
    """Tokens a terminal result costs: what ``completed`` used; otherwise what the model reported, at most the reservation."""
    return max(0, used_tokens) if status == "completed" else max(0, min(used_tokens, reserved))


def _without(mapping: Mapping[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in mapping.items() if k != key}


def _bucket_add(pending: Mapping[str, list[int]], second: str, count: int, tokens: int) -> dict[str, list[int]]:
    """``pending`` with ``[count, tokens]`` added to one bucket (removed when it reaches zero admissions)."""
    held = pending.get(second, [0, 0])
    left = [held[0] + count, max(0, held[1] + tokens)]
    return {**pending, second: left} if left[0] > 0 else _without(pending, second)


def _counted_down(counts: Mapping[str, int], key: str) -> dict[str, int]:
    left = counts.get(key, 0) - 1
    return {**counts, key: left} if left > 0 else _without(counts, key)


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

    ``reserved`` is the request's ``(estimated, day)`` entry of the reservations table, if it has one
    (else the reservation is looked for in the per-request map of a state the previous version wrote).
    ``offset`` is the result's results-topic offset: at or below ``settled_upto`` it was applied already."""
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


def release(state: StoredState | None, request_id: str, created_at: float, estimated: int, now: float) -> QuotaState | None:
    """Undo an admission the gateway gave up on (its request's write failed or timed out): the request
    is not charged, and is remembered in ``released`` in case its write reached the log after all.

    ``None`` when its bucket no longer counts it (released as an orphan already)."""
    if state is None:
        return None
    st = current(state, now)
    second = second_of(created_at)
    if st["pending"].get(second, [0, 0])[0] <= 0:
        return None
    same_minute = int(created_at // 60) == st["minute"]
    return {
        **st,
        "requests_used": max(0, st["requests_used"] - 1),
        "tokens_reserved": max(0, st["tokens_reserved"] - estimated),
        "minute_count": max(0, st["minute_count"] - 1) if same_minute else st["minute_count"],
        "pending": _bucket_add(st["pending"], second, -1, -estimated),
        "released": {**st["released"], request_id: now},
    }


class Confirmed(NamedTuple):
    """What confirming requests read from the log found: the new state, the requests that now hold a
    reservation, and the batch lines that are second copies of lines confirmed already (not to be run)."""

    state: QuotaState
    held: list[Logged]
    copies: list[Logged]


def confirm(state: StoredState | None, requests: Iterable[Logged], now: float) -> Confirmed | None:
    """Requests read from the log, in log order: the new state, those that now hold a reservation
    (to be entered in the reservations table) and the batch lines that are copies; ``None`` when
    nothing changes (a replay, or redrives).

    A request leaves its pending bucket; one released by the gateway, or whose bucket was released as
    an orphan (its write came later than the sweep allowed for), is charged again; one no bucket ever
    counted (written around the gateway) is not charged. A batch line is confirmed by its batch's
    entry (:func:`_confirm_line`)."""
    st = current(state, now)
    pending, released, orphaned = st["pending"], st["released"], st["orphaned"]
    batches = st.get("batches", {})
    used, reserved, upto, last = st["requests_used"], st["tokens_reserved"], st["confirmed_upto"], st["confirmed_offset"]
    held: list[Logged] = []
    copies: list[Logged] = []
    for r in requests:
        if r.offset is not None and r.offset <= last:
            continue  # confirmed before a crash: the replay of its batch
        if r.offset is not None:
            last = r.offset
        if r.quota_day != st["day"] or not r.admitted:
            continue  # admitted on an earlier day (that window is gone), or never admitted
        if r.batch_id is not None:
            entry = _confirm_line(batches.get(r.batch_id), r.batch_line)
            if entry is None:
                copies.append(r)  # its batch confirmed this line already: a copy written after a crash
                continue
            batches = {**batches, r.batch_id: entry} if entry != DONE else _without(batches, r.batch_id)
            held.append(r)
            continue
        second = second_of(r.created_at)
        if r.request_id in released:
            released = _without(released, r.request_id)
            used, reserved = used + 1, reserved + r.estimated
        elif pending.get(second, [0, 0])[0] > 0:
            pending = _bucket_add(pending, second, -1, -r.estimated)
        elif orphaned.get(second, 0) > 0:  # its bucket was released before its write reached the log
            orphaned = _counted_down(orphaned, second)
            used, reserved = used + 1, reserved + r.estimated
        else:
            continue  # written around the gateway: never admitted, so not charged (the audit shows it)
        upto = max(upto, r.created_at)
        held.append(r)
    if last == st["confirmed_offset"] and not held:
        return Confirmed(st, held, copies) if copies else None
    new: QuotaState = {
        **st,
        "requests_used": used,
        "tokens_reserved": reserved,
        "pending": pending,
        "released": released,
        "orphaned": orphaned,
        "confirmed_upto": upto,
        "confirmed_offset": last,
        "batches": batches,
    }
    return Confirmed(new, held, copies)


DONE: list[Any] = []  # what _confirm_line answers once every line of a batch is confirmed


def _confirm_line(entry: list[Any] | None, line: int) -> list[Any] | None:
    """A batch's entry ``[next line, lines, gaps, estimate]`` after confirming ``line``; ``None`` when the line was
    confirmed before (a copy), :data:`DONE` when it was the last one.

    The batch's writer sends lines in order and awaits each step's acks, so lines normally arrive in
    order; a step that failed in its middle (a produce error after later records of it were acked) is
    written again, so a line may arrive after later ones: the lines skipped over are kept as gaps
    (``[first, end)`` ranges, normally none), and a line in a gap is confirmed, not taken for a copy."""
    if entry is None:
        return None  # every line confirmed (or the batch's charge undone): nothing is left to confirm
    nxt, lines = int(entry[0]), int(entry[1])
    gaps = [list(g) for g in entry[2]] if len(entry) > 2 else []
    if not 0 <= line < lines:
        return None  # not a line of this batch
    if line >= nxt:
        if line > nxt:
            gaps.append([nxt, line])
        nxt = line + 1
    else:
        for i, (first, end) in enumerate(gaps):
            if first <= line < end:
                gaps[i : i + 1] = [g for g in ([first, line], [line + 1, end]) if g[0] < g[1]]
                break
        else:
            return None
    if nxt >= lines and not gaps:
        return DONE
    return [nxt, lines, gaps, *entry[3:]]


def orphans(state: StoredState | None, now: float, admission_timeout_s: float, orphan_after_s: float) -> list[str]:
    """Pending buckets (their seconds) whose admissions will not reach the log now: past the admission
    timeout (the gateway has stopped trying) and either overtaken by a later confirmed request or past
    the long bound."""
    if state is None:
        return []
    st = current(state, now)
    settled_by = admission_timeout_s + ORPHAN_GRACE_S
    found = []
    for second in st["pending"]:
        end = int(second) + 1  # every admission of the bucket was made before this
        if now - end > settled_by and (st["confirmed_upto"] > end + settled_by or now - end > orphan_after_s):
            found.append(second)
    return found


def release_buckets(state: StoredState | None, seconds: Iterable[str], now: float) -> tuple[QuotaState, int] | None:
    """Give back what the pending buckets ``seconds`` still count; the new state and how many admissions."""
    if state is None:
        return None
    st = current(state, now)
    count = tokens = 0
    pending, orphaned = dict(st["pending"]), dict(st["orphaned"])
    minute_count = st["minute_count"]
    for second in seconds:
        held = pending.pop(second, None)
        if held is None:
            continue
        count, tokens = count + held[0], tokens + held[1]
        orphaned[second] = orphaned.get(second, 0) + held[0]
        if int(second) // 60 == st["minute"]:
            minute_count = max(0, minute_count - held[0])
    if not count:
        return None
    new: QuotaState = {
        **st,
        "requests_used": max(0, st["requests_used"] - count),
        "tokens_reserved": max(0, st["tokens_reserved"] - tokens),
        "minute_count": minute_count,
        "pending": pending,
        "orphaned": orphaned,
    }
    return new, count


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
