"""``/v1/requests``, ``/v1/quota`` and ``/v1/models``: admission, reads, listing, cancellation, the event stream, webhooks."""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web

from bridges.clients.store.webhooks import Webhooks
from bridges.clients.webhooks import message_id
from inferstream import logs
from inferstream.errors import Conflict, InvalidRequest, NotFound, StoreUnavailable, Unavailable
from inferstream.ids import is_request_id
from schemas.documents import attempt_doc, request_doc
from schemas.records import TERMINAL, Status
from streams.admission import Refused
from streams.delivery import Delivery
from streams.gateway import metrics
from streams.gateway.context import Gateway
from streams.gateway.http import api_key, error_response, json_response, query_int, read_body
from streams.gateway.sse import stream_events
from streams.gateway.stream_tokens import StreamTokens

log = logging.getLogger(__name__)

STATUSES = frozenset(Status)


async def submit(gw: Gateway, request: web.Request) -> web.StreamResponse:
    """``POST /v1/requests``: decided by admission on the worker that owns the user's quota partition."""
    principal = await gw.admission.authenticate(api_key(request))
    body = await read_body(request, gw.settings.max_body_bytes)
    owner = gw.admission.owner_of(principal.user_id)
    if owner is not None:
        metrics.FORWARDED.inc()
        return await gw.router.forward(request, owner, body)
    try:
        admitted = await gw.admission.admit(principal, body, request.headers.get("Idempotency-Key"))
    except Refused as exc:
        return error_response(exc, headers=exc.limits)
    headers = {**admitted.headers, "Idempotent-Replayed": "true"} if admitted.replayed else admitted.headers
    return json_response(admitted.body, status=admitted.status, headers=headers)


async def _owned_doc(gw: Gateway, user_id: str, request_id: str) -> dict[str, Any]:
    if not is_request_id(request_id):
        raise NotFound(f"no request {request_id!r}")
    doc = await gw.load_doc(user_id, request_id)
    if doc is None:
        raise NotFound(f"no request {request_id!r}")
    return doc


async def get_one(gw: Gateway, request: web.Request, request_id: str) -> web.StreamResponse:
    logs.set_request_id(request_id)
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
    logs.set_request_id(request_id)
    principal = await gw.keys.authenticate(api_key(request))
    doc = await _owned_doc(gw, principal.user_id, request_id)
    if doc["status"] in TERMINAL:
        raise Conflict(f"request already {doc['status']}", status=doc["status"])
    await gw.request_cancel(request_id)
    metrics.CANCELS.inc()
    return json_response({**doc, "cancel_requested": True}, status=202)


async def events(
    gw: Gateway, request: web.Request, request_id: str, tokens: StreamTokens | None = None
) -> web.StreamResponse:
    """The event stream, authenticated by the API key or, for ``EventSource``, by ``?token=``."""
    logs.set_request_id(request_id)
    token = request.query.get("token")
    if token is not None and tokens is not None:
        # The token names its user and request; a key sent beside it is not consulted.
        user_id = tokens.check(token, request_id).user_id
    else:
        user_id = (await gw.keys.authenticate(api_key(request))).user_id
    await _owned_doc(gw, user_id, request_id)

    async def load() -> dict[str, Any] | None:
        return await gw.load_doc(user_id, request_id)

    return await stream_events(
        request,
        request_id=request_id,
        load_doc=load,
        hub=gw.hub,
        heartbeat_s=gw.settings.sse_heartbeat_s,
        poll_s=gw.settings.sse_poll_s,
    )


async def events_token(
    gw: Gateway, request: web.Request, request_id: str, tokens: StreamTokens
) -> web.StreamResponse:
    """``POST /v1/requests/{id}/events/token``: a short-lived token for this request's event stream."""
    logs.set_request_id(request_id)
    principal = await gw.keys.authenticate(api_key(request))
    await _owned_doc(gw, principal.user_id, request_id)
    token, expires_at = tokens.mint(request_id, principal.user_id)
    events_url = f"/v1/requests/{request_id}/events?token={token}"
    return json_response(
        {"token": token, "expires_at": expires_at, "ttl_s": tokens.ttl_s, "events_url": events_url},
        status=201,
        headers={"Cache-Control": "no-store"},
    )


async def quota(gw: Gateway, request: web.Request) -> web.StreamResponse:
    principal = await gw.keys.authenticate(api_key(request))
    owner = gw.router.owner(principal.user_id)
    if owner is not None:
        return await gw.router.forward(request, owner, b"")
    return json_response(gw.quota.doc(principal.user_id, principal.plan))


async def models(gw: Gateway, request: web.Request) -> web.StreamResponse:
    """``GET /v1/models``: the routes this worker admits now (a reload changes them)."""
    await gw.keys.authenticate(api_key(request))
    routes = gw.admission.routes
    created = int(routes.loaded_at or 0)
    return json_response({"object": "list", "data": [{**r.public(), "created": created} for r in routes.table]})


async def webhook_attempts(gw: Gateway, request: web.Request, request_id: str, records: Webhooks) -> web.StreamResponse:
    """``GET /v1/requests/{id}/webhooks``: the delivery attempts of the caller's request."""
    logs.set_request_id(request_id)
    principal = await gw.keys.authenticate(api_key(request))
    await _owned_doc(gw, principal.user_id, request_id)
    try:
        rows = await records.list_attempts(request_id)
    except StoreUnavailable as exc:
        raise Unavailable("the request store is unavailable", retry_after=2) from exc
    return json_response({"data": [attempt_doc(r) for r in rows]})


async def redeliver(gw: Gateway, request: web.Request, request_id: str, delivery: Delivery) -> web.StreamResponse:
    """``POST /v1/requests/{id}/webhooks/redeliver``: the last event sent again, in the background (202)."""
    logs.set_request_id(request_id)
    principal = await gw.keys.authenticate(api_key(request))
    await _owned_doc(gw, principal.user_id, request_id)
    try:
        row = await gw.store.get_request(principal.user_id, request_id)
        if row is None or not row.get("callback_url"):
            raise Conflict("the request has no callback_url" if row is not None else "the request is not recorded yet")
        event = await delivery.redeliver(row)
    except StoreUnavailable as exc:
        raise Unavailable("the request store is unavailable", retry_after=2) from exc
    body = {"request_id": request_id, "event": event, "webhook_id": message_id(request_id, event)}
    return json_response(body, status=202)
