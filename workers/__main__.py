"""``python -m workers``: one standalone ML worker from ``Settings.from_env()`` (no cancellation lookup)."""

from __future__ import annotations

import asyncio
import logging
import signal

from bridges.clients.rabbitmq import RabbitClient
from inferstream.route_watch import RouteWatcher
from inferstream.settings import Settings
from workers.worker import MLWorker


async def run(settings: Settings) -> None:
    routes = RouteWatcher(settings)
    rabbit = RabbitClient(settings, routes=routes)
    worker = MLWorker(settings, rabbit, routes)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await routes.start()  # loads the routes (a broken file stops here) and reloads them on SIGHUP
    await worker.start()
    try:
        await stop.wait()
    finally:
        # The worker drains first; the clients it used close after it.
        await worker.stop()
        await rabbit.close()
        await routes.stop()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    asyncio.run(run(Settings.from_env()))


if __name__ == "__main__":
    main()
