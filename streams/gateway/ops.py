"""Operational routes on every worker: ``/healthz``, ``/readyz``, ``/metrics``, ``/openapi.json``."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import faust
from aiohttp import web
from faust.web import View
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from streams.gateway.http import json_response
from streams.gateway.openapi import openapi_spec

# Returns (ready, detail): ready means this worker can do all of its roles' work now.
ReadinessCheck = Callable[[], Awaitable[tuple[bool, dict[str, Any]]]]


def register_ops(app: faust.App, readiness: ReadinessCheck) -> None:
    spec = openapi_spec()

    @app.page("/healthz")
    class Healthz(View):
        async def get(self, request: web.Request) -> web.StreamResponse:
            return json_response({"status": "ok"})

    @app.page("/readyz")
    class Readyz(View):
        async def get(self, request: web.Request) -> web.StreamResponse:
            ready, detail = await readiness()
            return json_response(
                {"status": "ready" if ready else "not_ready", "checks": detail},
                status=200 if ready else 503,
                headers=None if ready else {"Retry-After": "1"},
            )

    @app.page("/metrics")
    class Metrics(View):
        async def get(self, request: web.Request) -> web.StreamResponse:
            return web.Response(
                body=generate_latest(REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST}
            )

    @app.page("/openapi.json")
    class OpenAPI(View):
        async def get(self, request: web.Request) -> web.StreamResponse:
            return json_response(spec)
