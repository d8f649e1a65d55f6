"""HTTP plumbing shared by the views: JSON responses, errors, bounded body reads, API keys."""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import msgspec
from aiohttp import web

from inferstream import tracing
from inferstream.errors import InvalidRequest, PayloadTooLarge, PublicError
from streams.gateway.errors import http_status

log = logging.getLogger(__name__)

Handler = Callable[..., Awaitable[web.StreamResponse]]
_encode = msgspec.json.Encoder().encode


def json_response(body: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    """``body`` (a contract model from ``schemas.documents``, or plain JSON data) as ``application/json``."""
    return web.Response(
        body=_encode(body), status=status, headers=headers, content_type="application/json"
    )


def error_response(exc: PublicError, headers: Mapping[str, str] | None = None) -> web.Response:
    extra = dict(headers or {})
    if exc.retry_after is not None:
        extra["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
    return json_response(exc.body(), status=http_status(exc), headers=extra)


def api_key(request: web.Request) -> str | None:
    auth = request.headers.get("Authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip() or None
    return request.headers.get("X-API-Key") or None


async def read_body(request: web.Request, limit: int) -> bytes:
    """The body, or 413 as soon as it is known to exceed ``limit`` (without reading it all)."""
    length = request.content_length
    if length is not None:
        if length > limit:
            raise PayloadTooLarge(f"body is larger than {limit} bytes", limit=limit)
        # aiohttp's parser stops the payload at Content-Length: one read, no chunk loop.
        return await request.content.read()
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_chunked(65_536):
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"body is larger than {limit} bytes", limit=limit)
        chunks.append(chunk)
    return b"".join(chunks)


def query_int(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise InvalidRequest(f"'{name}' must be an integer", field=name) from None
    if not low <= value <= high:
        raise InvalidRequest(f"'{name}' must be from {low} to {high}", field=name)
    return value


def guarded(fun: Handler) -> Handler:
    """Turn the error tree into JSON answers; anything else is our bug: logged, 500 JSON."""

    async def handler(*args: Any, **kwargs: Any) -> web.StreamResponse:
        if tracing.ENABLED:
            return await _traced(answer, args, kwargs)
        return await answer(*args, **kwargs)

    async def answer(*args: Any, **kwargs: Any) -> web.StreamResponse:
        try:
            return await fun(*args, **kwargs)
        except PublicError as exc:
            return error_response(exc)
        except web.HTTPException:
            raise
        except Exception:  # a bug: log it with its traceback, answer JSON, keep serving
            log.exception("unhandled error in %s", getattr(fun, "__qualname__", fun))
            return json_response(
                {"error": {"type": "internal_error", "message": "internal error; it has been logged"}},
                status=500,
            )

    handler.__name__ = getattr(fun, "__name__", "handler")
    handler.__qualname__ = getattr(fun, "__qualname__", "handler")
    return handler


async def _traced(answer: Handler, args: tuple[Any, ...], kwargs: dict[str, Any]) -> web.StreamResponse:
    """``answer`` inside a server span that continues the caller's W3C ``traceparent`` (or starts a trace)."""
    request = next((a for a in args if isinstance(a, web.Request)), None)
    if request is None:
        return await answer(*args, **kwargs)
    route = request.match_info.route.resource.canonical if request.match_info.route.resource else request.path
    span = tracing.start(
        f"{request.method} {route}",
        tracing.http_context(request.headers),
        kind=tracing.SpanKind.SERVER,
        attributes={"http.request.method": request.method, "http.route": route, "url.path": request.path},
    )
    with tracing.use(span):
        response = await answer(*args, **kwargs)
        span.set_attribute("http.response.status_code", response.status)
        if response.status >= 500:
            tracing.failed(span, f"HTTP {response.status}")
        return response
