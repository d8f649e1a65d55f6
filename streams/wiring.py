"""Attaches topics, tables, agents, services, views and commands to the app, per the worker's roles.

Roles (``INFERSTREAM_ROLES``): ``pipeline`` takes log partitions (gateway views,
quota tables, the bridge and sink agents, the RabbitMQ->log results bridge);
``ml`` runs ML workers that consume RabbitMQ only (an ML-only worker starts no
Kafka client at all, so it never joins the pipeline's consumer group). Clients
are built here once and handed to the parts; none opens a connection before it
is first used.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import Any

import mode

from bridges.dead_letters import DeadLetterRecorder
from bridges.key_events import KeyEvents
from bridges.model import ModelClient
from bridges.rabbitmq import RabbitClient
from bridges.redis import CacheUnavailable, NotificationHub, RedisClient
from bridges.results_bridge import ResultsBridge
from bridges.sink import ResultSink
from bridges.store import Store
from bridges.webhooks import WebhookSender
from inferstream.errors import StoreUnavailable
from schemas.documents import earlier_doc, request_doc
from schemas.records import TERMINAL
from streams import commands, quirks
from streams.agents.forward import register_forward
from streams.agents.orphans import register_orphan_sweep
from streams.agents.settle import register_settle
from streams.agents.watchdog import register_watchdog
from streams.agents.sink import register_sinks
from streams.app import app, settings
from streams.gateway.context import Gateway
from streams.gateway.ops import register_ops
from streams.gateway.routing import OwnerRouter
from streams.gateway.views import register_gateway
from streams.topics import define_topics, send_and_wait
from streams.topology import install_topology
from tables.definitions import define_tables
from tables.idempotency import IdempotencyBook
from tables.keys import KeyCache
from tables.quota import QuotaBook
from workers.worker import MLWorker

log = logging.getLogger(__name__)

store = Store(settings)
redis = RedisClient(settings)
rabbit = RabbitClient(settings)
model = ModelClient(settings)
keys = KeyCache.from_settings(settings, store.keys.find_key)
_health: dict[str, Any] = {"postgres": False}


class Clients(mode.Service):
    """Starts the notification hub and closes the shared clients (which open lazily) on stop."""

    async def on_start(self) -> None:
        if gateway is not None:
            await gateway.hub.start()

    async def on_stop(self) -> None:
        closers = [webhooks.close, rabbit.close, model.close, redis.close, store.close]
        if gateway is not None:
            closers = [gateway.hub.stop, gateway.router.close, *closers]
        for close in closers:
            try:
                await close()
            except (OSError, RuntimeError, StoreUnavailable) as exc:
                log.warning("closing %r: %r", close, exc)


quirks.run_with_app(app, Clients())
commands.register(app, settings, store)
install_topology(app, settings)

topics = define_topics(app, settings)
gateway: Gateway | None = None
ml_worker: MLWorker | None = None


_key_reload = asyncio.Lock()  # one full reload at a time: each leaves out what was invalidated after it began


async def _refresh_keys_once() -> None:
    async with _key_reload:
        as_of = keys.epoch
        try:
            loaded, plans = await asyncio.gather(store.keys.load_keys(), store.keys.load_plans())
        except StoreUnavailable as exc:
            # Keep the last good cache: a PostgreSQL outage must not lock every client out.
            _health["postgres"] = False
            log.warning("key refresh failed, keeping %s cache: %r", "the last" if keys.loaded else "an empty", exc)
            return
        keys.replace({h: (k.user_id, k.plan) for h, k in loaded.items()}, plans, as_of=as_of)
        _health["postgres"] = True


async def _on_applied(rows: Sequence[dict[str, Any]]) -> None:
    # Every status a row went through in this batch, in order, so each stream hears each once.
    finals = [request_doc(r) for r in rows]
    docs = [
        (r["user_id"], doc)
        for r, final in zip(rows, finals, strict=True)
        for doc in (*(earlier_doc(r, p["status"], p["at"]) for p in r.get("passed", ())), final)
    ]
    try:
        await redis.cache_and_publish(docs)
    except CacheUnavailable as exc:
        log.warning("%d docs not cached/published (Redis): %r", len(docs), exc)
    for r, doc in zip(rows, finals, strict=True):
        if r.get("callback_url") and r["status"] in TERMINAL:
            webhooks.submit(r["request_id"], r["callback_url"], doc)


async def _record_webhook(request_id: str, state: str, attempts: int, last_error: str | None) -> None:
    await store.webhooks.record_webhook_attempt(
        request_id, delivered=state == "delivered", error=last_error, final=state == "failed"
    )


webhooks = WebhookSender(settings, record=_record_webhook)

if settings.has_pipeline:
    tables = define_tables(app, settings)
    quota_book = QuotaBook(tables.quota)
    router = OwnerRouter(app, tables.quota, settings.admission_timeout_s)
    hub = NotificationHub(settings)
    gateway = Gateway(
        settings=settings,
        app=app,
        topics=topics,
        quota=quota_book,
        idempotency=IdempotencyBook(tables.idempotency, settings.idempotency_ttl_s),
        keys=keys,
        router=router,
        store=store.requests,
        redis=redis,
        hub=hub,
    )
    register_gateway(app, gateway)
    quirks.install(app, [settings.requests_topic, settings.results_topic])
    register_forward(app, settings, topics, rabbit, quota_book)
    register_settle(app, settings, topics, quota_book)
    register_watchdog(app, settings, store.requests, rabbit, topics)
    register_orphan_sweep(app, settings, tables.quota, quota_book)
    register_sinks(app, settings, topics, ResultSink(settings, store.requests, _on_applied))

    async def _produce_results(pairs: list[tuple[bytes, bytes]]) -> None:
        # Bodies pass through as they are: the ML worker already wrote ResultEvent JSON.
        await send_and_wait(topics.results, ((k.decode(), v) for k, v in pairs), value_serializer="raw")

    quirks.run_with_app(app, ResultsBridge(settings, rabbit, _produce_results))
    quirks.run_with_app(app, DeadLetterRecorder(settings, rabbit, store.dead_letters))

    @app.timer(interval=60.0, on_leader=True)
    async def resend_pending_webhooks() -> None:
        """Deliveries left pending by a crash, an outage or a replay: retried by the leader only."""
        try:
            rows = await store.webhooks.pending_webhooks(100, older_than_s=600)
        except StoreUnavailable as exc:
            log.warning("pending webhook sweep skipped: %r", exc)
            return
        for row in rows:
            if row.get("callback_url") and not webhooks.delivering(row["request_id"]):
                webhooks.submit(row["request_id"], row["callback_url"], request_doc(row))

    @app.task
    async def refresh_keys() -> None:
        """Pushed key and plan changes (one LISTEN connection), and a full reload every KEY_REFRESH_S."""
        plan_changed = asyncio.Event()
        events = KeyEvents(
            settings.postgres_dsn,
            store.keys.channel,
            on_key=keys.invalidate,
            on_plan=lambda _name: plan_changed.set(),
            on_connected=_refresh_keys_once,  # the first load, and after an outage: notifications were missed
        )
        listening = asyncio.ensure_future(events.run())
        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(plan_changed.wait(), settings.key_refresh_s)
                plan_changed.clear()
                await _refresh_keys_once()
                if listening.done():
                    # Not transient (a bad DSN, refused credentials): keep trying, loudly, on the reload's beat.
                    log.error("key notifications stopped (%r); restarting the listener", listening.exception())
                    listening = asyncio.ensure_future(events.run())
        finally:
            listening.cancel()


if settings.has_ml:
    ml_worker = MLWorker(settings, rabbit, model, redis.cancelled)
    quirks.run_with_app(app, ml_worker)

if not settings.has_pipeline:
    # An ML-only worker needs no log. With the Kafka consumer on, it would join
    # the pipeline's consumer group (for Faust's leader topic alone), force a
    # stop-the-world rebalance of the pipeline workers whenever it starts or
    # stops, and could become the group's leader. Without Kafka it starts only
    # the web server (ops routes) and the services, and never waits for tables.
    app.boot_strategy = app.BootStrategy(app, enable_kafka=False)


async def readiness() -> tuple[bool, dict[str, Any]]:
    checks: dict[str, Any] = {
        "roles": sorted(settings.role_set),
        "event_loop": type(asyncio.get_running_loop()).__module__.split(".")[0],
    }
    ready = True
    if settings.has_pipeline:
        checks["tables_recovered"] = quirks.tables_recovered(app)
        checks["rebalancing"] = bool(app.rebalancing)
        checks["keys_loaded"] = keys.loaded
        checks["postgres"] = _health["postgres"]
        checks["redis_pubsub"] = gateway.hub.healthy if gateway else False
        ready = checks["tables_recovered"] and not checks["rebalancing"] and keys.loaded
    checks["rabbitmq"] = rabbit.connected
    if ml_worker is not None:
        checks["ml"] = ml_worker.health()
        # An open breaker pauses consumption on purpose: detail, not unreadiness.
        ready = ready and checks["ml"]["ready"]
    return ready, checks


register_ops(app, readiness)
