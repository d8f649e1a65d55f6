"""CORS for the ``/v1`` API: listed origins only (``INFERSTREAM_CORS_ORIGINS``), never ``*``, no credentials.

A browser page on a listed origin may call the API with an API key in ``Authorization`` (a
preflighted request) and follow an event stream with ``EventSource`` and a stream token in the
URL (a simple request: no preflight). No cookie or HTTP auth is involved, so
``Access-Control-Allow-Credentials`` is never sent and the allowed origin is always echoed, one
origin, never ``*``. Every ``/v1`` answer carries ``Vary: Origin`` so that a cache never hands one
origin's allowance to another.

The headers are set in aiohttp's ``on_response_prepare`` signal, which runs for plain and
streamed (SSE) responses alike; with no origin configured the hook is not installed, so CORS off
costs nothing. An answer forwarded from the user's owner worker may bring CORS headers of its own:
they are overwritten, not duplicated (a browser rejects two ``Access-Control-Allow-Origin``).
"""

from __future__ import annotations

from aiohttp import web

from inferstream.errors import ConfigurationError

PREFIX = "/v1/"
ALLOW_METHODS = "GET, POST, DELETE"
ALLOW_HEADERS = "Authorization, Content-Type, Idempotency-Key, Last-Event-ID, X-API-Key"
EXPOSE_HEADERS = (
    "Location, Retry-After, Idempotent-Replayed, X-RateLimit-Limit-Requests, X-RateLimit-Remaining-Requests,"
    " X-RateLimit-Limit-Tokens, X-RateLimit-Remaining-Tokens, X-RateLimit-Reset"
)
MAX_AGE_S = 600
_CORS_HEADERS = (
    "Access-Control-Allow-Origin",
    "Access-Control-Allow-Credentials",
    "Access-Control-Expose-Headers",
    "Access-Control-Allow-Methods",
    "Access-Control-Allow-Headers",
    "Access-Control-Max-Age",
)


def parse_origins(raw: str) -> frozenset[str]:
    """``scheme://host[:port]`` entries of a comma-separated list, as browsers serialise ``Origin``."""
    origins = set()
    for item in raw.split(","):
        origin = item.strip().rstrip("/")
        if not origin:
            continue
        if origin == "*" or "://" not in origin:
            raise ConfigurationError(f"INFERSTREAM_CORS_ORIGINS: {origin!r} is not an origin such as https://app.example.com")
        scheme, _, host = origin.partition("://")
        origins.add(f"{scheme.lower()}://{host.lower()}")
    return frozenset(origins)


class CorsPolicy:
    def __init__(self, origins: frozenset[str]) -> None:
        self.origins = origins

    def allowed(self, origin: str | None) -> bool:
        return origin is not None and origin in self.origins

    async def on_prepare(self, request: web.Request, response: web.StreamResponse) -> None:
        if not request.path.startswith(PREFIX):
            return
        headers = response.headers
        vary = headers.get("Vary", "")
        if "origin" not in vary.lower():
            headers["Vary"] = f"{vary}, Origin" if vary else "Origin"
        for name in _CORS_HEADERS:
            headers.pop(name, None)
        origin = request.headers.get("Origin")
        if not self.allowed(origin):
            return
        assert origin is not None
        headers["Access-Control-Allow-Origin"] = origin
        if request.method == "OPTIONS":
            headers["Access-Control-Allow-Methods"] = ALLOW_METHODS
            headers["Access-Control-Allow-Headers"] = ALLOW_HEADERS
            headers["Access-Control-Max-Age"] = str(MAX_AGE_S)
        else:
            headers["Access-Control-Expose-Headers"] = EXPOSE_HEADERS

    def install(self, web_app: web.Application) -> None:
        if self.origins:
            web_app.on_response_prepare.append(self.on_prepare)


def preflight(request: web.Request) -> web.Response:
    """``OPTIONS`` on a ``/v1`` route: 204; the allowance itself is added by :meth:`CorsPolicy.on_prepare`."""
    return web.Response(status=204)
