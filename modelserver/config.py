"""The model server's start-up options, its runtime fault knobs and its call counters."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

EMBEDDING_MODEL = "all-MiniLM-L6-v2"
EMBEDDING_MODEL_ALIASES = frozenset({EMBEDDING_MODEL, "sentence-transformers/all-MiniLM-L6-v2"})
EMBEDDING_DIM = 384
GENERATION_MODEL = "sim-gpt"
RETRY_AFTER_STATUSES = frozenset({429, 503})


@dataclass(frozen=True)
class ServerConfig:
    """What ``python -m modelserver`` was started with."""

    host: str = "127.0.0.1"
    port: int = 8000
    latency_ms: int = 0
    token_latency_ms: int = 0
    error_rate: float = 0.0
    error_status: int = 503
    embed_batch_max: int = 256
    embeddings: bool = True
    torch_threads: int = 2
    seed: int | None = None
    max_body_bytes: int = 8 * 1024 * 1024
    access_log: bool = False


@dataclass
class Faults:
    """Injected latency and failures; tests change them at run time via ``POST /admin/faults``.

    A failure is decided when a call arrives, before its latency, so ``fail_next``
    hits exactly the next N calls in arrival order.
    """

    latency_ms: int = 0
    token_latency_ms: int = 0  # streamed completions: the pause before each chunk after the first
    error_rate: float = 0.0
    error_status: int = 503
    fail_next: int = 0
    apply_to_embeddings: bool = False
    record_stream_times: bool = False  # bench.streaming: when each chunk was sent (GET /admin/stream-times)
    rng: random.Random = field(default_factory=random.Random, repr=False)

    def should_fail(self) -> bool:
        if self.fail_next > 0:
            self.fail_next -= 1
            return True
        return self.error_rate > 0 and self.rng.random() < self.error_rate

    def as_dict(self) -> dict[str, Any]:
        return {
            "latency_ms": self.latency_ms,
            "token_latency_ms": self.token_latency_ms,
            "error_rate": self.error_rate,
            "error_status": self.error_status,
            "fail_next": self.fail_next,
            "apply_to_embeddings": self.apply_to_embeddings,
            "record_stream_times": self.record_stream_times,
        }

    def update(self, changes: dict[str, Any]) -> None:
        """Apply validated changes (see ``validation.parse_faults``)."""
        for name, value in changes.items():
            setattr(self, name, value)


@dataclass
class Stats:
    """Counters of calls that reached the model (valid requests, injected failures included).

    ``batch_sizes`` maps an embedding call's input count to how many calls had
    it; ``generate_batch_sizes`` does the same for prompts per completion call.
    """

    embedding_calls: int = 0
    embedding_inputs: int = 0
    embedding_failures: int = 0
    generate_calls: int = 0
    generate_inputs: int = 0
    generate_failures: int = 0
    streams_started: int = 0
    streams_completed: int = 0
    streams_aborted: int = 0  # the client went away mid-stream: generation stopped there
    stream_chunks: int = 0
    batch_sizes: Counter[int] = field(default_factory=Counter)
    generate_batch_sizes: Counter[int] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, Any]:
        return {
            "embedding_calls": self.embedding_calls,
            "embedding_inputs": self.embedding_inputs,
            "embedding_failures": self.embedding_failures,
            "generate_calls": self.generate_calls,
            "generate_inputs": self.generate_inputs,
            "generate_failures": self.generate_failures,
            "streams_started": self.streams_started,
            "streams_completed": self.streams_completed,
            "streams_aborted": self.streams_aborted,
            "stream_chunks": self.stream_chunks,
            "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())},
            "generate_batch_sizes": {
                str(k): v for k, v in sorted(self.generate_batch_sizes.items())
            },
        }

    def reset(self) -> None:
        fresh = Stats()
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(fresh, name))
