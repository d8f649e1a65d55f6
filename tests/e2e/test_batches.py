"""Batches on real workers over plain HTTP: run to completion with output and error files, refusals that
charge nothing, a cancel midway, and exact counts and quota.

The input files are written straight into PostgreSQL (``Store.files.put``), so these tests exercise the
batch side alone; uploads through ``POST /v1/files`` and the ``openai`` client are covered by
``test_batch_api.py``.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
import pytest

from inferstream.ids import new_file_id
from tests.support.modelserver import model_faults
from tests.support.pipeline import Api, Pipeline, WorkerProcess
from tests.support.wait import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="session")]

GENERATE_MODEL = "sim-gpt"
EMBED_MODEL = "all-MiniLM-L6-v2"
FINAL = {"completed", "failed", "expired", "cancelled"}


@dataclass
class Stack:
    pipeline: Pipeline
    worker: WorkerProcess
    ml: WorkerProcess


@pytest.fixture(scope="module")
async def stack(broker_url: str, model_base_url: str) -> AsyncIterator[Stack]:
    async with Pipeline.session(
        broker_url, model_base_url + "/v1", batch_chunk_lines="5", batch_poll_s="0.2"
    ) as pipeline:
        await pipeline.set_plan("batchy", requests_per_day=10_000, tokens_per_day=10**7)
        await pipeline.set_plan("small", requests_per_day=5, tokens_per_day=10**7)
        worker = await pipeline.start_worker(wait=False, roles="pipeline")
        ml = await pipeline.start_worker(wait=False, roles="ml", ml_concurrency="1")
        await worker.wait_ready(120)
        await ml.wait_ready(120)
        yield Stack(pipeline, worker, ml)


@dataclass
class User:
    user_id: str
    api: Api


async def new_user(stack: Stack, http: aiohttp.ClientSession, plan: str = "batchy") -> User:
    user_id = f"bt{uuid.uuid4().hex[:8]}"
    key = await stack.pipeline.create_key(user_id, plan)
    return User(user_id, await Api(http, stack.worker.url, key).wait_key_active())


def completion_lines(n: int, prefix: str, model: str = GENERATE_MODEL) -> list[dict[str, Any]]:
    return [
        {
            "custom_id": f"{prefix}-{i}",
            "method": "POST",
            "url": "/v1/completions",
            "body": {"model": model, "prompt": f"Line {i} says", "max_tokens": 6},
        }
        for i in range(n)
    ]


async def input_file(stack: Stack, user: User, lines: list[dict[str, Any]]) -> str:
    file_id = new_file_id()
    content = b"".join(orjson.dumps(line) + b"\n" for line in lines)
    await stack.pipeline.store.files.put(
        file_id, user.user_id, "batch", "in.jsonl", content, len(lines)
    )
    return file_id


async def create(user: User, file_id: str, **extra: Any) -> tuple[int, Any, dict[str, str]]:
    body = {
        "input_file_id": file_id,
        "endpoint": "/v1/completions",
        "completion_window": "24h",
        **extra,
    }
    return await user.api.call("POST", "/v1/batches", json=body)


async def wait_final(user: User, batch_id: str, timeout: float = 90.0) -> dict[str, Any]:
    async def final() -> dict[str, Any] | None:
        status, body, _ = await user.api.call("GET", f"/v1/batches/{batch_id}")
        assert status == 200, body
        return body if body["status"] in FINAL else None

    found: dict[str, Any] = await wait_for(
        final, timeout=timeout, interval=0.2, what=f"{batch_id} final"
    )
    return found


async def settled_quota(user: User) -> dict[str, Any]:
    async def settled() -> dict[str, Any] | None:
        status, body, _ = await user.api.call("GET", "/v1/quota")
        return body if status == 200 and body["tokens"]["reserved"] == 0 else None

    found: dict[str, Any] = await wait_for(settled, timeout=60, interval=0.2, what="quota settled")
    return found


async def file_lines(stack: Stack, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    content = await stack.pipeline.store.files.read_all(file_id)
    return [orjson.loads(line) for line in content.splitlines() if line]


async def test_batch_completes_with_output_and_error_files(
    stack: Stack, http: aiohttp.ClientSession, model_base_url: str
) -> None:
    user = await new_user(stack, http)
    lines = completion_lines(12, "ok")
    file_id = await input_file(stack, user, lines)
    # Three model calls refused (400: fatal, not retried): three lines fail, the others complete.
    async with model_faults(http, model_base_url, error_status=400, fail_next=3):
        status, created, _ = await create(user, file_id, metadata={"run": "1"})
        assert status == 200, created
        assert created["object"] == "batch" and created["status"] == "in_progress", created
        assert created["metadata"] == {"run": "1"} and "user_id" not in created
        assert created["request_counts"] == {"total": 12, "completed": 0, "failed": 0}
        batch = await wait_final(user, created["id"])
    assert batch["status"] == "completed", batch
    assert batch["request_counts"] == {"total": 12, "completed": 9, "failed": 3}, batch
    assert (
        batch["created_at"]
        <= batch["in_progress_at"]
        <= batch["finalizing_at"]
        <= batch["completed_at"]
    )
    output = await file_lines(stack, batch["output_file_id"])
    errors = await file_lines(stack, batch["error_file_id"])
    assert len(output) == 9 and len(errors) == 3
    ids = [line["custom_id"] for line in output + errors]
    assert sorted(ids) == sorted(line["custom_id"] for line in lines)  # every line once
    assert [x["custom_id"] for x in output] == sorted(
        (x["custom_id"] for x in output), key=lambda c: int(c[3:])
    )
    for line in output:
        body = line["response"]["body"]
        assert body["object"] == "text_completion" and body["choices"][0]["text"], body
        assert line["id"] == f"batch_req_{line['response']['request_id']}"
    for line in errors:
        assert line["response"] is None and line["error"]["code"] and line["error"]["message"]
    quota = await settled_quota(user)
    assert quota["requests"]["used"] == 12, quota
    assert quota["tokens"]["used"] == sum(
        x["response"]["body"]["usage"]["total_tokens"] for x in output
    )

    # Reads: listing (newest first) and the final state from PostgreSQL; someone else sees nothing.
    status, listed, _ = await user.api.call("GET", "/v1/batches?limit=5")
    assert status == 200 and [b["id"] for b in listed["data"]] == [batch["id"]], listed
    assert listed["first_id"] == listed["last_id"] == batch["id"] and listed["has_more"] is False
    assert listed["data"][0]["status"] == "completed"
    other = await new_user(stack, http)
    status, body, _ = await other.api.call("GET", f"/v1/batches/{batch['id']}")
    assert status == 404, body
    status, body, _ = await user.api.call("POST", f"/v1/batches/{batch['id']}/cancel")
    assert status == 409 and body["error"]["type"] == "conflict", body


async def test_quota_refusal_says_what_is_missing(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    user = await new_user(stack, http, "small")
    file_id = await input_file(stack, user, completion_lines(8, "big"))
    status, body, headers = await create(user, file_id)
    assert status == 429, body
    assert body["error"]["type"] == "request_quota_exceeded", body
    assert body["error"]["requests"]["missing"] == 3 and body["error"]["tokens"]["missing"] == 0, (
        body
    )
    assert int(headers["Retry-After"]) >= 1
    _, quota, _ = await user.api.call("GET", "/v1/quota")
    assert quota["requests"]["used"] == 0 and quota["tokens"]["reserved"] == 0, quota
    status, listed, _ = await user.api.call("GET", "/v1/batches")
    assert status == 200 and listed["data"] == []


async def test_bad_requests_charge_nothing(stack: Stack, http: aiohttp.ClientSession) -> None:
    user = await new_user(stack, http)
    lines = completion_lines(4, "bad")
    lines[2]["body"]["model"] = "no-such-model"
    lines[3]["body"] = {"model": GENERATE_MODEL}  # no prompt
    file_id = await input_file(stack, user, lines)
    status, body, _ = await create(user, file_id)
    assert status == 400 and body["error"]["type"] == "invalid_request", body
    assert [e["line"] for e in body["error"]["errors"]] == [3, 4], body
    # The body itself: unknown field, window, endpoint; a missing or someone else's file.
    for extra in (
        {"priority": "high"},
        {"completion_window": "1h"},
        {"endpoint": "/v1/moderations"},
    ):
        status, body, _ = await create(user, file_id, **extra)
        assert status == 400, (extra, body)
    status, body, _ = await create(user, new_file_id())
    assert status == 404, body
    other = await new_user(stack, http)
    status, body, _ = await create(other, file_id)
    assert status == 404, body
    status, body, _ = await create(user, file_id, metadata={f"k{i}": "v" for i in range(17)})
    assert status == 400, body
    _, quota, _ = await user.api.call("GET", "/v1/quota")
    assert quota["requests"]["used"] == 0 and quota["tokens"]["reserved"] == 0, quota


async def test_cancel_midway_refunds_what_did_not_run(
    stack: Stack, http: aiohttp.ClientSession, model_base_url: str
) -> None:
    user = await new_user(stack, http)
    lines = completion_lines(30, "cx")
    file_id = await input_file(stack, user, lines)
    _, before, _ = await user.api.call("GET", "/v1/quota")
    async with model_faults(http, model_base_url, latency_ms=250):
        status, created, _ = await create(user, file_id)
        assert status == 200, created

        async def some_done() -> bool:
            _, body, _ = await user.api.call("GET", f"/v1/batches/{created['id']}")
            return bool(body["request_counts"]["completed"] >= 2)

        await wait_for(some_done, timeout=60, interval=0.1, what="two lines completed")
        status, cancelling, _ = await user.api.call("POST", f"/v1/batches/{created['id']}/cancel")
        assert status == 200 and cancelling["status"] == "cancelling", cancelling
        assert cancelling["cancelling_at"] is not None
        batch = await wait_final(user, created["id"])
    assert batch["status"] == "cancelled" and batch["cancelled_at"], batch
    output = await file_lines(stack, batch["output_file_id"])
    errors = await file_lines(stack, batch["error_file_id"])
    assert sorted(x["custom_id"] for x in output + errors) == sorted(x["custom_id"] for x in lines)
    counts = batch["request_counts"]
    assert counts["total"] == 30 and counts["completed"] == len(output) >= 2, batch
    cancelled = [x for x in errors if x["error"]["code"] == "cancelled"]
    assert len(cancelled) >= 10 and counts["failed"] == len(errors) - len(cancelled), (
        counts,
        errors[:3],
    )
    quota = await settled_quota(user)
    used = sum(x["response"]["body"]["usage"]["total_tokens"] for x in output)
    # What did not run is refunded: the tokens charged are what the completed lines used.
    assert quota["tokens"]["used"] - before["tokens"]["used"] == used, (before, quota)
    assert quota["requests"]["used"] - before["requests"]["used"] == 30
