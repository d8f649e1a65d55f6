"""Builds the Faust app object from the settings (``build_app``); no I/O, no global state."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import faust
from faust.types import ProducerT

from inferstream import tracing
from inferstream.settings import Settings
from streams import quirks


class InferstreamApp(faust.App):
    """The Faust app, with checks that must pass before it touches the log (``preflight``)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        # Run once, before the producer, the consumer or any service starts: a
        # worker that must refuse to run (wrong partition counts) stops here.
        self.preflight: list[Callable[[], Awaitable[object]]] = []

    async def maybe_start_producer(self) -> ProducerT:
        # Faust's version yields to the event loop on every send (streams.quirks.started_producer).
        producer = quirks.started_producer(self)
        return producer if producer is not None else await super().maybe_start_producer()

    async def on_first_start(self) -> None:
        await super().on_first_start()
        for check in self.preflight:
            await check()


def lean_consumer_path() -> dict[str, Any]:
    """Cut Faust's per-message and per-event costs on the consumer path (streams.quirks: deliver_eagerly,
    yield_every, LeanMonitor, cython_optimizations); returns the app settings it needs."""
    quirks.deliver_eagerly()
    quirks.yield_every()
    return {
        # Decode a record once for all the agents reading its topic, and take queued events without a
        # wait: Faust's repaired Cython fast paths, opt-in in 0.15.3.
        "cython_optimizations": True,
        # Only the statistics Faust itself reads, not per-event ones for its disabled stats pages.
        "Monitor": quirks.LeanMonitor,
    }


def build_app(cfg: Settings) -> InferstreamApp:
    quirks.set_fetch_max_wait(cfg.fetch_max_wait_ms)
    # Only the standard OTEL_* variables turn it on; the service name defaults to the worker's roles.
    tracing.configure("inferstream-" + "-".join(sorted(cfg.role_set)))
    return InferstreamApp(
        cfg.namespace,
        broker=cfg.broker_url,
        store=cfg.table_store,
        datadir=f"{cfg.data_dir}-{cfg.namespace}-{cfg.web_port}",
        autodiscover=False,
        origin="streams",
        topic_partitions=cfg.partitions,
        topic_replication_factor=cfg.replication_factor,
        broker_session_timeout=cfg.session_timeout_s,
        broker_heartbeat_interval=max(0.5, min(3.0, cfg.session_timeout_s / 6)),
        broker_rebalance_timeout=max(cfg.session_timeout_s, 10.0),
        consumer_auto_offset_reset="earliest",
        processing_guarantee="at_least_once",
        key_serializer="json",
        value_serializer="json",
        web_enabled=True,
        web_host=cfg.web_host,
        web_port=cfg.web_port,
        web_bind=cfg.web_host,
        canonical_url=cfg.canonical_url,
        # Faust's own pages expose raw table contents and internals: never serve them.
        web_tables_enabled=False,
        web_stats_enabled=False,
        web_graph_enabled=False,
        web_router_enabled=False,
        web_metrics_enabled=False,
        web_cors_options=None,
        # Standbys shorten fail-over: the survivor already holds the quota state.
        table_standby_replicas=1,
        **lean_consumer_path(),
    )
