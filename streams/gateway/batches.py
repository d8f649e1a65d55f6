"""``/v1/batches``: OpenAI's Batch API routes, each decided on the owner of the caller's partition.

Like ``POST /v1/requests``, every route is forwarded to the worker that owns the
user's quota partition: that worker charges a batch, holds its live state (the
``batches`` table entry) and writes its lines. The work is
:class:`streams.batches.BatchService`'s; these views map HTTP in and out.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import faust
from aiohttp import web
from faust.web import View

from streams.admission import Refused
from streams.batches import BatchService
from streams.gateway.context import Gateway
from streams.gateway.cors import preflight
from streams.gateway.http import (
    api_key,
    error_response,
    guarded,
    json_response,
    query_int,
    read_body,
)
from tables.keys import Principal

Answer = Callable[[Principal], Awaitable[web.StreamResponse]]


async def _on_owner(
    gw: Gateway, request: web.Request, body: bytes, answer: Answer
) -> web.StreamResponse:
    """``answer`` here when this worker owns the caller's partition, else the whole exchange forwarded."""
    principal = await gw.keys.authenticate(api_key(request))
    owner = gw.router.owner(principal.user_id)
    if owner is not None:
        return await gw.router.forward(request, owner, body)
    return await answer(principal)


def register_batches(app: faust.App, gw: Gateway, service: BatchService) -> None:
    """Mount ``POST/GET /v1/batches``, ``GET /v1/batches/{id}`` and ``POST /v1/batches/{id}/cancel``."""

    @guarded
    async def create(request: web.Request) -> web.StreamResponse:
        body = await read_body(request, gw.settings.max_body_bytes)

        async def answer(principal: Principal) -> web.StreamResponse:
            try:
                return json_response(await service.create(principal, body))
            except Refused as exc:
                return error_response(exc, headers=exc.limits)

        return await _on_owner(gw, request, body, answer)

    @guarded
    async def list_mine(request: web.Request) -> web.StreamResponse:
        async def answer(principal: Principal) -> web.StreamResponse:
            limit = query_int(request, "limit", 20, 1, 100)
            return json_response(await service.list(principal, limit, request.query.get("after")))

        return await _on_owner(gw, request, b"", answer)

    @guarded
    async def get_one(request: web.Request, batch_id: str) -> web.StreamResponse:
        async def answer(principal: Principal) -> web.StreamResponse:
            return json_response(await service.get(principal, batch_id))

        return await _on_owner(gw, request, b"", answer)

    @guarded
    async def cancel(request: web.Request, batch_id: str) -> web.StreamResponse:
        async def answer(principal: Principal) -> web.StreamResponse:
            return json_response(await service.cancel(principal, batch_id))

        return await _on_owner(gw, request, b"", answer)

    @app.page("/v1/batches")
    class BatchesView(View):
        async def options(self, request: web.Request) -> web.StreamResponse:
            return preflight(request)

        async def post(self, request: web.Request) -> web.StreamResponse:
            return await create(request)

        async def get(self, request: web.Request) -> web.StreamResponse:
            return await list_mine(request)

    @app.page("/v1/batches/{batch_id}")
    class BatchView(View):
        async def options(self, request: web.Request, batch_id: str) -> web.StreamResponse:
            return preflight(request)

        async def get(self, request: web.Request, batch_id: str) -> web.StreamResponse:
            return await get_one(request, batch_id)

    @app.page("/v1/batches/{batch_id}/cancel")
    class BatchCancelView(View):
        async def options(self, request: web.Request, batch_id: str) -> web.StreamResponse:
            return preflight(request)

        async def post(self, request: web.Request, batch_id: str) -> web.StreamResponse:
            return await cancel(request, batch_id)
