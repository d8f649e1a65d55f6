"""``/dashboard``: a static live page on every worker over two JSON endpoints that need an API key.

The page (``static/``: plain HTML, CSS and JS, no build step) asks for a key, keeps it in
``sessionStorage`` (gone with the tab), and polls ``/dashboard/api/stats`` and
``/dashboard/api/quota`` every two seconds. It writes every value with ``textContent`` (never
``innerHTML``), and is served with a Content-Security-Policy that allows only its own script,
style and same-origin requests, so a hostile string in a failure message or a user id cannot
become markup or script.

Any valid key may read this worker's numbers (rates, latency, queues, breakers, dead letters);
what is per user is scoped: an admin (a plan with ``admin``, migration 0004) sees every dead
letter and every user whose quota this worker holds, any other key its own failed requests and
its own quota (answered by the worker that owns the user, like ``GET /v1/quota``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib import resources
from typing import Any

import faust
from aiohttp import web
from faust.web import View

from bridges.clients.store import Requests, Store
from bridges.clients.store.dead_letters import DeadLetters
from inferstream.errors import StoreUnavailable
from inferstream.settings import Settings
from schemas.documents import iso_ts
from streams.gateway import dashboard_metrics as dm
from streams.gateway.http import api_key, guarded, json_response
from streams.gateway.routing import OwnerRouter
from streams.keysync import KeySync
from tables.keys import KeyCache, Principal
from tables.quota_book import QuotaBook

log = logging.getLogger(__name__)

FAILURES_SHOWN = 10
USERS_SHOWN = 200
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self';"
    " base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_PAGE_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-cache",
}
ASSETS = {
    "/dashboard": ("index.html", "text/html"),
    "/dashboard/app.js": ("app.js", "application/javascript"),
    "/dashboard/style.css": ("style.css", "text/css"),
}


def _asset(name: str) -> bytes:
    return resources.files("streams.gateway").joinpath("static", name).read_bytes()


@dataclass
class Dashboard:
    """What the JSON endpoints read; the quota parts are None on a worker without the pipeline role."""

    settings: Settings
    keys: KeyCache
    quota: QuotaBook | None = None
    router: OwnerRouter | None = None
    requests: Requests | None = None

    def __post_init__(self) -> None:
        self.window = dm.Window()
        self.dead_letters = DeadLetters(self.requests.pool) if self.requests is not None else None

    async def principal(self, request: web.Request) -> Principal:
        return await self.keys.authenticate(api_key(request))

    async def stats(self, request: web.Request) -> web.StreamResponse:
        principal = await self.principal(request)
        new, old = self.window.latest()
        return json_response(
            {
                "worker": self.settings.canonical_url,
                "roles": sorted(self.settings.role_set),
                "at": new.at,
                "window_s": round(new.at - old.at, 3) if old is not None else 0.0,
                "user_id": principal.user_id,
                "admin": principal.plan.admin,
                **numbers(new, old),
                "recent_failures": await self.failures(principal),
            }
        )

    async def failures(self, principal: Principal) -> list[dict[str, Any]]:
        try:
            if principal.plan.admin and self.dead_letters is not None:
                rows = await self.dead_letters.list_dead_letters(FAILURES_SHOWN)
                return [_dead_letter(r) for r in rows]
            if self.requests is not None:
                rows = await self.requests.list_requests(principal.user_id, "failed", FAILURES_SHOWN)
                return [_failed_row(r) for r in rows]
        except StoreUnavailable as exc:
            log.warning("dashboard: recent failures unavailable: %s", exc)
        return []

    async def quota_view(self, request: web.Request) -> web.StreamResponse:
        principal = await self.principal(request)
        worker = self.settings.canonical_url
        if self.quota is None or self.router is None:
            return json_response({"scope": "self", "worker": worker, "users": []})
        if principal.plan.admin:
            plans = self.keys.plans_by_user()
            users = [u for u in list(self.quota.table.keys()) if isinstance(u, str)]
            docs = [self.quota.doc(u, plans.get(u) or self.keys.plan("default")) for u in users]
            docs.sort(key=lambda d: (-d["requests"]["used"], d["user_id"]))
            return json_response({"scope": "all", "worker": worker, "users": docs[:USERS_SHOWN]})
        owner = self.router.owner(principal.user_id)
        if owner is not None:
            return await self.router.forward(request, owner, b"")
        doc = self.quota.doc(principal.user_id, principal.plan)
        return json_response({"scope": "self", "worker": worker, "users": [doc]})


def numbers(new: dm.Snapshot, old: dm.Snapshot | None) -> dict[str, Any]:
    """The metric sections of the stats document, from two registry snapshots."""
    throughput = []
    counters: list[tuple[str, str, dict[str, str]]] = [
        ("admitted", "inferstream_admissions_total", {"outcome": "admitted"}),
        ("admissions (all)", "inferstream_admissions_total", {}),
        ("completed", "inferstream_ml_terminal_total", {"status": "completed"}),
        ("failed", "inferstream_ml_terminal_total", {"status": "failed"}),
        ("model calls", "inferstream_model_calls_total", {}),
        ("model retries", "inferstream_model_retries_total", {}),
        ("results bridged", "inferstream_results_bridged_total", {}),
        ("dead letters", "inferstream_dead_letters_total", {}),
    ]
    # Refusals by type (request_quota_exceeded, token_quota_exceeded, rate_limited, unavailable, ...).
    outcomes = {dict(labels).get("outcome", "") for labels in new.series("inferstream_admissions_total")}
    counters[2:2] = [
        (f"refused: {o}", "inferstream_admissions_total", {"outcome": o})
        for o in sorted(outcomes - {"admitted", "replayed", ""})
    ]
    for name, metric, match in counters:
        found = dm.rate(new, old, metric, **match)
        if found is not None:
            throughput.append({"name": name, "total": found[0], "per_s": round(found[1], 3)})
    latency = []
    for stage, metric in dm.STAGES:
        found_latency = dm.latency(new, old, metric)
        if found_latency is not None:
            latency.append({"stage": stage, "metric": metric, **found_latency})
    breakers = [
        {**{k: r[k] for k in ("task", "model", "backend")}, "state": dm.BREAKER_STATES.get(int(r["value"]), "unknown")}
        for r in dm.labelled(new, "inferstream_model_breaker_state", ("task", "model", "backend"))
    ]
    queues = [
        {**{k: r[k] for k in ("task", "model", "priority")}, "depth": r["value"]}
        for r in dm.labelled(new, "inferstream_queue_depth", ("task", "model", "priority"))
    ]
    lag = [
        {"topic": r["topic"], "partition": r["partition"], "lag": r["value"]}
        for r in dm.labelled(new, "inferstream_consumer_lag", ("topic", "partition"))
    ]
    dead = [
        {"task": r["task"], "model": r["model"], "total": r["value"]}
        for r in dm.labelled(new, "inferstream_dead_letters_total", ("task", "model"))
    ]
    return {
        "throughput": throughput,
        "latency": latency,
        "queues": queues,
        "lag": lag,
        "breakers": breakers,
        "dead_letters": dead,
        "dead_letters_total": new.total("inferstream_dead_letters_total"),
        "sse_clients": new.total("inferstream_sse_clients"),
    }


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def _error_parts(error: Any) -> tuple[str, str]:
    if isinstance(error, dict):
        kind = error.get("type") or error.get("reason") or "error"
        return _text(kind), _text(error.get("message"))[:500]
    return "error", _text(error)[:500]


def _dead_letter(row: dict[str, Any]) -> dict[str, Any]:
    raw = row.get("payload")
    payload: dict[str, Any] = raw if isinstance(raw, dict) else {}
    kind, message = _error_parts(row.get("error"))
    return {
        "request_id": _text(row.get("request_id")),
        "user_id": _text(row.get("user_id")),
        "task": _text(payload.get("task")),
        "model": _text(payload.get("model")),
        "type": kind,
        "message": message,
        "at": iso_ts(row.get("created_at")),
    }


def _failed_row(row: dict[str, Any]) -> dict[str, Any]:
    kind, message = _error_parts(row.get("error"))
    return {
        "request_id": _text(row.get("request_id")),
        "user_id": _text(row.get("user_id")),
        "task": _text(row.get("task")),
        "model": _text(row.get("model")),
        "type": kind,
        "message": message,
        "at": iso_ts(row.get("completed_at") or row.get("updated_at")),
    }


def register_dashboard(app: faust.App, dashboard: Dashboard) -> None:
    """The page, its two assets and the JSON endpoints; register once per worker."""
    stats = guarded(dashboard.stats)
    quota = guarded(dashboard.quota_view)

    for path, (name, content_type) in ASSETS.items():
        body = _asset(name)
        headers = {**_PAGE_HEADERS, "Content-Type": f"{content_type}; charset=utf-8"}

        def serve(body: bytes = body, headers: dict[str, str] = headers) -> web.Response:
            return web.Response(body=body, headers=headers)

        app.page(path, name=f"dashboard:{name}")(_asset_view(serve))

    @app.page("/dashboard/api/stats", name="dashboard:stats")
    class StatsView(View):
        async def get(self, request: web.Request) -> web.StreamResponse:
            return await stats(request)

    @app.page("/dashboard/api/quota", name="dashboard:quota")
    class QuotaView(View):
        async def get(self, request: web.Request) -> web.StreamResponse:
            return await quota(request)


def register_worker_dashboard(app: faust.App, settings: Settings, store: Store) -> list[KeySync]:
    """The dashboard on a worker without the gateway (``INFERSTREAM_ROLES=ml``): keys of its own.

    Returns the service that keeps its key cache in step with PostgreSQL (revocations and plan
    changes pushed, as on a pipeline worker): start it with the worker's other services. Such a
    worker holds no quota, so its quota endpoint answers an empty list.
    """
    keys = KeyCache.from_settings(settings, store.keys.find_key)
    register_dashboard(app, Dashboard(settings, keys, requests=store.requests))
    return [KeySync(settings, store.keys, keys)]


def _asset_view(serve: Any) -> type[View]:
    class AssetView(View):
        async def get(self, request: web.Request) -> web.StreamResponse:
            response: web.StreamResponse = serve()
            return response

    return AssetView
