"""The Batch API's requests on the owner of a user's partition: creating, reading and cancelling
batches (:class:`BatchService`); writing their lines and finalizing them is :mod:`streams.batch_runner`.

Creation (on the owner of the user's quota partition; the views forward it there):

1. the body checked, the input file read and parsed for its endpoint (``schemas.batch_lines``,
   off the event loop: the token estimates take about 1 s per 50,000 lines); any problem is a
   400 before anything is charged;
2. with no ``await`` in between: the whole batch charged in the quota table
   (``QuotaBook.admit_batch``, or 429 saying what is missing) and its ``validating`` entry
   in the ``batches`` table (:mod:`tables.batches`);
3. both changelog acks awaited, the PostgreSQL row inserted, the entry set ``in_progress``
   and its ack awaited, then 200. A failure before that gives the charge back and drops the entry.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import msgspec
from aiokafka.errors import KafkaError

from bridges.clients.redis import RedisClient
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
from inferstream.ids import is_batch_id, new_batch_id
from inferstream.route_watch import RouteWatcher
from inferstream.settings import PRIORITIES, Priority, Settings
from schemas.batch_docs import batch_list, batch_object, public
from schemas.batch_lines import ENDPOINTS, BatchLine, parse_batch_lines
from schemas.plans import Plan
from streams.admission import Refused
from streams.gateway.routing import OwnerRouter
from tables.batches import (
    FINAL,
    VALIDATING,
    BatchBook,
    Entry,
    new_entry,
)
from tables.keys import Principal
from tables.quota_book import QuotaBook

if TYPE_CHECKING:
    from streams.batch_runner import BatchRunner

log = logging.getLogger(__name__)

MAX_METADATA_PAIRS = 16
MAX_METADATA_KEY = 64
MAX_METADATA_VALUE = 512


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
        lines = await asyncio.to_thread(
            parse_batch_lines,
            content,
            req.endpoint,
            self.routes.model_routes,
            self.settings.default_max_tokens,
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
