"""The ``batches`` table: one entry per OpenAI-style batch, its live state and exact progress.

Key ``batch_id/user_id`` (partitioned by the user part, like ``reservations``:
:class:`tables.reservations.ReservationTable`), so the worker that owns a
user's quota and results partitions owns that user's batches too, and the
settle agent, which reads that user's results, is the one that counts them.

The value is a JSON object (see :func:`new_entry`). Progress is kept so that
replaying results (a crash before the settle agent's offsets were acked) or a
second terminal result of the same line (a redelivery) never counts twice:

* ``done``: a bitmap (base64) of the lines that reached a terminal status; only
  the first terminal status of a line is counted, in ``counts``;
* ``settled_upto``: the results-topic offset applied up to (the user's results
  are on one partition, so offsets only grow); an event at or below it is skipped.

:class:`BatchBook` is the table's only writer. Its checks and writes are
synchronous (no ``await`` between a read and its write); :meth:`BatchBook.written`
resolves when the broker holds an entry's latest write, as for the quota table.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, MutableMapping, Sequence
from typing import Any

from faust.types import EventT

from inferstream import clock
from schemas.records import ResultEvent
from tables.acked import changelog_written
from tables.reservations import SEP, user_of

Entry = dict[str, Any]

# OpenAI's statuses. ``validating``: charged, not yet recorded in PostgreSQL (the writer leaves it alone).
VALIDATING, IN_PROGRESS, FINALIZING = "validating", "in_progress", "finalizing"
CANCELLING, CANCELLED, COMPLETED, EXPIRED, FAILED = (
    "cancelling",
    "cancelled",
    "completed",
    "expired",
    "failed",
)
FINAL = frozenset({CANCELLED, COMPLETED, EXPIRED, FAILED})
COUNTED = ("completed", "failed", "expired", "cancelled")  # line statuses counted in ``counts``
COMPLETION_WINDOW_S = 24 * 3600.0
NEGATIVE_CANCEL_TTL_S = (
    1.0  # how long "not cancelled" is remembered for the forward agent's per-line check
)


def batch_key(batch_id: str, user_id: str) -> str:
    return f"{batch_id}{SEP}{user_id}"


def batch_of(key: str) -> str:
    return key.split(SEP, 1)[0]


# ---- the progress bitmap ---------------------------------------------------------------------------


def empty_bitmap(lines: int) -> str:
    return base64.b64encode(bytes((lines + 7) // 8)).decode()


def bitmap_bytes(encoded: str) -> bytearray:
    return bytearray(base64.b64decode(encoded))


def bit_set(bits: bytearray, line: int) -> bool:
    return bool(bits[line >> 3] & (1 << (line & 7)))


def set_bit(bits: bytearray, line: int) -> None:
    bits[line >> 3] |= 1 << (line & 7)


def popcount(encoded: str) -> int:
    return int.from_bytes(base64.b64decode(encoded), "little").bit_count()


# ---- entries (pure) --------------------------------------------------------------------------------


def new_entry(
    *,
    batch_id: str,
    user_id: str,
    input_file_id: str,
    endpoint: str,
    metadata: dict[str, str] | None,
    lines: int,
    estimated: int,
    quota_day: str,
    priority: str,
    created_at: float,
) -> Entry:
    """A batch just charged: ``validating`` until its PostgreSQL row is written."""
    return {
        "batch_id": batch_id,
        "user_id": user_id,
        "input_file_id": input_file_id,
        "endpoint": endpoint,
        "completion_window": "24h",
        "metadata": metadata,
        "status": VALIDATING,
        "created_at": created_at,
        "expires_at": created_at + COMPLETION_WINDOW_S,
        "lines": lines,
        "estimated": estimated,
        "quota_day": quota_day,
        "priority": priority,
        "written": 0,
        "done": empty_bitmap(lines),
        "counts": dict.fromkeys(COUNTED, 0),
        "settled_upto": -1,
        "cancel_requested": False,
        "output_file_id": None,
        "error_file_id": None,
        "errors": None,
    }


def with_status(entry: Entry, status: str, now: float) -> Entry:
    """``entry`` in ``status``, stamped ``<status>_at`` (OpenAI's timestamps) the first time."""
    stamp = f"{status}_at"
    new = {**entry, "status": status}
    if new.get(stamp) is None:
        new[stamp] = now
    return new


def apply_results(entry: Entry, results: Iterable[tuple[int, str, int]]) -> Entry | None:
    """``entry`` after terminal results ``(line, status, offset)`` in log order; None if nothing changed.

    The first terminal status of each line counts once; an offset at or below ``settled_upto``
    (a replay) is skipped; lines outside the batch are ignored."""
    bits: bytearray | None = None
    counts: dict[str, int] | None = None
    upto = int(entry.get("settled_upto", -1))
    changed = False
    for line, status, offset in results:
        if offset <= upto:
            continue
        upto, changed = offset, True
        if not 0 <= line < int(entry["lines"]):
            continue
        if bits is None:
            bits, counts = bitmap_bytes(entry["done"]), dict(entry["counts"])
        if bit_set(bits, line):
            continue
        set_bit(bits, line)
        assert counts is not None
        key = status if status in counts else "failed"
        counts[key] = counts.get(key, 0) + 1
    if not changed:
        return None
    new = {**entry, "settled_upto": upto}
    if bits is not None:
        new["done"] = base64.b64encode(bytes(bits)).decode()
        new["counts"] = counts
    return new


def terminal_lines(entry: Entry) -> int:
    return sum(int(v) for v in entry["counts"].values())


def all_terminal(entry: Entry) -> bool:
    """Every line written and answered (the writer's next step is finalization)."""
    return int(entry["written"]) >= int(entry["lines"]) and terminal_lines(entry) >= int(
        entry["lines"]
    )


def final_status(entry: Entry) -> str:
    """What a finalized batch becomes: cancelled if a cancel was asked, expired if a line expired, else completed."""
    if entry.get("cancel_requested"):
        return CANCELLED
    if int(entry["counts"].get("expired", 0)) > 0:
        return EXPIRED
    return COMPLETED


def request_counts(entry: Entry) -> dict[str, int]:
    counts = entry["counts"]
    return {
        "total": int(entry["lines"]),
        "completed": int(counts.get("completed", 0)),
        "failed": int(counts.get("failed", 0)) + int(counts.get("expired", 0)),
    }


def batch_created_s(batch_id: str) -> float:
    """When a batch id was made (its first 12 hex digits are milliseconds)."""
    try:
        return int(batch_id[6:18], 16) / 1000
    except ValueError:
        return 0.0


# ---- the writer ------------------------------------------------------------------------------------


class BatchBook:
    """The only writer of the ``batches`` table (a plain dict in unit tests)."""

    def __init__(
        self, table: MutableMapping[str, Entry], now: Callable[[], float] = clock.now
    ) -> None:
        self.table = table
        self.now = now
        self._cancelled: set[str] = set()  # keys known cancelled (a cancel never goes back)
        self._not_cancelled: dict[str, float] = {}  # key -> when read as not cancelled
        # Batches whose creation is between its first write and its answer: the runner leaves them alone
        # (a creation that fails gives the charge back, which only holds while no line was written).
        self.creating: set[str] = set()
        # Called when a batch's last line is answered (the runner finalizes it without waiting for its tick).
        self.on_all_terminal: Callable[[], None] | None = None

    def _put(self, key: str, entry: Entry) -> Entry:
        self.table[key] = entry
        if entry.get("cancel_requested"):
            self._cancelled.add(key)
        return entry

    def get(self, user_id: str, batch_id: str) -> Entry | None:
        entry = self.table.get(batch_key(batch_id, user_id))
        return None if entry is None else dict(entry)

    def create(self, entry: Entry) -> Entry:
        return self._put(batch_key(entry["batch_id"], entry["user_id"]), entry)

    def drop(self, user_id: str, batch_id: str) -> None:
        key = batch_key(batch_id, user_id)
        if key in self.table:
            del self.table[key]

    def started(self, user_id: str, batch_id: str) -> Entry | None:
        """``validating`` -> ``in_progress``: recorded in PostgreSQL, the writer may write its lines."""
        entry = self.get(user_id, batch_id)
        if entry is None or entry["status"] != VALIDATING:
            return entry
        return self._put(batch_key(batch_id, user_id), with_status(entry, IN_PROGRESS, self.now()))

    def lines_written(self, user_id: str, batch_id: str, upto: int) -> Entry | None:
        """Record that lines ``[0, upto)`` are in the log (never goes back); await :meth:`written` after."""
        key = batch_key(batch_id, user_id)
        entry = self.table.get(key)
        if entry is None or upto <= int(entry["written"]):
            return entry
        return self._put(key, {**entry, "written": min(upto, int(entry["lines"]))})

    def written(self, user_id: str, batch_id: str) -> Awaitable[Any]:
        """Resolves once the broker holds the entry's latest write (or removal)."""
        return changelog_written(self.table, batch_key(batch_id, user_id))

    def cancel(self, user_id: str, batch_id: str) -> Entry | None:
        """Ask for a cancel (``cancelling``); a final batch is left as it is (the caller answers 409)."""
        entry = self.get(user_id, batch_id)
        if entry is None or entry["status"] in FINAL or entry.get("cancel_requested"):
            return entry
        new = with_status({**entry, "cancel_requested": True}, CANCELLING, self.now())
        if entry["status"] == FINALIZING:
            new["status"] = (
                FINALIZING  # every line answered already: it only changes what it ends as
            )
        self._not_cancelled.pop(batch_key(batch_id, user_id), None)
        return self._put(batch_key(batch_id, user_id), new)

    def is_cancelled(self, user_id: str, batch_id: str) -> bool:
        """Whether a cancel was asked (the forward agent's per-line check: memory first)."""
        key = batch_key(batch_id, user_id)
        if key in self._cancelled:
            return True
        now = time.monotonic()
        seen = self._not_cancelled.get(key)
        if seen is not None and now - seen < NEGATIVE_CANCEL_TTL_S:
            return False
        entry = self.table.get(key)
        if entry is not None and entry.get("cancel_requested"):
            self._cancelled.add(key)
            return True
        if len(self._not_cancelled) > 10_000:
            self._not_cancelled.clear()
        self._not_cancelled[key] = now
        return False

    def finalizing(self, user_id: str, batch_id: str) -> Entry | None:
        entry = self.get(user_id, batch_id)
        if entry is None or entry["status"] in FINAL or entry["status"] == FINALIZING:
            return entry
        return self._put(batch_key(batch_id, user_id), with_status(entry, FINALIZING, self.now()))

    def finalized(
        self,
        user_id: str,
        batch_id: str,
        status: str,
        output_file_id: str | None,
        error_file_id: str | None,
        errors: Any = None,
    ) -> Entry | None:
        """The batch's final state (its files written): ``completed``, ``cancelled``, ``expired`` or ``failed``."""
        entry = self.get(user_id, batch_id)
        if entry is None:
            return None
        new = with_status(
            {**entry, "output_file_id": output_file_id, "error_file_id": error_file_id, "errors": errors},
            status, self.now(),
        )  # fmt: skip
        return self._put(batch_key(batch_id, user_id), new)

    def apply(self, found: Iterable[tuple[str, str, int, str, int]]) -> list[str]:
        """Terminal results ``(user_id, batch_id, line, status, offset)`` in log order applied to
        their entries (synchronously); the keys written."""
        per_key: dict[str, list[tuple[int, str, int]]] = {}
        for user, batch_id, line, status, offset in found:
            per_key.setdefault(batch_key(batch_id, user), []).append((line, status, offset))
        changed: list[str] = []
        for key, results in per_key.items():
            entry = self.table.get(key)
            if entry is None or entry["status"] in FINAL:
                continue  # another worker's batch, or one already final (a late copy changes nothing)
            new = apply_results(entry, results)
            if new is not None:
                self._put(key, new)
                changed.append(key)
                if all_terminal(new) and self.on_all_terminal is not None:
                    self.on_all_terminal()
        return changed

    async def on_terminal(self, events: Sequence[EventT]) -> None:
        """The settle agent's hook: count each terminal batch line once, then await the entries' acks
        (before the agent acks the offsets, so a crash replays them: recognised by ``settled_upto``)."""
        found = []
        for event in events:
            value = event.value
            if isinstance(value, ResultEvent) and value.batch_id is not None and value.is_terminal:
                found.append(
                    (
                        value.user_id,
                        value.batch_id,
                        -1 if value.batch_line is None else value.batch_line,
                        str(value.status),
                        event.message.offset,
                    )
                )
        if not found:
            return
        changed = self.apply(found)
        await asyncio.gather(*(changelog_written(self.table, key) for key in changed))

    def owned_open(
        self, owns: Callable[[str], bool], include_final: bool = False
    ) -> Iterator[Entry]:
        """The entries not final (``include_final``: and the final ones not yet retired) of the users
        ``owns(user_id)`` says this worker owns."""
        for key, entry in list(self.table.items()):
            if entry is None or (entry.get("status") in FINAL and not include_final):
                continue
            if owns(user_of(key)):
                yield dict(entry)

    def keys_of(self, user_id: str, batch_ids: Iterable[str]) -> set[str]:
        """The batch ids of ``user_id`` that have an entry."""
        return {b for b in batch_ids if batch_key(b, user_id) in self.table}
