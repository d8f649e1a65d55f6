"""The composition root: ``build_pipeline(settings)`` builds the app with every client and stage its roles need.

Nothing here runs at import. Building opens no connection either: clients
connect lazily, and every long-lived part is a ``mode.Service`` listed once,
in :class:`Lifecycle`, in the order they start (they stop in reverse).

The stages, in the order a request travels (``pipeline`` role unless noted):

1. gateway views -> admission on the owner of the user's quota partition (``streams/gateway``, ``tables``);
2. the requests topic -> forward agent -> RabbitMQ work queues (``streams/agents/forward.py``);
3. ML workers: model calls with retries, breaker, batching (``workers``; ``ml`` role);
4. RabbitMQ results -> the results topic (``bridges/results_bridge.py``), dead letters -> PostgreSQL;
5. the results topic -> quota settlement (``streams/agents/settle.py``) and the PostgreSQL sink
   (``streams/agents/sink.py``, ``bridges/sink.py``);
6. delivery: Redis cache, notifications for SSE on any worker, webhooks (``streams/delivery.py``).

Alongside: the routes (``inferstream/route_watch.py``: loaded before the worker serves,
reloaded on SIGHUP or a file change), topology (topics created before the log is
touched), the watchdog and the orphan sweep, key sync, readiness, and the operator commands.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import mode.loop
from mode import Service, ServiceT

from bridges.clients.notifications import NotificationHub
from bridges.clients.rabbitmq import RabbitClient
from bridges.clients.redis import RedisClient
from bridges.clients.store import Store
from bridges.clients.webhooks import WebhookSender
from bridges.dead_letters import DeadLetterRecorder
from bridges.results_bridge import ResultsBridge
from bridges.sink import ResultSink
from inferstream import logs
from inferstream.errors import ConfigurationError
from inferstream.route_watch import RouteWatcher
from inferstream.settings import Settings
from streams import commands, queue_eta, quirks
from streams.admission import AdmissionService
from streams.agents.dispatched import DispatchedEvents
from streams.agents.forward import register_forward
from streams.agents.orphans import register_orphan_sweep
from streams.agents.settle import register_settle
from streams.agents.sink import register_sinks
from streams.agents.watchdog import register_watchdog
from streams.application import InferstreamApp, build_app
from streams.batch_runner import BatchRunner
from streams.batches import BatchService
from streams.delivery import PENDING_SWEEP_S, Delivery, OutputWebhooks, attempt_recorder
from streams.gateway.batches import register_batches
from streams.gateway.context import Gateway
from streams.gateway.dashboard import register_worker_dashboard
from streams.gateway.files import register_files
from streams.gateway.ops import ReadinessCheck, register_ops
from streams.gateway.routing import OwnerRouter
from streams.gateway.views import register_gateway
from streams.keysync import KeySync
from streams.observe import Observer
from streams.topics import Topics, define_topics, send_and_wait
from streams.topology import install_topology
from tables.batches import BatchBook
from tables.definitions import define_tables
from tables.idempotency import IdempotencyBook
from tables.keys import KeyCache
from tables.quota_book import QuotaBook
from tables.reservations import Reservations
from workers import streaming
from workers.worker import MLWorker


@dataclass
class PipelineRole:
    """What the ``pipeline`` role added: its services in start order, and what readiness reads."""

    keys: KeyCache
    key_sync: KeySync
    hub: NotificationHub
    services: list[ServiceT]


class Lifecycle(Service):
    """Every long-lived part of one worker, started in the order given and stopped in reverse."""

    def __init__(self, parts: Sequence[ServiceT], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.parts = list(parts)

    def on_init_dependencies(self) -> list[ServiceT]:
        return self.parts


def from_environment() -> InferstreamApp:
    """What ``faust -A streams`` runs: the settings from ``INFERSTREAM_*``, checked, then the pipeline."""
    settings = Settings.from_env()
    logs.configure(settings)  # a JSON worker writes JSON from here on, the refusal below included
    if refusal := _refusal(settings, settings.web_host):
        # Before anything binds or connects: a clear message and exit status 1, not a traceback.
        raise SystemExit(refusal)
    if settings.event_loop == "uvloop":
        # Before the worker creates its loop (Faust imports the app while parsing the
        # command line); the same as `faust -L uvloop`, without changing the command.
        mode.loop.use("uvloop")
    return logs.use_worker_logging(build_pipeline(settings), settings)


def _refusal(settings: Settings, bind: str) -> str | None:
    """Why a worker serving ``bind`` must not start (the published secrets), or None."""
    insecure = settings.insecure_defaults(bind=bind)
    return "inferstream refuses to start: " + "; ".join(insecure) if insecure else None


async def _refuse_insecure_bind(app: InferstreamApp, settings: Settings) -> None:
    """``faust worker --web-bind`` changes the bind after the app was built: check what it will bind."""
    if refusal := _refusal(settings, str(app.conf.web_bind)):
        raise ConfigurationError(refusal)


def build_pipeline(settings: Settings) -> InferstreamApp:
    """The app for ``settings.roles``, with its clients, stages, views and commands attached."""
    app = build_app(settings)
    queue_eta.configure(settings)
    app.preflight.append(lambda: _refuse_insecure_bind(app, settings))
    routes = RouteWatcher(settings)
    app.preflight.append(lambda: _load_routes(routes))
    store = Store(settings)
    redis = RedisClient(settings)
    rabbit = RabbitClient(settings, routes=routes)
    webhooks = WebhookSender(settings, record=attempt_recorder(store.webhooks))
    parts: list[ServiceT] = [routes, store, redis, rabbit, webhooks]

    commands.register(app, settings, store)
    install_topology(app, settings)
    topics = define_topics(app, settings)
    role: PipelineRole | None = None
    if settings.has_pipeline:
        role = _pipeline_role(app, settings, topics, store, redis, rabbit, webhooks, routes)
        parts += role.services
    else:
        # An ML-only worker needs no log. With the Kafka consumer on, it would join
        # the pipeline's consumer group (for Faust's leader topic alone), force a
        # stop-the-world rebalance of the pipeline workers whenever it starts or
        # stops, and could become the group's leader. Without Kafka it starts only
        # the web server (ops routes) and the services, and never waits for tables.
        app.boot_strategy = app.BootStrategy(app, enable_kafka=False)
        parts += register_worker_dashboard(
            app, settings, store
        )  # /dashboard here too, with keys of its own
    ml_worker: MLWorker | None = None
    if settings.has_ml:
        ml_worker = MLWorker(settings, rabbit, routes, redis.cancelled)
        # params.stream: deltas through Redis pub/sub, not the log; `output` webhooks from here too.
        streaming.install(OutputWebhooks(redis, Delivery(redis, webhooks, store.webhooks)))
        parts.append(ml_worker)
    quirks.run_with_app(app, Lifecycle(parts))
    register_ops(app, _readiness(app, settings, rabbit, routes, role, ml_worker))
    return app


async def _load_routes(routes: RouteWatcher) -> None:
    """Before the worker serves: a routes file that does not validate stops it, naming file, line and field."""
    routes.load()


def _pipeline_role(
    app: InferstreamApp,
    settings: Settings,
    topics: Topics,
    store: Store,
    redis: RedisClient,
    rabbit: RabbitClient,
    webhooks: WebhookSender,
    routes: RouteWatcher,
) -> PipelineRole:
    """Gateway, tables, agents and bridges; the services they need, in start order."""
    tables = define_tables(app, settings)
    quota = QuotaBook(tables.quota, Reservations(tables.reservations))
    keys = KeyCache.from_settings(settings, store.keys.find_key)
    key_sync = KeySync(settings, store.keys, keys)
    router = OwnerRouter(app, tables.quota, settings.admission_timeout_s)
    hub = NotificationHub(settings, cache=redis)
    idempotency = IdempotencyBook(tables.idempotency, settings.idempotency_ttl_s)
    gateway = Gateway(
        settings=settings,
        quota=quota,
        keys=keys,
        router=router,
        store=store.requests,
        redis=redis,
        hub=hub,
        admission=AdmissionService(
            settings,
            keys=keys,
            router=router,
            quota=quota,
            idempotency=idempotency,
            topics=topics,
            redis=redis,
            routes=routes,
        ),
    )
    register_gateway(app, gateway)
    # The Batch API: files on any worker; batches charged, written and finalized on the user's owner.
    book = BatchBook(tables.batches)
    runner = BatchRunner(
        settings, app=app, book=book, quota=quota, quota_table=tables.quota, router=router, files=store.files,
        batches=store.batches, topics=topics, redis=redis, routes=routes,
    )  # fmt: skip
    book.on_all_terminal = runner.wake
    batches = BatchService(
        settings, router=router, quota=quota, book=book, files=store.files, batches=store.batches, redis=redis,
        routes=routes, runner=runner,
    )  # fmt: skip
    register_files(app, gateway, store.files)
    register_batches(app, gateway, batches)
    quirks.install(app, [settings.requests_topic, settings.results_topic])
    delivery = Delivery(redis, webhooks, store.webhooks)
    dispatched = DispatchedEvents(topics, settings.dispatched_after_ms)
    register_forward(
        app, settings, topics, rabbit, quota, dispatched, batch_cancelled=book.is_cancelled
    )
    register_settle(app, settings, topics, quota, dispatched, on_terminal=book.on_terminal)
    register_sinks(app, settings, topics, ResultSink(settings, store.requests, delivery.on_applied))
    register_watchdog(app, settings, store.requests, rabbit, topics)
    register_orphan_sweep(app, settings, tables.quota, quota)
    app.timer(interval=PENDING_SWEEP_S, on_leader=True)(delivery.resend_pending)

    async def produce_results(pairs: list[tuple[bytes, bytes]]) -> None:
        # Bodies pass through as they are: the ML worker already wrote ResultEvent JSON.
        await send_and_wait(
            topics.results, ((k.decode(), v) for k, v in pairs), value_serializer="raw"
        )

    services: list[ServiceT] = [
        key_sync,
        hub,
        router,
        runner,
        ResultsBridge(settings, rabbit, produce_results),
        DeadLetterRecorder(settings, rabbit, store.dead_letters),
        Observer(app, settings, rabbit),
    ]
    return PipelineRole(keys=keys, key_sync=key_sync, hub=hub, services=services)


def _readiness(
    app: InferstreamApp,
    settings: Settings,
    rabbit: RabbitClient,
    routes: RouteWatcher,
    role: PipelineRole | None,
    ml_worker: MLWorker | None,
) -> ReadinessCheck:
    async def readiness() -> tuple[bool, dict[str, Any]]:
        checks: dict[str, Any] = {
            "roles": sorted(settings.role_set),
            "event_loop": type(asyncio.get_running_loop()).__module__.split(".")[0],
        }
        ready = True
        if role is not None:
            checks["tables_recovered"] = quirks.tables_recovered(app)
            checks["rebalancing"] = bool(app.rebalancing)
            checks["keys_loaded"] = role.keys.loaded
            checks["postgres"] = role.key_sync.postgres_ok
            checks["redis_pubsub"] = role.hub.healthy
            ready = checks["tables_recovered"] and not checks["rebalancing"] and role.keys.loaded
        checks["rabbitmq"] = rabbit.connected
        # A refused reload keeps the old routes serving: detail (routes.reload_error), not unreadiness.
        checks["routes"] = routes.status()
        if ml_worker is not None:
            checks["ml"] = ml_worker.health()
            # An open breaker pauses consumption on purpose: detail, not unreadiness.
            ready = ready and checks["ml"]["ready"]
        return ready, checks

    return readiness
