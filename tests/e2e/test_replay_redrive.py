"""Replay and redrive as operators run them: ``faust -A streams replay|redrive`` subprocesses on a live pipeline."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import aiohttp
import pytest

from tests.support.pipeline import Api, Pipeline, WorkerProcess
from tests.support.wait import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="session")]


async def cli(pipeline: Pipeline, *args: str, timeout: float = 90) -> str:
    """Run ``faust -A streams ARGS`` with the pipeline's environment; its output, or fail."""
    code, text = await pipeline.cli(*args, timeout=timeout)
    assert code == 0, f"faust {' '.join(args)} exited {code}:\n{text}"
    return text


async def rows(pipeline: Pipeline, ids: list[str]) -> list[dict[str, Any]]:
    pool = await pipeline.store.connect()
    found = await pool.fetch(
        "SELECT * FROM requests WHERE request_id = ANY($1) ORDER BY request_id", ids
    )
    return [dict(r) for r in found]


@pytest.fixture(scope="module")
async def pipeline(broker_url: str, model_base_url: str) -> AsyncIterator[Pipeline]:
    async with Pipeline.session(broker_url, model_base_url + "/v1", ml_max_attempts="2") as p:
        yield p


@pytest.fixture(scope="module")
async def worker(pipeline: Pipeline) -> WorkerProcess:
    return await pipeline.start_worker()


@pytest.fixture
async def api(http: aiohttp.ClientSession, pipeline: Pipeline, worker: WorkerProcess) -> Api:
    return await Api(http, worker.url, await pipeline.create_key("carol")).wait_key_active()


async def test_replay_restores_deleted_rows_identically(api: Api, pipeline: Pipeline) -> None:
    bodies: list[dict[str, Any]] = [
        {"task": "embed", "input": ["replay me", "and me"], "metadata": {"n": 1}},
        {"task": "generate", "input": "a story", "params": {"max_tokens": 8}, "priority": "high"},
        {"task": "embed", "input": "third", "deadline_s": 600},
        {"task": "generate", "input": "another", "params": {"max_tokens": 4, "temperature": 0.5}},
    ]
    ids = []
    mid = ""
    for i, body in enumerate(bodies):
        if i == 2:
            # Record times have millisecond precision: split on the next millisecond, and let the
            # clock pass it before the next record is written.
            mid_ms = int(time.time() * 1000) + 1
            mid = datetime.fromtimestamp(mid_ms / 1000, UTC).isoformat()
            await asyncio.sleep(max(0.0, (mid_ms + 2) / 1000 - time.time()))
        status, accepted, _ = await api.submit(body)
        assert status == 202, accepted
        ids.append(accepted["request_id"])
    for rid in ids:
        await api.wait_status(rid, {"completed"})
    # The sink writes the terminal row before it is cached, but wait for every row to be final.
    await wait_for(
        lambda: _all_completed(pipeline, ids), timeout=30, what="rows completed in PostgreSQL"
    )
    before = await rows(pipeline, ids)
    assert all(r["input"] and r["started_at"] and r["dispatched_at"] for r in before), before

    pool = await pipeline.store.connect()
    await pool.execute("DELETE FROM requests WHERE request_id = ANY($1)", ids)
    assert await rows(pipeline, ids) == []

    out = await cli(pipeline, "replay", "--topic", "results", "--from", "0")
    assert re.search(r"replayed \S+\.inference\.results: \d+ messages read", out), out
    assert "partition 0:" in out
    partial = await rows(pipeline, ids)
    assert [r["status"] for r in partial] == ["completed"] * len(ids)
    assert all(r["input"] is None for r in partial)  # only the requests topic knows the input

    out = await cli(pipeline, "replay", "--topic", pipeline.settings.requests_topic, "--from", "0")
    assert "inference.requests" in out
    assert await rows(pipeline, ids) == before

    # Idempotent: a second pass over both changes nothing.
    out = await cli(pipeline, "replay", "--topic", "results", "--from", "0")
    assert " 0 rows changed" in out, out
    assert await rows(pipeline, ids) == before

    # A time range after the last record reads nothing.
    later = datetime.now(UTC).isoformat()
    out = await cli(pipeline, "replay", "--topic", "requests", "--from", later)
    assert ": 0 messages read" in out, out
    # Time ranges split the four requests of this module's log where the clock stood.
    out = await cli(pipeline, "replay", "--topic", "requests", "--from", mid)
    assert ": 2 messages read" in out, out
    out = await cli(pipeline, "replay", "--topic", "requests", "--from", "0", "--until", mid)
    assert ": 2 messages read" in out, out
    out = await cli(pipeline, "replay", "--topic", "requests", "--from", "1", "--until", "3")
    assert ": 2 messages read" in out and "offsets 1..2 (2 messages)" in out, out


async def _all_completed(pipeline: Pipeline, ids: list[str]) -> bool:
    found = await rows(pipeline, ids)
    return len(found) == len(ids) and all(r["status"] == "completed" for r in found)


async def test_redrive_resubmits_a_dead_letter_under_a_new_id(
    api: Api, pipeline: Pipeline, http: aiohttp.ClientSession, model_base_url: str
) -> None:
    faults_url = model_base_url + "/admin/faults"
    async with http.get(faults_url) as r:
        saved = {k: v for k, v in (await r.json()).items() if k in ("error_status", "fail_next")}
    try:
        async with http.post(faults_url, json={"error_status": 400, "fail_next": 1}) as r:
            assert r.status == 200
        status, accepted, _ = await api.submit(
            {
                "task": "generate",
                "input": "doomed",
                "params": {"max_tokens": 5},
                "metadata": {"tag": "x"},
            }
        )
        assert status == 202
        old = accepted["request_id"]
        failed = await api.wait_status(old, {"failed", "completed"})
    finally:
        async with http.post(faults_url, json={**saved, "fail_next": 0}) as r:
            assert r.status == 200
    assert failed["status"] == "failed", failed
    assert failed["error"]["type"]

    async def recorded() -> dict[str, Any] | None:
        return await pipeline.store.dead_letters.get_dead_letter(old)

    dead = await wait_for(recorded, timeout=30, what="the dead letter in PostgreSQL")
    assert dead["user_id"] == "carol" and dead["payload"]["input"] == ["doomed"]
    assert dead["error"]["type"] == failed["error"]["type"]

    listed = await cli(pipeline, "redrive", "--list")
    assert old in listed and "user=carol" in listed, listed

    out = await cli(pipeline, "redrive", old)
    match = re.search(rf"{old} -> (req_[0-9a-f]{{24}})", out)
    assert match, out
    new = match.group(1)
    done = await api.wait_status(new, {"completed", "failed"}, timeout=60)
    assert done["status"] == "completed", done
    assert done["metadata"] == {"tag": "x", "redrive_of": old}
    assert done["result"]["text"]

    dead = await pipeline.store.dead_letters.get_dead_letter(old)
    assert dead is not None and dead["redriven_at"] is not None and dead["redrive_count"] == 1
    (old_row,) = await rows(pipeline, [old])
    assert old_row["status"] == "failed"  # a terminal row never goes back
    assert old_row["history"][-1]["status"] == "redriven"
    assert old_row["history"][-1]["request_id"] == new
    assert old not in await cli(pipeline, "redrive", "--list")
    assert old in await cli(pipeline, "redrive", "--list", "--all")
