"""Writing the lines of this worker's batches to the log and finalizing them (:class:`BatchRunner`).

The runner, a periodic service woken at once by a creation (:mod:`streams.batches`), writes
each batch's lines to the requests topic a chunk at a time (each chunk's acks, then the
entry's ``written``, awaited before the next), and finalizes a batch whose every line is
answered: the output and error files once PostgreSQL holds every line's row, then the final
status. Everything it does is derived from the table entry and the stored input file, so
after a crash or a rebalance the new owner carries on where the entry says (at most one chunk
is written twice; the forward agent recognises copies).

A line's ``created_at`` is when its chunk was written, not the batch's creation: its queued row
is then as fresh as a request's, so the watchdog (which re-dispatches rows ``queued`` long after
their last change) does not take lines written hours into a batch for stalled ones.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import faust
from aiokafka.errors import KafkaError
from faust.types import TableT
from mode import Service

from bridges.clients.redis import CacheUnavailable, RedisClient
from bridges.clients.store.batches import Batches
from bridges.clients.store.files import Files
from inferstream import clock
from inferstream.errors import (
    StoreUnavailable,
    Unavailable,
)
from inferstream.ids import batch_line_id
from inferstream.route_watch import RouteWatcher
from inferstream.settings import Settings
from schemas.batch_docs import batch_object, output_file_id, render_files
from schemas.batch_lines import BatchLine, LineProblems, custom_ids, parse_batch_lines
from schemas.records import InferenceRequest
from streams.gateway.routing import OwnerRouter
from streams.quirks import known_to_producer, tables_recovered
from streams.topics import Topics, send_and_wait
from tables.acked import changelog_partition
from tables.batches import (
    CANCELLING,
    FAILED,
    FINAL,
    FINALIZING,
    IN_PROGRESS,
    VALIDATING,
    BatchBook,
    Entry,
    all_terminal,
    batch_created_s,
    final_status,
)
from tables.quota_book import QuotaBook

log = logging.getLogger(__name__)

# A ``validating`` entry older than this (past any creation's timeout) was left by a crash mid-creation.
VALIDATING_GRACE_S = 30.0
# A quota charge of a batch with no ``batches`` entry (a crash between the two writes) older than this is undone.
ORPHAN_BATCH_GRACE_S = 60.0
ORPHAN_SWEEP_S = 15.0
FINALIZE_PAGE_ROWS = 2_000
SINK_RECHECK_S = 0.1
RUNNER_ERRORS = (
    StoreUnavailable,
    KafkaError,
    TimeoutError,
    CacheUnavailable,
    Unavailable,
    LineProblems,
)


def line_request(entry: Entry, line: BatchLine, at: float | None = None) -> InferenceRequest:
    """The request of one batch line, written at ``at`` (default: the batch's creation): a
    deterministic id, so a line written twice is the same request."""
    created_at = float(entry["created_at"]) if at is None else at
    return InferenceRequest(
        request_id=batch_line_id(entry["batch_id"], line.line),
        user_id=entry["user_id"],
        task=line.task,  # type: ignore[arg-type]
        model=line.model,
        input=list(line.input),
        input_is_list=line.input_is_list,
        estimated_tokens=line.estimated_tokens,
        created_at=created_at,
        quota_day=entry["quota_day"],
        priority=entry["priority"],
        params=line.params,
        deadline_at=float(entry["expires_at"]),
        batch_id=entry["batch_id"],
        batch_line=line.line,
    )


class BatchRunner(Service):
    """Writes the lines of this worker's batches and finalizes them; every ``batch_poll_s`` and on :meth:`wake`."""

    def __init__(
        self,
        settings: Settings,
        *,
        app: faust.App,
        book: BatchBook,
        quota: QuotaBook,
        quota_table: TableT,
        router: OwnerRouter,
        files: Files,
        batches: Batches,
        topics: Topics,
        redis: RedisClient,
        routes: RouteWatcher,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.settings = settings
        self.app = app
        self.book = book
        self.quota = quota
        self.quota_table = quota_table
        self.router = router
        self.files = files
        self.batches = batches
        self.topics = topics
        self.redis = redis
        self.routes = routes
        self._lines: dict[
            str, list[BatchLine]
        ] = {}  # parsed lines of batches being written (memory only)
        self._marked: set[str] = set()  # batches whose Redis cancel mark this process set
        self._wake = asyncio.Event()
        self._swept_at = 0.0
        self._sink_behind = False

    # ---- hooks for the service ------------------------------------------------------------------

    def remember(self, batch_id: str, lines: list[BatchLine]) -> None:
        self._lines[batch_id] = lines

    def wake(self) -> None:
        self._wake.set()

    async def mark_cancelled(self, batch_id: str) -> None:
        """The Redis mark ML workers check before starting a line (tried again by each tick until set)."""
        try:
            await self.redis.mark_batch_cancelled(batch_id)
        except CacheUnavailable as exc:
            log.warning("cancel mark of batch %s not set yet: %r", batch_id, exc)
            return
        self._marked.add(batch_id)

    # ---- the loop ----------------------------------------------------------------------------------

    @Service.task
    async def _run(self) -> None:
        while not self.should_stop:
            try:
                # A batch waiting only for the sink's rows is looked at again soon, not a whole poll later.
                wait = (
                    min(self.settings.batch_poll_s, SINK_RECHECK_S)
                    if self._sink_behind
                    else self.settings.batch_poll_s
                )
                await asyncio.wait_for(self._wake.wait(), wait)
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("batch runner tick failed; trying again")

    def _ready(self) -> bool:
        if self.app.rebalancing or not tables_recovered(self.app):
            return False
        return known_to_producer(self.app, self.quota_table.changelog_topic.get_topic_name())

    def owns(self, user_id: str) -> bool:
        """Whether this worker actively owns ``user_id``'s partition (a standby copy is not ownership)."""
        return bool(self.app.assignor.is_active(changelog_partition(self.quota_table, user_id)))

    async def tick(self) -> None:
        self._sink_behind = False
        if not self._ready():
            return
        for entry in self.book.owned_open(self.owns, include_final=True):
            if self.should_stop or not self._ready():
                return
            try:
                await self.step(entry)
            except RUNNER_ERRORS as exc:
                log.warning("batch %s: step postponed: %r", entry["batch_id"], exc)
        now = clock.now()
        if now - self._swept_at >= ORPHAN_SWEEP_S:
            self._swept_at = now
            self.sweep_orphan_charges(now)

    async def step(self, entry: Entry) -> None:
        """One batch's next move: write its lines, finalize it, or tidy up after a final state."""
        user, batch_id, status = entry["user_id"], entry["batch_id"], entry["status"]
        if batch_id in self.book.creating:
            return
        if status in FINAL:
            await self._retire(entry)
            return
        if status == VALIDATING:
            if clock.now() - float(entry["created_at"]) > VALIDATING_GRACE_S:
                await self._abandon(entry)
            return
        if entry.get("cancel_requested") and batch_id not in self._marked:
            await self.mark_cancelled(batch_id)
        if status in (IN_PROGRESS, CANCELLING) and int(entry["written"]) < int(entry["lines"]):
            await self._write_lines(entry)
            return
        if status in (IN_PROGRESS, CANCELLING) and all_terminal(entry):
            self.book.finalizing(user, batch_id)
            await self.book.written(user, batch_id)
            entry = self.book.get(user, batch_id) or entry
            status = entry["status"]
        if status == FINALIZING:
            await self._finalize(entry)

    async def _parsed(self, entry: Entry) -> list[BatchLine]:
        batch_id = entry["batch_id"]
        lines = self._lines.get(batch_id)
        if lines is None:
            # After a restart or a rebalance: parsed again from the stored file (deterministic).
            content = await self.files.read_all(entry["input_file_id"])
            self.routes.table  # noqa: B018 - loads the routes on first use
            lines = await asyncio.to_thread(
                parse_batch_lines,
                content,
                entry["endpoint"],
                self.routes.model_routes,
                self.settings.default_max_tokens,
            )
            if len(lines) != int(entry["lines"]):
                raise Unavailable(
                    f"input file of {batch_id} parses to {len(lines)} lines, not {entry['lines']}"
                )
            self._lines[batch_id] = lines
        return lines

    async def _write_lines(self, entry: Entry) -> None:
        """Write the batch's remaining lines a chunk at a time: each chunk's acks, then ``written``'s ack."""
        user, batch_id = entry["user_id"], entry["batch_id"]
        lines = await self._parsed(entry)
        total, chunk = int(entry["lines"]), max(1, self.settings.batch_chunk_lines)
        start = int(entry["written"])
        while start < total:
            if self.should_stop or not self._ready() or not self.owns(user):
                return
            current = self.book.get(user, batch_id)
            if current is None or current["status"] not in (IN_PROGRESS, CANCELLING):
                return
            end = min(total, start + chunk)
            at = clock.now()
            await send_and_wait(
                self.topics.requests,
                ((user, line_request(current, lines[i], at)) for i in range(start, end)),
            )
            self.book.lines_written(user, batch_id, end)
            await self.book.written(user, batch_id)
            start = end
        self._lines.pop(batch_id, None)

    async def _finalize(self, entry: Entry) -> None:
        """Output and error files once PostgreSQL holds every line's row; then the final status."""
        user, batch_id, total = entry["user_id"], entry["batch_id"], int(entry["lines"])
        if await self.batches.terminal_rows(batch_id) < total:
            self._sink_behind = True  # the sink is behind the settle agent: looked at again shortly
            return
        ids = custom_ids(await self.files.read_all(entry["input_file_id"]))
        outs: list[bytes] = []
        errs: list[bytes] = []
        n_out = n_err = 0
        start = 0
        while (
            start < total
        ):  # a page at a time: 50,000 decoded embedding results at once are too many
            rows = await self.batches.line_rows(batch_id, start, FINALIZE_PAGE_ROWS)
            if not rows:
                break
            out, err, k_out, k_err = render_files(entry["endpoint"], ids, rows)
            outs.append(out)
            errs.append(err)
            n_out, n_err = n_out + k_out, n_err + k_err
            start = int(rows[-1]["batch_line"]) + 1
        out, err = b"".join(outs), b"".join(errs)
        out_id = output_file_id(batch_id, "output") if n_out else None
        err_id = output_file_id(batch_id, "error") if n_err else None
        if out_id is not None:
            await self.files.put(
                out_id, user, "batch_output", f"{batch_id}_output.jsonl", out, n_out
            )
        if err_id is not None:
            await self.files.put(
                err_id, user, "batch_output", f"{batch_id}_error.jsonl", err, n_err
            )
        final = self.book.finalized(user, batch_id, final_status(entry), out_id, err_id)
        await self.book.written(user, batch_id)
        if final is not None:
            await self._retire(final)
        log.info(
            "batch %s %s: %d output lines, %d error lines",
            batch_id,
            final_status(entry),
            n_out,
            n_err,
        )

    async def _retire(self, entry: Entry) -> None:
        """A final entry: its PostgreSQL row set to it, the input file purged if deleted, the entry dropped."""
        user, batch_id = entry["user_id"], entry["batch_id"]
        doc = batch_object(entry)
        await self.batches.insert(
            doc
        )  # no-op when the row exists (it is missing after an abandoned creation)
        await self.batches.update(doc)
        await self.files.purge_if_deleted(entry["input_file_id"])
        self.book.drop(user, batch_id)
        await self.book.written(user, batch_id)
        self._lines.pop(batch_id, None)
        self._marked.discard(batch_id)

    async def _abandon(self, entry: Entry) -> None:
        """A creation interrupted by a crash (the caller never got a 200): charge given back, batch failed."""
        user, batch_id = entry["user_id"], entry["batch_id"]
        self.quota.release_batch(user, batch_id, int(entry["lines"]), int(entry["estimated"]))
        errors = {
            "object": "list",
            "data": [
                {
                    "code": "creation_interrupted",
                    "message": "the batch's creation did not finish",
                    "line": None,
                }
            ],
        }
        self.book.finalized(user, batch_id, FAILED, None, None, errors=errors)
        await asyncio.gather(self.quota.written(user), self.book.written(user, batch_id))
        log.warning("batch %s: creation interrupted, charge given back, failed", batch_id)

    def sweep_orphan_charges(self, now: float) -> int:
        """Undo quota charges of batches that have no entry (a crash between the two writes of a creation)."""
        released = 0
        for user, state in list(self.quota_table.items()):
            pending = (state or {}).get("batches") or {}
            for batch_id, charge in list(pending.items()):
                if int(charge[0]) != 0 or now - batch_created_s(batch_id) < ORPHAN_BATCH_GRACE_S:
                    continue
                if batch_id in self.book.creating or self.book.get(user, batch_id) is not None:
                    continue
                if not self.owns(user):
                    continue
                estimated = charge[3] if len(charge) > 3 else None
                if estimated is None:
                    # tables.quota keeps [next line, lines] only: the tokens reserved cannot be told here.
                    log.warning(
                        "batch %s of %r: charged with no entry; its estimate is unknown",
                        batch_id,
                        user,
                    )
                    continue
                if self.quota.release_batch(user, batch_id, int(charge[1]), int(estimated)):
                    released += 1
                    log.warning(
                        "batch %s of %r: charge without a batch entry given back", batch_id, user
                    )
        return released
