"""Every Inferstream setting, read once from ``INFERSTREAM_*`` environment variables.

Nothing else in the code base reads the environment: build a :class:`Settings`
with :meth:`Settings.from_env` (or directly, in tests) and hand it down.
Each field documents its variable and default; the README table is generated
from the same metadata (``python -m inferstream.settings``).
"""

from __future__ import annotations

import ipaddress
import os
import sys
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Literal

Role = Literal["pipeline", "ml"]
Priority = Literal["high", "normal", "low"]
PRIORITIES: tuple[Priority, ...] = ("low", "normal", "high")  # ascending
PREFIX = "INFERSTREAM_"


def _setting(default: Any, doc: str, *, secret: bool = False) -> Any:
    return field(default=default, metadata={"doc": doc, "secret": secret})


@dataclass(frozen=True)
class Settings:
    """One deployment's configuration. Frozen: build a new one to change it."""

    broker_url: str = _setting(
        "kafka://127.0.0.1:9092", "Kafka-protocol broker (Apache Kafka, Redpanda, or Tansu locally)."
    )
    rabbitmq_url: str = _setting("amqp://guest:guest@127.0.0.1:5672/", "RabbitMQ for work distribution.", secret=True)
    postgres_dsn: str = _setting(
        "postgresql://postgres@127.0.0.1:5432/postgres", "PostgreSQL, the system of record.", secret=True
    )
    redis_url: str = _setting("redis://127.0.0.1:6379/0", "Redis: result cache and notification fan-out.")
    model_url: str = _setting(
        "http://127.0.0.1:8000/v1", "Base URL of the OpenAI-compatible model service (vLLM, Ollama, OpenAI, ours)."
    )
    model_api_key: str = _setting("", "Bearer key sent to the model service, if it needs one.", secret=True)
    web_host: str = _setting("127.0.0.1", "Host this worker's HTTP server binds and advertises to its peers.")
    web_port: int = _setting(6066, "Port of this worker's HTTP server (gateway, health, metrics).")
    namespace: str = _setting(
        "inferstream",
        "Prefix of every topic, queue, consumer group and the PostgreSQL schema; "
        "deployments and test runs with different namespaces never see each other.",
    )
    roles: str = _setting(
        "pipeline,ml",
        "Comma-separated roles of this worker: `pipeline` (gateway, tables, agents, bridges; takes log "
        "partitions) and `ml` (ML workers consuming RabbitMQ; takes no partitions).",
    )
    partitions: int = _setting(8, "Partitions of the requests and results topics and the quota changelog.")
    replication_factor: int = _setting(1, "Replication factor of the topics this app creates (3 in production).")
    session_timeout_s: float = _setting(
        60.0, "Consumer-group session timeout. A group join waits half of it; local runs use 6."
    )
    fetch_max_wait_ms: int = _setting(
        1500,
        "Longest wait of one consumer fetch. Kafka answers early when data arrives; Tansu does not, "
        "so `scripts/up` uses 5 (each log hop otherwise adds ~0.75 s; at 20, ~10 ms).",
    )
    event_loop: str = _setting(
        "uvloop",
        "`uvloop` or `asyncio`: the worker's event loop (uvloop admitted 40% more requests/s here).",
    )
    table_store: str = _setting("memory://", "Faust table store: `memory://` or `rocksdb://` (production).")
    data_dir: str = _setting("/tmp/inferstream", "Prefix of the Faust data directory (`<prefix>-<namespace>-<port>`; RocksDB tables live there).")
    key_secret: str = _setting(
        "dev-insecure-key-secret", "Server secret for HMAC-SHA256 key hashing. Set it in production.", secret=True
    )
    key_refresh_s: float = _setting(
        30.0,
        "How often each worker reloads every key and plan: a safety net, since new keys are looked up on "
        "first use and revocations and plan changes are pushed (LISTEN/NOTIFY) within milliseconds.",
    )
    key_negative_ttl_s: float = _setting(
        10.0, "How long a worker remembers that a key digest is unknown (a new key clears it at once)."
    )
    key_lookups_per_s: float = _setting(
        20.0,
        "PostgreSQL lookups of unknown keys per second per worker; past it (and the burst) an unknown key "
        "gets 503 `unavailable`, so a flood of bad keys cannot load the database.",
    )
    key_lookup_burst: float = _setting(20.0, "Lookups of unknown keys a worker may make at once before the rate applies.")
    key_lookup_timeout_s: float = _setting(
        2.0, "How long a lookup of an unknown key may take before the request gets 503 `unavailable`."
    )
    max_body_bytes: int = _setting(1_048_576, "Largest accepted request body, in bytes (413 above).")
    default_max_tokens: int = _setting(256, "`max_tokens` assumed for generate when the request omits it.")
    models: str = _setting(
        "generate:sim-gpt,embed:all-MiniLM-L6-v2",
        "Model routes `task:model,...`; the first model of each task is its default. "
        "Each route gets its own RabbitMQ work queue.",
    )
    routes_file: str = _setting(
        "",
        "Routes file (YAML `.yaml`/`.yml` or TOML `.toml`): per route its backends, weights, fallbacks and "
        "limits (README, Routes). Empty: one backend per route from `INFERSTREAM_MODELS` and "
        "`INFERSTREAM_MODEL_URL`, limits from the `INFERSTREAM_ML_*` settings.",
    )
    routes_poll_s: float = _setting(
        2.0,
        "How often each worker checks the routes file for a change (SIGHUP reloads at once); 0 turns the "
        "polling off.",
    )
    result_ttl_s: int = _setting(3600, "How long results stay in the Redis cache.")
    idempotency_ttl_s: int = _setting(86_400, "How long an Idempotency-Key is remembered.")
    admission_timeout_s: float = _setting(5.0, "How long admission waits for the owner or the log before 503.")
    watchdog_stall_s: float = _setting(
        120.0,
        "A request still `queued` this long after admission is dispatched again by the leader's watchdog "
        "(normally the forward agent dispatches within milliseconds).",
    )
    watchdog_interval_s: float = _setting(15.0, "How often the leader's watchdog looks for stalled requests.")
    orphan_reservation_s: float = _setting(
        300.0,
        "How long an admission may stay unconfirmed (its request not read from the log) before its "
        "reservation is released as an orphan of a crash, when no later request of the user shows it sooner.",
    )
    # ML workers
    ml_prefetch: int = _setting(64, "RabbitMQ prefetch per ML worker queue consumer.")
    ml_concurrency: int = _setting(16, "Concurrent model calls per model endpoint in one ML worker.")
    ml_batch_size: int = _setting(32, "Largest embedding batch sent in one model call.")
    ml_batch_wait_ms: int = _setting(10, "How long a batch waits to fill before it is sent.")
    ml_batch_concurrency: int = _setting(
        2, "Embedding batches in flight per model in one ML worker; more texts gather while they are out."
    )
    dispatched_after_ms: int = _setting(
        250,
        "A request is reported `dispatched` only if it has not moved on this long after the forward agent "
        "handed it to RabbitMQ; faster work goes from `queued` to its next status, which carries "
        "`dispatched_at`. 0 reports `dispatched` always, at once.",
    )
    ml_running_after_ms: int = _setting(
        50,
        "A request is reported `running` once its model work has taken this long; faster work goes "
        "straight to its terminal status. 0 reports `running` always.",
    )
    ml_retry_budget_s: float = _setting(
        120.0,
        "How long transient model failures (connection errors, timeouts, 408, 409, 425, 429, 5xx) of one "
        "request are retried, from its first model call and never past its deadline; time waiting for an "
        "open breaker counts. Then it fails and is dead-lettered.",
    )
    ml_max_attempts: int = _setting(
        50, "Upper bound on one request's model call attempts; the retry budget normally ends retrying first."
    )
    ml_retry_base_s: float = _setting(0.2, "First retry backoff; doubles per attempt, with full jitter.")
    ml_retry_max_s: float = _setting(
        10.0, "Longest jittered retry backoff; a server's `Retry-After` is added to it, within the retry budget."
    )
    ml_call_timeout_s: float = _setting(60.0, "Timeout of one model call.")
    ml_breaker_threshold: int = _setting(5, "Consecutive failures that open an endpoint's circuit breaker.")
    ml_breaker_reset_s: float = _setting(5.0, "How long an open breaker waits before a half-open probe.")
    ml_rate_limit_rps: float = _setting(0.0, "Model calls per second per endpoint; 0 means unlimited.")
    ml_shutdown_grace_s: float = _setting(30.0, "On SIGTERM, how long in-flight work may take to finish.")
    # Sinks and notifications
    sink_batch_size: int = _setting(500, "Largest batch of rows the PostgreSQL sink writes at once.")
    sink_batch_wait_ms: int = _setting(5, "How long the sink and forward agents wait to fill a batch (latency vs batch size).")
    webhook_secret: str = _setting(
        "dev-insecure-webhook-secret", "HMAC-SHA256 secret signing webhook deliveries.", secret=True
    )
    webhook_max_attempts: int = _setting(6, "Webhook delivery attempts before it is marked failed.")
    webhook_allow: str = _setting(
        "",
        "Comma-separated hostnames and CIDRs a `callback_url` may reach although they are internal "
        "(loopback, private, link-local, ...); empty: public addresses only. For development: "
        "`scripts/up` sets `127.0.0.0/8,::1,localhost`.",
    )
    webhook_resolve_timeout_s: float = _setting(
        2.0, "How long submit waits for a `callback_url` host to resolve before refusing it (400)."
    )
    sse_heartbeat_s: float = _setting(15.0, "Seconds between SSE heartbeat comments.")
    stream_token_ttl_s: float = _setting(
        300.0,
        "Lifetime of an event-stream token (`POST /v1/requests/{id}/events/token`), which lets a browser's "
        "`EventSource` follow one request of its owner without an `Authorization` header.",
    )
    cors_origins: str = _setting(
        "",
        "Comma-separated origins (`https://app.example.com`) whose pages may call the API from a browser "
        "(CORS); empty: none.",
    )
    queue_eta: str = _setting(
        "on",
        "`on`: queue position and ETA on waiting requests' documents and events, and 429 `deadline_unreachable` "
        "(streams/queue_eta.py); `off`: none of it, and no counting or polling for it.",
    )
    # Batch API (OpenAI-compatible files and batches)
    file_max_bytes: int = _setting(104_857_600, "Largest file `POST /v1/files` accepts, in bytes (413 above).")
    batch_max_lines: int = _setting(50_000, "Most lines (requests) one batch input file may hold (400 above).")
    batch_chunk_lines: int = _setting(
        500, "Lines of a batch written to the requests topic per step (each step's acks are awaited before the next)."
    )
    batch_poll_s: float = _setting(
        0.5, "How often the owner of a user's batches looks for lines to write and batches to finalize."
    )
    # Operations
    log_format: str = _setting(
        "text", "`text` (for a terminal) or `json` (one object per line, with request and trace ids where known)."
    )
    observe_interval_s: float = _setting(
        5.0, "How often a worker samples queue depths and consumer lag for `/metrics` and the dashboard."
    )
    sse_poll_s: float = _setting(1.0, "SSE poll interval of the store when Redis pub/sub is unavailable.")

    # ---- derived names -------------------------------------------------
    @property
    def role_set(self) -> frozenset[str]:
        return frozenset(r.strip() for r in self.roles.split(",") if r.strip())

    @property
    def has_pipeline(self) -> bool:
        return "pipeline" in self.role_set

    @property
    def has_ml(self) -> bool:
        return "ml" in self.role_set

    @property
    def requests_topic(self) -> str:
        return f"{self.namespace}.inference.requests"

    @property
    def results_topic(self) -> str:
        return f"{self.namespace}.inference.results"

    @property
    def bootstrap_servers(self) -> list[str]:
        """``kafka://h1:9092;kafka://h2:9092`` -> ``["h1:9092", "h2:9092"]`` for plain aiokafka clients."""
        parts = self.broker_url.replace(",", ";").split(";")
        return [p.strip().split("://", 1)[-1].rstrip("/") for p in parts if p.strip()]

    @property
    def db_schema(self) -> str:
        return self.namespace.replace("-", "_").replace(".", "_")

    @property
    def canonical_url(self) -> str:
        return f"http://{self.web_host}:{self.web_port}"

    @property
    def model_routes(self) -> dict[str, list[str]]:
        """``{"generate": ["sim-gpt", ...], "embed": [...]}`` in declared order."""
        routes: dict[str, list[str]] = {}
        for item in self.models.split(","):
            item = item.strip()
            if not item:
                continue
            task, _, model = item.partition(":")
            routes.setdefault(task.strip(), []).append(model.strip())
        return routes

    # ---- safety ----------------------------------------------------------
    def insecure_defaults(self, bind: str | None = None) -> list[str]:
        """Why this worker must not serve ``bind`` (default: ``web_host``) as configured (empty: it may).

        The default secrets are published in this repository: with them anyone can
        forge webhook signatures, and key digests lose the protection of a server secret.
        """
        host = bind or self.web_host
        if _is_loopback(host):
            return []
        return [
            f"{PREFIX}{name.upper()} is the published default while the web server binds "
            f"{host!r} (not loopback): set {PREFIX}{name.upper()} to a long random secret"
            for name in _PUBLISHED_SECRETS
            if getattr(self, name) == _DEFAULTS[name]
        ]

    # ---- construction --------------------------------------------------
    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(PREFIX + f.name.upper())
            if raw is None:
                continue
            kind = type(f.default) if f.default is not MISSING else str
            try:
                values[f.name] = kind(raw)
            except ValueError as exc:
                raise ValueError(f"{PREFIX}{f.name.upper()}={raw!r} is not a valid {kind.__name__}") from exc
        return cls(**values)

    @classmethod
    def env_names(cls) -> frozenset[str]:
        return frozenset(PREFIX + f.name.upper() for f in fields(cls))

    def masked(self) -> dict[str, Any]:
        """The settings with secrets hidden, for logs."""
        return {
            f.name: ("***" if f.metadata.get("secret") and getattr(self, f.name) else getattr(self, f.name))
            for f in fields(self)
        }


_PUBLISHED_SECRETS = ("key_secret", "webhook_secret")
_DEFAULTS: dict[str, Any] = {f.name: f.default for f in fields(Settings)}


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        name = host.rstrip(".").lower()
        return name == "localhost" or name.endswith(".localhost")


def markdown_table() -> str:
    """The README's settings table."""
    rows = ["| Variable | Default | Meaning |", "|---|---|---|"]
    for f in fields(Settings):
        rows.append(f"| `{PREFIX}{f.name.upper()}` | `{f.default}` | {f.metadata['doc']} |")
    return "\n".join(rows)


if __name__ == "__main__":  # pragma: no cover
    sys.stdout.write(markdown_table() + "\n")
