"""Mounts the v1 API on the worker's Faust web server."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, cast

import faust
from aiohttp import web
from faust.web import View

from bridges.clients.store.webhooks import Webhooks
from bridges.clients.webhooks import WebhookSender
from streams.delivery import Delivery, attempt_recorder
from streams.gateway import metrics, requests
from streams.gateway.context import Gateway
from streams.gateway.cors import CorsPolicy, parse_origins, preflight
from streams.gateway.dashboard import Dashboard, register_dashboard
from streams.gateway.http import guarded
from streams.gateway.stream_tokens import StreamTokens

Endpoint = Callable[..., Awaitable[web.StreamResponse]]


def endpoint(gw: Gateway, route: str | None, fun: Endpoint) -> Endpoint:
    """``fun`` bound to ``gw``, its errors answered as JSON, timed per route (event streams are not)."""
    safe = guarded(fun)
    timers: dict[tuple[str, int], Any] = {}  # a label lookup costs more than the observation

    async def handle(request: web.Request, *args: str) -> web.StreamResponse:
        started = time.perf_counter()
        response = await safe(gw, request, *args)
        if route is not None:
            key = (request.method, response.status)
            timer = timers.get(key)
            if timer is None:
                timer = timers[key] = metrics.HTTP_LATENCY.labels(route, key[0], str(key[1]))
            timer.observe(time.perf_counter() - started)
        return response

    return handle


def _redelivery(gw: Gateway, web_app: web.Application) -> Delivery:
    """Redeliveries' own sender (the sink's is not handed to the gateway), closed with the web server.

    It opens nothing until the first redelivery.
    """
    records = Webhooks(gw.store.pool)
    sender = WebhookSender(gw.settings, record=attempt_recorder(records))

    async def close(_: web.Application) -> None:
        await sender.close()

    web_app.on_cleanup.append(close)
    return Delivery(gw.redis, sender, records)


def register_gateway(app: faust.App, gw: Gateway) -> None:
    """The ``/v1`` views, CORS for the listed origins, and the dashboard (with this worker's quota)."""
    tokens = StreamTokens(gw.settings.key_secret, gw.settings.stream_token_ttl_s)
    web_app = cast(web.Application, app.web.web_app)  # type: ignore[attr-defined]
    # Faust builds its aiohttp Application when the first page is registered; the signal must be
    # connected before the server starts (aiohttp freezes it then).
    CorsPolicy(parse_origins(gw.settings.cors_origins)).install(web_app)
    delivery = _redelivery(gw, web_app)
    register_dashboard(
        app, Dashboard(gw.settings, gw.keys, quota=gw.quota, router=gw.router, requests=gw.store)
    )
    submit = endpoint(gw, "/v1/requests", requests.submit)
    list_mine = endpoint(gw, "/v1/requests", requests.list_mine)
    get_one = endpoint(gw, "/v1/requests/{id}", requests.get_one)
    cancel = endpoint(gw, "/v1/requests/{id}", requests.cancel)
    events = endpoint(gw, None, partial(requests.events, tokens=tokens))
    events_token = endpoint(
        gw, "/v1/requests/{id}/events/token", partial(requests.events_token, tokens=tokens)
    )
    webhook_attempts = endpoint(
        gw, "/v1/requests/{id}/webhooks", partial(requests.webhook_attempts, records=delivery.records)
    )
    redeliver = endpoint(
        gw, "/v1/requests/{id}/webhooks/redeliver", partial(requests.redeliver, delivery=delivery)
    )
    quota = endpoint(gw, "/v1/quota", requests.quota)
    models = endpoint(gw, "/v1/models", requests.models)

    @app.page("/v1/requests")
    class RequestsView(View):
        async def options(self, request: web.Request) -> web.StreamResponse:
            return preflight(request)

        async def get(self, request: web.Request) -> web.StreamResponse:
            return await list_mine(request)

    # Admission, the hottest route, on aiohttp's router itself (as streams/gateway/files.py does):
    # Faust's page wrapper adds three coroutine frames and its sensors' start/end hooks per request,
    # none of which the answer needs (the handler times itself and answers its errors as JSON).
    web_app.router.add_post("/v1/requests", submit)

    @app.page("/v1/requests/{request_id}")
    class RequestView(View):
        async def options(self, request: web.Request, request_id: str) -> web.StreamResponse:
            return preflight(request)

        async def get(self, request: web.Request, request_id: str) -> web.StreamResponse:
            return await get_one(request, request_id)

        async def delete(self, request: web.Request, request_id: str) -> web.StreamResponse:
            return await cancel(request, request_id)

    @app.page("/v1/requests/{request_id}/events")
    class EventsView(View):
        async def options(self, request: web.Request, request_id: str) -> web.StreamResponse:
            return preflight(request)

        async def get(self, request: web.Request, request_id: str) -> web.StreamResponse:
            return await events(request, request_id)

    @app.page("/v1/requests/{request_id}/events/token")
    class EventsTokenView(View):
        async def options(self, request: web.Request, request_id: str) -> web.StreamResponse:
            return preflight(request)

        async def post(self, request: web.Request, request_id: str) -> web.StreamResponse:
            return await events_token(request, request_id)

    @app.page("/v1/requests/{request_id}/webhooks")
    class WebhooksView(View):
        async def options(self, request: web.Request, request_id: str) -> web.StreamResponse:
            return preflight(request)

        async def get(self, request: web.Request, request_id: str) -> web.StreamResponse:
            return await webhook_attempts(request, request_id)

    @app.page("/v1/requests/{request_id}/webhooks/redeliver")
    class RedeliverView(View):
        async def options(self, request: web.Request, request_id: str) -> web.StreamResponse:
            return preflight(request)

        async def post(self, request: web.Request, request_id: str) -> web.StreamResponse:
            return await redeliver(request, request_id)

    @app.page("/v1/quota")
    class QuotaView(View):
        async def options(self, request: web.Request) -> web.StreamResponse:
            return preflight(request)

        async def get(self, request: web.Request) -> web.StreamResponse:
            return await quota(request)

    @app.page("/v1/models")
    class ModelsView(View):
        async def options(self, request: web.Request) -> web.StreamResponse:
            return preflight(request)

        async def get(self, request: web.Request) -> web.StreamResponse:
            return await models(request)
