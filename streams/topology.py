"""Creates the log's topics with the configured partitions, and refuses a log that breaks co-partitioning.

Faust declares only its internal topics (changelogs, repartition and leader
topics). Our requests and results topics would otherwise be created by the
broker's auto-create on first use, with the broker's default partition count
(Tansu 4, Apache Kafka and Redpanda 1): measured with ``INFERSTREAM_PARTITIONS=12``,
requests 4, results 4, quota changelog 12. One worker owns a user's requests,
results and quota only when all three have the same partition count (same key,
same partitioner), so before the app consumes or produces anything it creates
every topic it uses with ``INFERSTREAM_PARTITIONS`` and
``INFERSTREAM_REPLICATION_FACTOR``, and refuses to start, naming the topic and
both counts, when one that exists already disagrees. ``faust -A streams topics``
(``streams/commands/topics.py``) does the same for deployments that disable auto-create.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import faust
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError

from inferstream.errors import TopologyError
from inferstream.settings import Settings
from streams.application import InferstreamApp

__all__ = ["TopicSpec", "changelogs_of", "check_copartitioned", "ensure_topics", "existing_counts", "install_topology", "topic_specs"]

log = logging.getLogger(__name__)

TOPIC_ALREADY_EXISTS = 36
COMPACTED = {"cleanup.policy": "compact"}


@dataclass(frozen=True)
class TopicSpec:
    """One topic the app uses: its name, what it is for, and how it must be created."""

    name: str
    purpose: str
    partitions: int
    replication: int
    config: Mapping[str, str] = field(default_factory=dict)


def topic_specs(settings: Settings, changelogs: Iterable[tuple[str, str]]) -> list[TopicSpec]:
    """Our topics and the tables' changelogs (``(table, topic)``), all with the configured partitions."""
    n, rf = settings.partitions, settings.replication_factor
    specs = [
        TopicSpec(settings.requests_topic, "requests topic", n, rf),
        TopicSpec(settings.results_topic, "results topic", n, rf),
    ]
    specs += [TopicSpec(topic, f"{table} changelog", n, rf, COMPACTED) for table, topic in changelogs]
    return specs


def check_copartitioned(specs: Sequence[TopicSpec], counts: Mapping[str, int], env_name: str) -> None:
    """Raise :class:`TopologyError` naming the first topic whose partition count breaks co-partitioning.

    The reference is an existing changelog's count (the tables' state lives on
    those partitions), else the configured count.
    """
    changelogs = [s for s in specs if s.config == COMPACTED and s.name in counts]
    ref_name, ref_count = (changelogs[0].name, counts[changelogs[0].name]) if changelogs else (None, None)
    for spec in specs:
        actual = counts.get(spec.name)
        if actual is None:
            continue
        if ref_count is not None and actual != ref_count:
            raise TopologyError(
                f"{spec.purpose} {spec.name!r} has {actual} partitions but the changelog {ref_name!r} has "
                f"{ref_count}: a user's requests, results and quota must share one partition count. "
                f"Recreate the topics with the same count ({env_name}={spec.partitions} is configured).",
                topic=spec.name, expected=ref_count, actual=actual,
            )
        if actual != spec.partitions:
            raise TopologyError(
                f"{spec.purpose} {spec.name!r} has {actual} partitions but {env_name}={spec.partitions}: "
                f"set {env_name}={actual} to use the existing topics, or recreate them with {spec.partitions}.",
                topic=spec.name, expected=spec.partitions, actual=actual,
            )


async def _partition_counts(admin: AIOKafkaAdminClient, names: Sequence[str]) -> dict[str, int]:
    # Listing first: a metadata request naming a missing topic makes an auto-creating broker create it.
    present = set(await admin.list_topics()) & set(names)
    if not present:
        return {}
    return {
        t["topic"]: len(t["partitions"])
        for t in await admin.describe_topics(sorted(present))
        if t["error_code"] == 0 and t["partitions"]
    }


@asynccontextmanager
async def _admin(servers: Sequence[str]) -> AsyncIterator[AIOKafkaAdminClient]:
    """An admin client for the block; the broker's errors come out as :class:`TopologyError`."""
    admin = AIOKafkaAdminClient(bootstrap_servers=list(servers), client_id="inferstream-topology")
    try:
        await admin.start()
        yield admin
    except KafkaError as exc:
        raise TopologyError(f"cannot read or create the log's topics at {list(servers)}: {exc!r}", topic="*") from exc
    finally:
        await admin.close()


async def ensure_topics(
    servers: Sequence[str], specs: Sequence[TopicSpec], *, env_name: str = "INFERSTREAM_PARTITIONS", timeout_s: float = 30.0
) -> dict[str, int]:
    """Create the missing topics, wait until the broker lists them, check co-partitioning; the counts."""
    names = [s.name for s in specs]
    async with _admin(servers) as admin:
        counts = await _partition_counts(admin, names)
        # Refuse before creating anything: a half-created topology helps no one.
        check_copartitioned(specs, counts, env_name)
        missing = [s for s in specs if s.name not in counts]
        if missing:
            response = await admin.create_topics(
                [NewTopic(s.name, s.partitions, s.replication, topic_configs=dict(s.config)) for s in missing]
            )
            for topic, code, *rest in response.topic_errors:
                if code not in (0, TOPIC_ALREADY_EXISTS):  # another worker may have just created it
                    message = rest[0] if rest else ""
                    raise TopologyError(f"creating topic {topic!r} failed: error {code} {message}", topic=topic)
            log.info("created topics %s", ", ".join(f"{s.name} ({s.partitions})" for s in missing))
        deadline = time.monotonic() + timeout_s
        while len(counts := await _partition_counts(admin, names)) < len(names):
            if time.monotonic() > deadline:
                absent = sorted(set(names) - set(counts))
                raise TopologyError(f"topics {absent} not visible {timeout_s:.0f}s after creation", topic=absent[0])
            await asyncio.sleep(0.1)  # polling the broker's metadata, not synchronising with our own code
    check_copartitioned(specs, counts, env_name)
    return counts


def changelogs_of(app: faust.App) -> list[tuple[str, str]]:
    """``(table name, changelog topic)`` of every table defined on the app."""
    return [(t.name, t.changelog_topic.get_topic_name()) for t in app.tables.values()]


async def existing_counts(servers: Sequence[str], names: Sequence[str]) -> dict[str, int]:
    """Partition counts of those of ``names`` that exist (creating nothing)."""
    async with _admin(servers) as admin:
        return await _partition_counts(admin, names)


def install_topology(app: InferstreamApp, settings: Settings) -> None:
    """Before the worker consumes or produces: create our topics, refuse a mis-partitioned log."""

    async def preflight() -> None:
        await ensure_topics(settings.bootstrap_servers, topic_specs(settings, changelogs_of(app)))

    if settings.has_pipeline:  # an ML-only worker never touches the log
        app.preflight.append(preflight)
