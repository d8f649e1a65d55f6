"""``/v1/requests`` and ``/v1/quota``: admission, reads, listing, cancellation and the event stream."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import Any

import msgspec
from aiohttp import web
from aiokafka.errors import KafkaError

from inferstream import clock
from inferstream.errors import Conflict, InvalidRequest, NotFound, QuotaExceeded, Unavailable
from inferstream.ids import is_request_id, new_request_id
from inferstream.tokens import estimate_tokens
from schemas.api import check_callback_url, parse_submission
from schemas.documents import Accepted, Links, request_doc
from schemas.records import TERMINAL, InferenceRequest, Status
from streams.gateway import metrics
from streams.gateway.context import Gateway
from streams.gateway.http import api_key, error_response, json_response, query_int, read_body
from streams.gateway.sse import stream_events
from tables.idempotency import fingerprint

log = logging.getLogger(__name__)

MAX_IDEMPOTENCY_KEY = 255
STATUSES = frozenset(Status)


async def submit(gw: Gateway, request: web.Request) -> web.StreamResponse:
    """``POST /v1/requests``: decided on the worker that owns the user's quota partition."""
    principal = await gw.keys.authenticate(api_key(request))
    body = await read_body(request, gw.settings.max_body_bytes)
    owner = gw.router.owner(principal.user_id)
    if owner is not None:
        metrics.FORWARDED.inc()
        return await gw.router.forward(request, owner, body)

    sub = parse_submission(body, gw.model_routes)
    if sub.callback_url is not None:
        await check_callback_url(sub.callback_url, gw.settings)  # may resolve its host: before admission
    user, plan = principal.user_id, principal.plan
    idem_key = request.headers.get("Idempotency-Key")
    body_fp = ""
    if idem_key is not None:
        if not 1 <= len(idem_key) <= MAX_IDEMPOTENCY_KEY:
            raise InvalidRequest(f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} characters")
        body_fp = fingerprint(body)
    estimated = estimate_tokens(sub.task, sub.input, sub.max_tokens, gw.settings.default_max_tokens)

    # ---- from here to the first await: check and write, atomically -------------
    if idem_key is not None:
        prior = gw.idempotency.lookup(user, idem_key, body_fp)
        if prior is not None:
            metrics.ADMISSIONS.labels("replayed").inc()
            headers = {**prior["headers"], "Idempotent-Replayed": "true"}
            return json_response(prior["body"], status=prior["status"], headers=headers)
    now = gw.now()
    request_id = new_request_id(now)
    try:
        admission = gw.quota.admit(user, plan, request_id, estimated)
    except QuotaExceeded as exc:
        metrics.ADMISSIONS.labels(exc.type).inc()
        return error_response(exc, headers=gw.quota.snapshot(user, plan).headers())
    req = InferenceRequest(
        request_id=request_id,
        user_id=user,
        task=sub.task,
        model=sub.model,
        input=sub.input,
        input_is_list=sub.input_is_list,
        estimated_tokens=estimated,
        created_at=now,
        quota_day=admission.window_day,
        priority=plan.cap_priority(sub.priority),
        params=sub.params,
        deadline_at=now + sub.deadline_s if sub.deadline_s else None,
        metadata=sub.metadata,
        callback_url=sub.callback_url,
    )
    self_url = f"/v1/requests/{request_id}"
    answer = Accepted(
        request_id=request_id,
        status="queued",
        estimated_tokens=estimated,
        created_at=clock.iso(now) or "",
        links=Links(self_=self_url, events=f"{self_url}/events"),
    )
    headers = {**admission.headers(), "Location": self_url}
    charged = [gw.quota.written(user)]
    if idem_key is not None:
        replay = {"status": 202, "headers": headers, "body": msgspec.to_builtins(answer)}
        gw.idempotency.remember(user, idem_key, body_fp, replay)
        charged.append(gw.idempotency.written(user))
    # ---- awaits from here on ------------------------------------------------
    try:
        await asyncio.wait_for(_charge_then_enqueue(gw, req, charged), gw.settings.admission_timeout_s)
    except (TimeoutError, KafkaError) as exc:
        # Not in the log, so never processed: give the allowance back.
        log.warning("request %s not written to the log, released: %r", request_id, exc)
        gw.quota.release(user, request_id)
        if idem_key is not None:
            gw.idempotency.forget(user, idem_key)
        metrics.ADMISSIONS.labels("unavailable").inc()
        raise Unavailable("the request log is unavailable", retry_after=2) from exc
    metrics.ADMISSIONS.labels("admitted").inc()
    return json_response(answer, status=202, headers=headers)


async def _charge_then_enqueue(gw: Gateway, req: InferenceRequest, charged: list[Awaitable[Any]]) -> None:
    """The broker holds the charge before the request: after a crash every request in the log is charged.

    Faust writes a table's changelog in the background; a 202 sent before it is
    acknowledged can be lost in a kill -9 and the allowance granted again.
    """
    await asyncio.gather(*charged)
    await gw.write_request(req)


async def _owned_doc(gw: Gateway, user_id: str, request_id: str) -> dict[str, Any]:
    if not is_request_id(request_id):
        raise NotFound(f"no request {request_id!r}")
    doc = await gw.load_doc(user_id, request_id)
    if doc is None:
        raise NotFound(f"no request {request_id!r}")
    return doc


async def get_one(gw: Gateway, request: web.Request, request_id: str) -> web.StreamResponse:
    principal = await gw.keys.authenticate(api_key(request))
    return json_response(await _owned_doc(gw, principal.user_id, request_id))


async def list_mine(gw: Gateway, request: web.Request) -> web.StreamResponse:
    principal = await gw.keys.authenticate(api_key(request))
    status = request.query.get("status")
    if status is not None and status not in STATUSES:
        raise InvalidRequest(f"unknown status {status!r}", field="status")
    limit = query_int(request, "limit", 20, 1, 100)
    after = request.query.get("after")
    if after is not None and not is_request_id(after):
        raise InvalidRequest("'after' must be a request id", field="after")
    rows = await gw.list_rows(principal.user_id, status, limit + 1, after)
    docs = [request_doc(r) for r in rows[:limit]]
    has_more = len(rows) > limit
    return json_response(
        {"data": docs, "has_more": has_more, "next_after": docs[-1]["request_id"] if has_more else None}
    )


async def cancel(gw: Gateway, request: web.Request, request_id: str) -> web.StreamResponse:
    principal = await gw.keys.authenticate(api_key(request))
    doc = await _owned_doc(gw, principal.user_id, request_id)
    if doc["status"] in TERMINAL:
        raise Conflict(f"request already {doc['status']}", status=doc["status"])
    await gw.request_cancel(request_id)
    metrics.CANCELS.inc()
    return json_response({**doc, "cancel_requested": True}, status=202)


async def events(gw: Gateway, request: web.Request, request_id: str) -> web.StreamResponse:
    principal = await gw.keys.authenticate(api_key(request))
    await _owned_doc(gw, principal.user_id, request_id)

    async def load() -> dict[str, Any] | None:
        return await gw.load_doc(principal.user_id, request_id)

    return await stream_events(
        request,
        request_id=request_id,
        load_doc=load,
        hub=gw.hub,
        heartbeat_s=gw.settings.sse_heartbeat_s,
        poll_s=gw.settings.sse_poll_s,
    )


async def quota(gw: Gateway, request: web.Request) -> web.StreamResponse:
    principal = await gw.keys.authenticate(api_key(request))
    owner = gw.router.owner(principal.user_id)
    if owner is not None:
        return await gw.router.forward(request, owner, b"")
    return json_response(gw.quota.doc(principal.user_id, principal.plan))
