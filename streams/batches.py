"""The Batch API's work on the owner of a user's partition: creating, reading and cancelling batches
(:class:`BatchService`), writing their lines to the log and finalizing them (:class:`BatchRunner`).

Creation (on the owner of the user's quota partition; the views forward it there):

1. the body checked, the input file read and parsed for its endpoint (``schemas.batch_lines``);
   any problem is a 400 before anything is charged;
2. with no ``await`` in between: the whole batch charged in the quota table
   (``QuotaBook.admit_batch``, or 429 saying what is missing) and its ``validating`` entry
   in the ``batches`` table (:mod:`tables.batches`);
3. both changelog acks awaited, the PostgreSQL row inserted, the entry set ``in_progress``
   and its ack awaited, then 200. A failure before that gives the charge back and drops the entry.

The runner, a periodic service woken at once by a creation, then writes each batch's
lines to the requests topic a chunk at a time (each chunk's acks, then the entry's
``written``, awaited before the next), and finalizes a batch whose every line is
answered: the output and error files once PostgreSQL holds every line's row, then
the final status. Everything it does is derived from the table entry and the stored
input file, so after a crash or a rebalance the new owner carries on where the
entry says (at most one chunk is written twice; the forward agent recognises copies).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, cast

import faust
import msgspec
from aiokafka.errors import KafkaError
from faust.types import TableT
from mode import Service

from bridges.clients.redis import CacheUnavailable, RedisClient
from bridges.clients.store.batches import Batches
from bridges.clients.store.files import Files
from inferstream import clock
from inferstream.errors import (
    Conflict,
    InvalidRequest,
    NotFound,
    QuotaExceeded,
    StoreUnavailable,
    Unavailable,
)
from inferstream.ids import batch_line_id, is_batch_id, new_batch_id
from inferstream.route_watch import RouteWatcher
from inferstream.settings import PRIORITIES, Priority, Settings
from schemas.batch_docs import batch_list, batch_object, output_file_id, public, render_files
from schemas.batch_lines import ENDPOINTS, BatchLine, LineProblems, custom_ids, parse_batch_lines
from schemas.plans import Plan
from schemas.records import InferenceRequest
from streams.admission import Refused
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
    new_entry,
)
from tables.keys import Principal
from tables.quota_book import QuotaBook

log = logging.getLogger(__name__)

MAX_METADATA_PAIRS = 16
MAX_METADATA_KEY = 64
MAX_METADATA_VALUE = 512
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


class CreateBatch(msgspec.Struct, forbid_unknown_fields=True):
    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, str] | None = None


def parse_create(body: bytes) -> CreateBatch:
    """``POST /v1/batches``'s body, or :class:`InvalidRequest` naming what is wrong."""
    try:
        req = msgspec.json.decode(body, type=CreateBatch)
    except msgspec.ValidationError as exc:
        raise InvalidRequest(f"invalid batch: {exc}") from None
    except msgspec.DecodeError as exc:
        raise InvalidRequest(f"the body is not JSON: {exc}") from None
    if req.endpoint not in ENDPOINTS:
        raise InvalidRequest(f"endpoint must be one of {', '.join(ENDPOINTS)}", field="endpoint")
    if req.completion_window != "24h":
        raise InvalidRequest("completion_window must be '24h'", field="completion_window")
    if req.metadata is not None:
        if len(req.metadata) > MAX_METADATA_PAIRS:
            raise InvalidRequest(
                f"metadata holds at most {MAX_METADATA_PAIRS} pairs", field="metadata"
            )
        for key, value in req.metadata.items():
            if len(key) > MAX_METADATA_KEY or len(value) > MAX_METADATA_VALUE:
                raise InvalidRequest(
                    f"metadata keys are at most {MAX_METADATA_KEY} characters and values {MAX_METADATA_VALUE}",
                    field="metadata",
                )
    return req


def line_request(entry: Entry, line: BatchLine) -> InferenceRequest:
    """The request of one batch line: a deterministic id, so a line written twice is the same request."""
    created_at = float(entry["created_at"])
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


def _store_call_failed(exc: StoreUnavailable) -> Unavailable:
    return Unavailable("the batch store is unavailable", retry_after=2)


class BatchService:
    """Creates, reads and cancels batches on the owner of the user's partition (the views forward there)."""

    def __init__(
        self,
        settings: Settings,
        *,
        router: OwnerRouter,
        quota: QuotaBook,
        book: BatchBook,
        files: Files,
        batches: Batches,
        redis: RedisClient,
        routes: RouteWatcher,
        runner: BatchRunner | None = None,
        now: Callable[[], float] = clock.now,
    ) -> None:
        self.settings = settings
        self.router = router
        self.quota = quota
        self.book = book
        self.files = files
        self.batches = batches
        self.redis = redis
        self.routes = routes
        self.runner = runner
        self.now = now

    def _priority(self, plan: Plan, lines: list[BatchLine]) -> Priority:
        """The plan's batch priority (default low), capped by the plan and by every route the lines use."""
        priority: str = plan.cap_batch_priority()
        for task, model in {(line.task, line.model) for line in lines}:
            route = self.routes.route(task, model)
            if route is not None:
                priority = route.cap_priority(priority)
        return cast(Priority, priority if priority in PRIORITIES else "low")

    async def _input_lines(self, user_id: str, req: CreateBatch) -> list[BatchLine]:
        try:
            file = await self.files.get(user_id, req.input_file_id)
            if file is None:
                raise NotFound(f"No such File object: {req.input_file_id}", field="input_file_id")
            if file.get("purpose") != "batch":
                raise InvalidRequest(
                    f"file {req.input_file_id} has purpose {file.get('purpose')!r}, not 'batch'",
                    field="input_file_id",
                )
            content = await self.files.read_all(req.input_file_id)
        except StoreUnavailable as exc:
            raise _store_call_failed(exc) from exc
        self.routes.table  # noqa: B018 - loads the routes on first use
        lines = parse_batch_lines(
            content, req.endpoint, self.routes.model_routes, self.settings.default_max_tokens
        )
        if not lines:
            raise InvalidRequest("the input file holds no requests", field="input_file_id")
        if len(lines) > self.settings.batch_max_lines:
            raise InvalidRequest(
                f"the input file holds {len(lines)} requests; a batch takes at most {self.settings.batch_max_lines}",
                field="input_file_id",
            )
        return lines

    async def create(self, principal: Principal, body: bytes) -> dict[str, Any]:
        """Charge and record a batch (see the module docstring); its batch object."""
        user, plan = principal.user_id, principal.plan
        req = parse_create(body)
        lines = await self._input_lines(user, req)
        estimated = sum(line.estimated_tokens for line in lines)
        priority = self._priority(plan, lines)
        # ---- from here to the first await: check and write, atomically -------------
        if self.router.owner(user) is not None:
            raise Unavailable("the owner of this user's partition changed", retry_after=1)
        now = self.now()
        batch_id = new_batch_id(now)
        try:
            admission = self.quota.admit_batch(user, plan, batch_id, len(lines), estimated)
        except QuotaExceeded as exc:
            raise Refused(exc, self.quota.snapshot(user, plan).headers()) from None
        entry = new_entry(
            batch_id=batch_id, user_id=user, input_file_id=req.input_file_id, endpoint=req.endpoint,
            metadata=req.metadata, lines=len(lines), estimated=estimated, quota_day=admission.window_day,
            priority=priority, created_at=now,
        )  # fmt: skip
        self.book.create(entry)
        self.book.creating.add(batch_id)
        # ---- awaits from here on ------------------------------------------------
        try:
            started = await asyncio.wait_for(self._record(entry), self.settings.admission_timeout_s)
        except (TimeoutError, KafkaError, StoreUnavailable) as exc:
            log.warning("batch %s not recorded, its charge given back: %r", batch_id, exc)
            self.quota.release_batch(user, batch_id, len(lines), estimated)
            self.book.drop(user, batch_id)
            raise Unavailable("the batch could not be recorded", retry_after=2) from exc
        finally:
            self.book.creating.discard(batch_id)
        if self.runner is not None:
            self.runner.remember(batch_id, lines)
            self.runner.wake()
        return public(batch_object(started))

    async def _record(self, entry: Entry) -> Entry:
        user, batch_id = entry["user_id"], entry["batch_id"]
        await asyncio.gather(self.quota.written(user), self.book.written(user, batch_id))
        await self.batches.insert(batch_object(entry))
        started = self.book.started(user, batch_id)
        assert started is not None
        await self.book.written(user, batch_id)
        return started

    async def get(self, principal: Principal, batch_id: str) -> dict[str, Any]:
        if not is_batch_id(batch_id):
            raise NotFound(f"No such Batch object: {batch_id}")
        entry = self.book.get(principal.user_id, batch_id)
        if entry is not None:
            return public(batch_object(entry))
        try:
            doc = await self.batches.get(principal.user_id, batch_id)
        except StoreUnavailable as exc:
            raise _store_call_failed(exc) from exc
        if doc is None:
            raise NotFound(f"No such Batch object: {batch_id}")
        return public(doc)

    async def list(self, principal: Principal, limit: int, after: str | None) -> dict[str, Any]:
        """Newest first, from PostgreSQL, with the live state of the batches still running."""
        if after is not None and not is_batch_id(after):
            raise InvalidRequest("'after' must be a batch id", field="after")
        try:
            docs = await self.batches.list(principal.user_id, limit + 1, after)
        except StoreUnavailable as exc:
            raise _store_call_failed(exc) from exc
        live = []
        for doc in docs[:limit]:
            entry = self.book.get(principal.user_id, doc["id"])
            live.append(batch_object(entry) if entry is not None else doc)
        return batch_list(live, len(docs) > limit)

    async def cancel(self, principal: Principal, batch_id: str) -> dict[str, Any]:
        """Stop what has not started: ``cancelling`` now, ``cancelled`` once every line is answered."""
        user = principal.user_id
        doc = await self.get(principal, batch_id)  # 404 for someone else's or an unknown batch
        if doc["status"] in FINAL:
            raise Conflict(f"the batch is already {doc['status']}", status=doc["status"])
        if doc["status"] == VALIDATING:
            raise Unavailable("the batch is being created", retry_after=1)
        entry = self.book.cancel(user, batch_id)
        if entry is None:
            raise Unavailable("the batch's owner changed", retry_after=1)
        try:
            await asyncio.wait_for(
                self.book.written(user, batch_id), self.settings.admission_timeout_s
            )
        except (TimeoutError, KafkaError) as exc:
            raise Unavailable("the cancel could not be recorded", retry_after=2) from exc
        if self.runner is not None:
            await self.runner.mark_cancelled(batch_id)
            self.runner.wake()
        return public(batch_object(entry))


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
            lines = parse_batch_lines(
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
            await send_and_wait(
                self.topics.requests,
                ((user, line_request(current, lines[i])) for i in range(start, end)),
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
