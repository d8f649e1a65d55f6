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


def register_gateway(app: faust.App, gw: Gateway) -> None:
    submit = guarded(requests.submit)
    list_mine = guarded(requests.list_mine)
    get_one = guarded(requests.get_one)
    cancel = guarded(requests.cancel)
    events = guarded(requests.events)
    quota = guarded(requests.quota)

    def observe(route: str, request: web.Request, started: float, response: web.StreamResponse) -> None:
        metrics.HTTP_LATENCY.labels(route, request.method, str(response.status)).observe(
            time.perf_counter() - started
        )

    @app.page("/v1/requests")
    class RequestsView(View):
        async def post(self, request: web.Request) -> web.StreamResponse:
            t = time.perf_counter()
            response = await submit(gw, request)
            observe("/v1/requests", request, t, response)
            return response

        async def get(self, request: web.Request) -> web.StreamResponse:
            t = time.perf_counter()
            response = await list_mine(gw, request)
            observe("/v1/requests", request, t, response)
            return response

    @app.page("/v1/requests/{request_id}")
    class RequestView(View):
        async def get(self, request: web.Request, request_id: str) -> web.StreamResponse:
            t = time.perf_counter()
            response = await get_one(gw, request, request_id)
            observe("/v1/requests/{id}", request, t, response)
            return response

        async def delete(self, request: web.Request, request_id: str) -> web.StreamResponse:
            t = time.perf_counter()
            response = await cancel(gw, request, request_id)
            observe("/v1/requests/{id}", request, t, response)
            return response

    @app.page("/v1/requests/{request_id}/events")
    class EventsView(View):
        async def get(self, request: web.Request, request_id: str) -> web.StreamResponse:
            return await events(gw, request, request_id)

    @app.page("/v1/quota")
    class QuotaView(View):
        async def get(self, request: web.Request) -> web.StreamResponse:
            t = time.perf_counter()
            response = await quota(gw, request)
            observe("/v1/quota", request, t, response)
            return response
