"""The log's topics: created by the worker with the configured partitions, refused when they break co-partitioning.

Before: ``<ns>.inference.requests`` and ``.results`` were auto-created by the
broker on first use with its default count (Tansu 4) whatever
``INFERSTREAM_PARTITIONS`` said, while the quota changelog got the setting.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from tests.support.pipeline import Pipeline

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="session")]


async def partition_counts(servers: list[str], names: list[str]) -> dict[str, int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=servers)
    await admin.start()
    try:
        present = set(await admin.list_topics()) & set(names)
        described = await admin.describe_topics(sorted(present)) if present else []
        return {t["topic"]: len(t["partitions"]) for t in described}
    finally:
        await admin.close()


@pytest.fixture
async def pipeline12(broker_url: str, model_base_url: str) -> AsyncIterator[Pipeline]:
    # Tansu's default is 4: 12 shows whose count the topics got.
    async with Pipeline.session(broker_url, model_base_url + "/v1", partitions="12", roles="pipeline") as p:
        yield p


async def test_worker_creates_every_topic_with_the_configured_partitions(pipeline12: Pipeline) -> None:
    s = pipeline12.settings
    await pipeline12.start_worker()
    changelog = f"{s.namespace}-quota-changelog"
    counts = await partition_counts(s.bootstrap_servers, [s.requests_topic, s.results_topic, changelog])
    assert counts == {s.requests_topic: 12, s.results_topic: 12, changelog: 12}


async def test_topics_command_creates_them_for_deployments_without_auto_create(pipeline12: Pipeline) -> None:
    s = pipeline12.settings
    code, out = await pipeline12.cli("topics")
    assert code == 0, out
    assert f"{s.requests_topic}: 12 partitions" in out
    counts = await partition_counts(s.bootstrap_servers, [s.requests_topic, s.results_topic])
    assert counts == {s.requests_topic: 12, s.results_topic: 12}
    code, out = await pipeline12.cli("topics", "--check")
    assert code == 0, out


async def test_worker_refuses_a_topic_with_another_partition_count(pipeline12: Pipeline) -> None:
    s = pipeline12.settings
    admin = AIOKafkaAdminClient(bootstrap_servers=s.bootstrap_servers)
    await admin.start()
    try:  # what a broker's auto-create does: the requests topic with the broker's default
        await admin.create_topics([NewTopic(s.requests_topic, 4, 1)])
    finally:
        await admin.close()
    worker = await pipeline12.start_worker(wait=False)
    assert worker.proc is not None
    started = time.monotonic()
    code = worker.proc.wait(timeout=90)
    log = worker.log_tail(200)
    assert code != 0, log
    assert f"'{s.requests_topic}' has 4 partitions but INFERSTREAM_PARTITIONS=12" in log, log
    print(f"worker refused in {time.monotonic() - started:.1f}s")
    # It refused before creating anything else.
    counts = await partition_counts(s.bootstrap_servers, [s.requests_topic, s.results_topic])
    assert counts == {s.requests_topic: 4}
