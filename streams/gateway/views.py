"""Mounts the v1 API on the worker's Faust web server."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import faust
from aiohttp import web
from faust.web import View

from streams.gateway import metrics, requests
from streams.gateway.context import Gateway
from streams.gateway.http import guarded

Endpoint = Callable[..., Awaitable[web.StreamResponse]]


def _endpoint(gw: Gateway, route: str | None, fun: Endpoint) -> Endpoint:
    """``fun`` bound to ``gw``, its errors answered as JSON, timed per route (event streams are not)."""
    safe = guarded(fun)

    async def handle(request: web.Request, *args: str) -> web.StreamResponse:
        started = time.perf_counter()
        response = await safe(gw, request, *args)
        if route is not None:
            metrics.HTTP_LATENCY.labels(route, request.method, str(response.status)).observe(
                time.perf_counter() - started
            )
        return response

    return handle


def register_gateway(app: faust.App, gw: Gateway) -> None:
    submit = _endpoint(gw, "/v1/requests", requests.submit)
    list_mine = _endpoint(gw, "/v1/requests", requests.list_mine)
    get_one = _endpoint(gw, "/v1/requests/{id}", requests.get_one)
    cancel = _endpoint(gw, "/v1/requests/{id}", requests.cancel)
    events = _endpoint(gw, None, requests.events)
    quota = _endpoint(gw, "/v1/quota", requests.quota)
    models = _endpoint(gw, "/v1/models", requests.models)

    @app.page("/v1/requests")
    class RequestsView(View):
        async def post(self, request: web.Request) -> web.StreamResponse:
            return await submit(request)

        async def get(self, request: web.Request) -> web.StreamResponse:
            return await list_mine(request)

    @app.page("/v1/requests/{request_id}")
    class RequestView(View):
        async def get(self, request: web.Request, request_id: str) -> web.StreamResponse:
            return await get_one(request, request_id)

        async def delete(self, request: web.Request, request_id: str) -> web.StreamResponse:
            return await cancel(request, request_id)

    @app.page("/v1/requests/{request_id}/events")
    class EventsView(View):
        async def get(self, request: web.Request, request_id: str) -> web.StreamResponse:
            return await events(request, request_id)

    @app.page("/v1/quota")
    class QuotaView(View):
        async def get(self, request: web.Request) -> web.StreamResponse:
            return await quota(request)

    @app.page("/v1/models")
    class ModelsView(View):
        async def get(self, request: web.Request) -> web.StreamResponse:
            return await models(request)
