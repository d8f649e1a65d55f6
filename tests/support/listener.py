"""A loopback HTTP listener for webhook tests: ``async with loopback_listener(handler) as url: ...``."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@asynccontextmanager
async def loopback_listener(handler: Handler, path: str = "/hook") -> AsyncIterator[str]:
    """Serve POST ``path`` with ``handler`` on 127.0.0.1 (a free port) for the block; yields its URL."""
    app = web.Application()
    app.router.add_post(path, handler)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}{path}"
    finally:
        await runner.cleanup()
