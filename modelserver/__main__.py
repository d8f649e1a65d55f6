"""Command line: ``python -m modelserver --host H --port P [--latency-ms N] [--error-rate P] ...``.

Prints ``modelserver listening on http://H:P`` once the model is loaded and the
socket accepts connections; scripts wait for that line or poll ``/healthz``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from aiohttp import web

from modelserver.app import build_app
from modelserver.config import ServerConfig


def _rate(value: str) -> float:
    rate = float(value)
    if not 0 <= rate <= 1:
        raise argparse.ArgumentTypeError("must be from 0 to 1")
    return rate


def parse_args(argv: list[str] | None = None) -> ServerConfig:
    p = argparse.ArgumentParser(prog="python -m modelserver", description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed on start)")
    p.add_argument("--latency-ms", type=int, default=0, help="sleep per generate call")
    p.add_argument(
        "--token-latency-ms", type=int, default=0, help="streamed completions: sleep before each chunk after the first"
    )
    p.add_argument(
        "--error-rate", type=_rate, default=0.0, help="fraction of generate calls that fail"
    )
    p.add_argument("--error-status", type=int, default=503, help="HTTP status of injected failures")
    p.add_argument(
        "--embed-batch-max", type=int, default=256, help="most inputs per embeddings request"
    )
    p.add_argument("--no-embeddings", action="store_true", help="skip torch; embeddings answer 503")
    p.add_argument("--torch-threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=None, help="seed of the error-rate draws")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--access-log", action="store_true", help="log every request")
    args = p.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    return ServerConfig(
        host=args.host,
        port=args.port,
        latency_ms=args.latency_ms,
        token_latency_ms=args.token_latency_ms,
        error_rate=args.error_rate,
        error_status=args.error_status,
        embed_batch_max=args.embed_batch_max,
        embeddings=not args.no_embeddings,
        torch_threads=args.torch_threads,
        seed=args.seed,
        access_log=args.access_log,
    )


async def serve(config: ServerConfig) -> None:
    """Run until SIGINT or SIGTERM."""
    access_log = logging.getLogger("aiohttp.access") if config.access_log else None
    runner = web.AppRunner(build_app(config), access_log=access_log, handle_signals=False)
    await runner.setup()  # runs the app's startup: loads the model
    try:
        site = web.TCPSite(runner, config.host, config.port)
        await site.start()
        port = runner.addresses[0][1]
        print(f"modelserver listening on http://{config.host}:{port}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    asyncio.run(serve(parse_args(argv)))


if __name__ == "__main__":
    main()
