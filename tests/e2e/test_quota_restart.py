"""kill -9 under load: the quota table comes back from its changelog and never admits past the limit."""

from __future__ import annotations

import asyncio
import signal
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from inferstream import clock
from streams.commands.audit import audit
from tests.support.pipeline import Api, Pipeline
from tests.support.wait import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="session")]

LIMIT = 150
LOADERS = 12


@pytest.fixture(scope="module")
async def pipeline(broker_url: str, model_base_url: str) -> AsyncIterator[Pipeline]:
    # No ML role: admission and the table are what is under test.
    async with Pipeline.session(broker_url, model_base_url + "/v1", roles="pipeline") as p:
        yield p


class Load:
    """Concurrent submitters against one URL, tallying every outcome."""

    def __init__(self, url: str, key: str) -> None:
        self.url, self.key = url, key
        self.tally: Counter[str] = Counter()
        self.admitted_ids: list[str] = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def _submitter(self, http: aiohttp.ClientSession) -> None:
        api = Api(http, self.url, self.key)
        while not self._stop.is_set():
            try:
                status, body, headers = await api.submit({"task": "embed", "input": "load"})
            except aiohttp.ClientConnectorError:
                self.tally["refused"] += 1  # never reached a worker: certainly not admitted
                await asyncio.sleep(0.05)  # pacing against a dead port, not synchronisation
                continue
            except (TimeoutError, aiohttp.ClientError):
                self.tally["in_doubt"] += 1  # sent, answer lost: may or may not be charged
                continue
            if status == 429:
                self.tally[body["error"]["type"]] += 1
                if body["error"]["type"] == "request_quota_exceeded":
                    self._stop.set()
            elif status == 503:
                assert int(headers["Retry-After"]) >= 1
                self.tally["unavailable"] += 1
                await asyncio.sleep(0.05)
            else:
                assert status == 202, (status, body)
                self.tally["admitted"] += 1
                self.admitted_ids.append(body["request_id"])

    async def run(self) -> None:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
            self._tasks = [asyncio.ensure_future(self._submitter(http)) for _ in range(LOADERS)]
            await asyncio.gather(*self._tasks)

    def stop(self) -> None:
        self._stop.set()


async def used(api: Api) -> int:
    status, body, _ = await api.call("GET", "/v1/quota")
    assert status == 200, body
    return int(body["requests"]["used"])


async def test_kill_9_under_load_recovers_usage_and_never_over_admits(
    pipeline: Pipeline, http: aiohttp.ClientSession
) -> None:
    plan, user = f"plan-{uuid.uuid4().hex[:6]}", f"user-{uuid.uuid4().hex[:6]}"
    await pipeline.set_plan(plan, requests_per_day=LIMIT, tokens_per_day=10**9)
    worker = await pipeline.start_worker()
    key = await pipeline.create_key(user, plan)
    await Api(http, worker.url, key).wait_key_active()

    before = Load(worker.url, key)
    running = asyncio.ensure_future(before.run())

    async def under_way() -> bool:
        return before.tally["admitted"] >= LIMIT // 3

    await wait_for(under_way, timeout=60, what="a third of the quota admitted")
    worker.kill(signal.SIGKILL)  # mid-load: submissions are in flight
    before.stop()
    await running
    seen: dict[str, Any] = dict(before.tally)
    assert before.tally["admitted"] < LIMIT, seen

    restarted = await pipeline.start_worker()
    api = await Api(http, restarted.url, key).wait_key_active(timeout=30)
    recovered = await used(api)
    from_log = await audit(
        pipeline.settings, f"{pipeline.namespace}-quota-changelog", user, clock.utc_day(clock.now())
    )
    # Every 202 survived the crash; an answer lost in the crash may have been charged.
    assert before.tally["admitted"] <= recovered <= before.tally["admitted"] + before.tally["in_doubt"], (
        recovered,
        seen,
        from_log,
    )
    # The charge is written before the request: whatever is in the log is charged.
    assert from_log[0].requests_used <= recovered, (recovered, from_log)
    if before.tally["in_doubt"] == 0:
        assert recovered == before.tally["admitted"], (recovered, seen)

    after = Load(restarted.url, key)
    await asyncio.wait_for(after.run(), timeout=120)
    total = before.tally["admitted"] + after.tally["admitted"]
    assert after.tally["in_doubt"] == 0, dict(after.tally)
    assert await used(api) == LIMIT
    # Exactly the limit, less only what the crash charged without an answer.
    assert recovered - before.tally["admitted"] + total == LIMIT, (recovered, seen, dict(after.tally))
    assert total <= LIMIT
