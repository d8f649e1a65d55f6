"""The Batch API end to end with the official ``openai`` client: files, batches, cancel, quota, kill -9.

One stack for the module (a pipeline worker, an ML worker, the session's
reference model server) driven only through ``openai.OpenAI`` pointed at the
gateway, as a user of OpenAI's Batch API would drive it; PostgreSQL and
``GET /v1/quota`` are read beside it to check that every line was answered
exactly once and charged exactly once. The client is the synchronous one
users write: its calls block the test's event loop, which has nothing else to
do meanwhile (the workers are other processes).
"""

from __future__ import annotations

import signal
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from openai.types import Batch

from tests.support.modelserver import model_faults
from tests.support.pipeline import Api, Pipeline, WorkerProcess
from tests.support.wait import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="session")]

EMBED_MODEL = "all-MiniLM-L6-v2"
EMBED_DIM = 384
GENERATE_MODEL = "sim-gpt"
FINAL = {"completed", "failed", "expired", "cancelled"}
BATCH_TIMEOUT = 120.0
# The ML worker runs few calls at once, so that a slowed model keeps a batch in progress long
# enough to cancel it or kill a worker under it; embeddings are batched and stay fast.
ML_CONCURRENCY = 4
CHUNK_LINES = 40  # several write steps per batch: a kill can land between two of them
FILE_MAX_BYTES = 64 * 1024  # the largest test file is ~20 KB


@dataclass
class Stack:
    pipeline: Pipeline
    gateway: WorkerProcess  # replaced when the kill -9 test restarts it (same port)
    ml: WorkerProcess

    @property
    def base_url(self) -> str:
        return f"{self.gateway.url}/v1"


@pytest.fixture(scope="module")
async def stack(broker_url: str, model_base_url: str) -> AsyncIterator[Stack]:
    async with Pipeline.session(
        broker_url,
        model_base_url + "/v1",
        batch_chunk_lines=str(CHUNK_LINES),
        batch_poll_s="0.2",
        file_max_bytes=str(FILE_MAX_BYTES),
    ) as pipeline:
        await pipeline.set_plan("batch", requests_per_day=100_000, tokens_per_day=10**8)
        await pipeline.set_plan("tiny", requests_per_day=5, tokens_per_day=10**8)
        gateway = await pipeline.start_worker(wait=False, roles="pipeline")
        ml = await pipeline.start_worker(wait=False, roles="ml", ml_concurrency=str(ML_CONCURRENCY))
        await gateway.wait_ready(120)
        await ml.wait_ready(120)
        yield Stack(pipeline, gateway, ml)


@dataclass
class User:
    user_id: str
    key: str
    client: openai.OpenAI


@pytest.fixture
async def user(stack: Stack, http: aiohttp.ClientSession) -> AsyncIterator[User]:
    """A fresh user per test (so its quota shows only this test's work), with an ``openai`` client."""
    yield await new_user(stack, http, "batch")


async def new_user(stack: Stack, http: aiohttp.ClientSession, plan: str) -> User:
    user_id = f"b{uuid.uuid4().hex[:8]}"
    key = await stack.pipeline.create_key(user_id, plan)
    await Api(http, stack.gateway.url, key).wait_key_active()
    client = openai.OpenAI(base_url=stack.base_url, api_key=key, max_retries=0, timeout=30)
    return User(user_id, key, client)


# ---- helpers: what a client of the Batch API writes ---------------------------------------------


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    return b"".join(orjson.dumps(line) + b"\n" for line in lines)


def embedding_lines(n: int, prefix: str) -> list[dict[str, Any]]:
    """``n`` lines; every fifth sends a list of two texts (two embeddings in its answer)."""
    return [
        {
            "custom_id": f"{prefix}-{i}",
            "method": "POST",
            "url": "/v1/embeddings",
            "body": {
                "model": EMBED_MODEL,
                "input": [f"{prefix} text {i}", f"{prefix} second {i}"]
                if i % 5 == 0
                else f"{prefix} text {i}",
            },
        }
        for i in range(n)
    ]


def chat_lines(n: int, prefix: str) -> list[dict[str, Any]]:
    return [
        {
            "custom_id": f"{prefix}-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": GENERATE_MODEL,
                "messages": [
                    {"role": "system", "content": "You answer briefly."},
                    {"role": "user", "content": f"Question number {i} about streams?"},
                ],
                "max_tokens": 8,
            },
        }
        for i in range(n)
    ]


def completion_lines(n: int, prefix: str) -> list[dict[str, Any]]:
    return [
        {
            "custom_id": f"{prefix}-{i}",
            "method": "POST",
            "url": "/v1/completions",
            "body": {"model": GENERATE_MODEL, "prompt": f"Continue line {i}:", "max_tokens": 8},
        }
        for i in range(n)
    ]


def start_batch(client: openai.OpenAI, lines: list[dict[str, Any]], endpoint: str) -> Batch:
    uploaded = client.files.create(
        file=("input.jsonl", jsonl(lines), "application/jsonl"), purpose="batch"
    )
    assert uploaded.purpose == "batch" and uploaded.bytes == len(jsonl(lines)), uploaded
    return client.batches.create(
        input_file_id=uploaded.id,
        endpoint=endpoint,  # type: ignore[arg-type]
        completion_window="24h",
        metadata={"suite": "e2e"},
    )


async def wait_batch(client: openai.OpenAI, batch_id: str, statuses: set[str] = FINAL) -> Batch:
    def reached() -> Batch | None:
        batch = client.batches.retrieve(batch_id)
        return batch if batch.status in statuses else None

    found: Batch = await wait_for(
        reached, timeout=BATCH_TIMEOUT, interval=0.2, what=f"batch {batch_id} in {sorted(statuses)}"
    )
    return found


async def wait_progress(client: openai.OpenAI, batch_id: str, completed: int) -> Batch:
    def progressed() -> Batch | None:
        batch = client.batches.retrieve(batch_id)
        counts = batch.request_counts
        return batch if counts is not None and counts.completed >= completed else None

    found: Batch = await wait_for(
        progressed,
        timeout=BATCH_TIMEOUT,
        interval=0.1,
        what=f"{completed} lines of {batch_id} completed",
    )
    return found


def file_lines(client: openai.OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    return [
        orjson.loads(line) for line in client.files.content(file_id).read().splitlines() if line
    ]


def answered_once(
    batch: Batch, client: openai.OpenAI, custom_ids: list[str]
) -> tuple[list[Any], list[Any]]:
    """The output and error files' lines, after checking each custom_id is in exactly one of them, once."""
    output = file_lines(client, batch.output_file_id)
    errors = file_lines(client, batch.error_file_id)
    seen = Counter(line["custom_id"] for line in output + errors)
    assert sorted(seen) == sorted(custom_ids), set(seen) ^ set(custom_ids)
    assert set(seen.values()) == {1}, [c for c, n in seen.items() if n > 1]
    for line in output:
        assert line["error"] is None and line["response"]["status_code"] == 200, line
        assert line["id"] == f"batch_req_{line['response']['request_id']}", line
    for line in errors:
        assert line["response"] is None and line["error"]["code"] and line["error"]["message"], line
    counts = batch.request_counts
    assert counts is not None and counts.total == len(custom_ids), counts
    assert counts.completed == len(output), (counts, len(output))
    return output, errors


async def settled_quota(stack: Stack, http: aiohttp.ClientSession, user: User) -> dict[str, Any]:
    """The user's quota once nothing is reserved any more (settlement is asynchronous)."""
    api = Api(http, stack.gateway.url, user.key)

    async def settled() -> dict[str, Any] | None:
        status, body, _ = await api.call("GET", "/v1/quota")
        return body if status == 200 and body["tokens"]["reserved"] == 0 else None

    quota: dict[str, Any] = await wait_for(
        settled, timeout=60, interval=0.2, what=f"{user.user_id}'s quota settled"
    )
    return quota


async def line_rows(stack: Stack, batch_id: str) -> list[Any]:
    pool = await stack.pipeline.store.connect()
    return list(
        await pool.fetch(
            "SELECT request_id, batch_line, status, usage FROM requests WHERE batch_id = $1 ORDER BY batch_line",
            batch_id,
        )
    )


def usage_of(output: list[dict[str, Any]]) -> int:
    return sum(int(line["response"]["body"]["usage"]["total_tokens"]) for line in output)


@pytest.fixture
def slow_model(http: aiohttp.ClientSession, model_base_url: str) -> Iterator[Any]:
    """``async with slow_model(ms):``: the shared model server's generation latency for a block, put back."""

    def slowed(ms: int) -> Any:
        return model_faults(http, model_base_url, latency_ms=ms)

    yield slowed


# ---- the tests ---------------------------------------------------------------------------------


async def test_embeddings_batch_answers_every_line_once(
    stack: Stack, user: User, http: aiohttp.ClientSession
) -> None:
    lines = embedding_lines(60, "emb")
    created = start_batch(user.client, lines, "/v1/embeddings")
    assert created.id.startswith("batch_") and created.object == "batch", created
    assert created.status in {"validating", "in_progress"}, created
    assert created.endpoint == "/v1/embeddings" and created.completion_window == "24h"
    assert created.metadata == {"suite": "e2e"}

    batch = await wait_batch(user.client, created.id)
    assert batch.status == "completed", batch
    assert batch.completed_at and batch.in_progress_at and batch.finalizing_at, batch
    assert batch.created_at <= batch.in_progress_at <= batch.finalizing_at <= batch.completed_at
    output, errors = answered_once(batch, user.client, [line["custom_id"] for line in lines])
    assert not errors and batch.error_file_id is None, errors
    assert [line["custom_id"] for line in output] == [
        line["custom_id"] for line in lines
    ]  # line order
    for sent, line in zip(lines, output, strict=True):
        body = line["response"]["body"]
        texts = (
            sent["body"]["input"]
            if isinstance(sent["body"]["input"], list)
            else [sent["body"]["input"]]
        )
        assert body["object"] == "list" and body["model"] == EMBED_MODEL, body
        assert [d["index"] for d in body["data"]] == list(range(len(texts)))
        assert all(
            d["object"] == "embedding" and len(d["embedding"]) == EMBED_DIM for d in body["data"]
        )
        assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] > 0

    rows = await line_rows(stack, batch.id)
    assert [r["batch_line"] for r in rows] == list(range(len(lines))), rows
    assert {r["status"] for r in rows} == {"completed"}
    quota = await settled_quota(stack, http, user)
    assert quota["requests"]["used"] == len(lines), quota
    assert quota["tokens"]["used"] == usage_of(output), quota

    # Listing, newest first, and the input file; another user sees none of it.
    listed = user.client.batches.list(limit=10)
    assert [b.id for b in listed.data] == [batch.id], listed
    assert user.client.files.retrieve(batch.input_file_id).purpose == "batch"
    assert user.client.files.retrieve(batch.output_file_id or "").purpose == "batch_output"
    other = await new_user(stack, http, "batch")
    with pytest.raises(openai.NotFoundError):
        other.client.batches.retrieve(batch.id)
    with pytest.raises(openai.NotFoundError):
        other.client.files.content(batch.output_file_id or "")
    assert other.client.batches.list().data == []


async def test_chat_batch_answers_every_line_once(
    stack: Stack, user: User, http: aiohttp.ClientSession
) -> None:
    lines = chat_lines(30, "chat")
    created = start_batch(user.client, lines, "/v1/chat/completions")
    batch = await wait_batch(user.client, created.id)
    assert batch.status == "completed", batch
    output, errors = answered_once(batch, user.client, [line["custom_id"] for line in lines])
    assert not errors, errors
    for line in output:
        body = line["response"]["body"]
        assert body["object"] == "chat.completion" and body["model"] == GENERATE_MODEL, body
        assert body["id"] == f"chatcmpl-{line['response']['request_id']}"
        choice = body["choices"][0]
        assert choice["message"]["role"] == "assistant" and isinstance(
            choice["message"]["content"], str
        )
        assert choice["finish_reason"] == "stop" and choice["message"]["content"], choice
        usage = body["usage"]
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"], usage
    quota = await settled_quota(stack, http, user)
    assert quota["tokens"]["used"] == usage_of(output), quota


async def test_bad_lines_are_a_400_listing_them_and_charge_nothing(
    stack: Stack, user: User, http: aiohttp.ClientSession
) -> None:
    good = embedding_lines(3, "ok")
    broken = [
        orjson.dumps(good[0]),
        b"{not json",
        orjson.dumps({**good[1], "custom_id": good[0]["custom_id"]}),  # a repeated custom_id
        orjson.dumps({**good[2], "url": "/v1/images"}),
        orjson.dumps({**good[2], "custom_id": "no-body", "body": None}),
    ]
    with pytest.raises(openai.BadRequestError) as refused:
        user.client.files.create(file=("bad.jsonl", b"\n".join(broken) + b"\n"), purpose="batch")
    error = refused.value.body
    assert isinstance(error, dict) and error["type"] == "invalid_request", error
    assert [e["line"] for e in error["errors"]] == [2, 3, 4, 5], error
    assert all(e["message"] for e in error["errors"])
    too_big = jsonl(embedding_lines(FILE_MAX_BYTES // 100, "big"))
    assert len(too_big) > FILE_MAX_BYTES
    with pytest.raises(openai.APIStatusError) as refused_size:
        user.client.files.create(file=("big.jsonl", too_big), purpose="batch")
    assert refused_size.value.status_code == 413, refused_size.value
    assert (
        isinstance(refused_size.value.body, dict)
        and refused_size.value.body["type"] == "payload_too_large"
    )
    assert user.client.files.list().data == []  # neither upload left anything behind

    # Structurally fine, but the bodies do not fit the batch's endpoint (or its model is unknown).
    mismatched = [
        *embedding_lines(2, "fine"),
        {**chat_lines(1, "chat")[0], "url": "/v1/embeddings"},
        {**embedding_lines(1, "model")[0], "body": {"model": "no-such-model", "input": "x"}},
    ]
    uploaded = user.client.files.create(file=("mismatch.jsonl", jsonl(mismatched)), purpose="batch")
    with pytest.raises(openai.BadRequestError) as refused:
        user.client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h"
        )
    error = refused.value.body
    assert isinstance(error, dict) and [e["line"] for e in error["errors"]] == [3, 4], error
    with pytest.raises(
        openai.BadRequestError
    ):  # the url of every line must be the batch's endpoint
        user.client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
    with pytest.raises(openai.NotFoundError):
        user.client.batches.create(
            input_file_id="file-000000000000000000000000",
            endpoint="/v1/embeddings",
            completion_window="24h",
        )
    status, quota, _ = await Api(http, stack.gateway.url, user.key).call("GET", "/v1/quota")
    assert status == 200 and quota["requests"]["used"] == 0 and quota["tokens"]["reserved"] == 0, (
        quota
    )
    assert user.client.batches.list().data == []


async def test_batch_beyond_the_quota_is_a_429_saying_what_is_missing(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    tiny = await new_user(stack, http, "tiny")  # 5 requests a day
    lines = embedding_lines(8, "over")
    uploaded = tiny.client.files.create(file=("over.jsonl", jsonl(lines)), purpose="batch")
    with pytest.raises(openai.RateLimitError) as refused:
        tiny.client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h"
        )
    error = refused.value.body
    assert isinstance(error, dict) and error["type"] == "request_quota_exceeded", error
    assert error["requests"]["missing"] == 3 and error["requests"]["limit"] == 5, error
    assert error["tokens"]["missing"] == 0, error
    assert refused.value.response.headers.get("Retry-After"), refused.value.response.headers
    # Nothing was charged: a batch that fits still goes through whole.
    fits = tiny.client.files.create(file=("fits.jsonl", jsonl(lines[:5])), purpose="batch")
    batch = tiny.client.batches.create(
        input_file_id=fits.id, endpoint="/v1/embeddings", completion_window="24h"
    )
    assert (await wait_batch(tiny.client, batch.id)).status == "completed"
    quota = await settled_quota(stack, http, tiny)
    assert quota["requests"]["used"] == 5, quota


async def test_cancel_midway_answers_the_rest_cancelled_and_refunds_them(
    stack: Stack, user: User, http: aiohttp.ClientSession, slow_model: Any
) -> None:
    lines = chat_lines(60, "cancel")
    async with slow_model(400):  # ML_CONCURRENCY lines every 0.4 s: the batch takes ~6 s
        created = start_batch(user.client, lines, "/v1/chat/completions")
        await wait_progress(user.client, created.id, completed=ML_CONCURRENCY)
        cancelling = user.client.batches.cancel(created.id)
        assert cancelling.status in {"cancelling", "cancelled"}, cancelling
        batch = await wait_batch(user.client, created.id)
    assert batch.status == "cancelled" and batch.cancelled_at and batch.cancelling_at, batch
    output, errors = answered_once(batch, user.client, [line["custom_id"] for line in lines])
    assert 0 < len(output) < len(lines), (len(output), len(errors))
    assert {line["error"]["code"] for line in errors} == {"cancelled"}, errors
    assert len(output) + len(errors) == len(lines)

    rows = await line_rows(stack, batch.id)
    assert len(rows) == len(lines), len(rows)
    statuses = Counter(r["status"] for r in rows)
    assert statuses == {"completed": len(output), "cancelled": len(errors)}, statuses
    quota = await settled_quota(
        stack, http, user
    )  # reserved back to 0: the cancelled lines refunded
    assert quota["tokens"]["used"] == usage_of(output), quota
    with pytest.raises(openai.ConflictError):  # a final batch cannot be cancelled again
        user.client.batches.cancel(batch.id)


async def test_kill_9_of_the_pipeline_worker_mid_batch_still_answers_every_line_once(
    stack: Stack, user: User, http: aiohttp.ClientSession, slow_model: Any
) -> None:
    lines = completion_lines(160, "crash")
    async with slow_model(100):  # ~40 lines/s: the kill lands with most of the batch still to do
        created = start_batch(user.client, lines, "/v1/completions")
        await wait_progress(user.client, created.id, completed=10)
        stack.gateway.kill(signal.SIGKILL)
        stack.gateway = await stack.pipeline.start_worker(
            wait=False, web_port=str(stack.gateway.port), roles="pipeline"
        )
        await stack.gateway.wait_ready(180)
        batch = await wait_batch(user.client, created.id)
    assert batch.status == "completed", batch
    counts = batch.request_counts
    assert counts is not None and counts.total == len(lines) == counts.completed + counts.failed, (
        counts
    )
    output, errors = answered_once(batch, user.client, [line["custom_id"] for line in lines])
    for line in output:
        body = line["response"]["body"]
        assert body["object"] == "text_completion" and body["choices"][0]["text"], body

    rows = await line_rows(stack, batch.id)  # one row per line, none twice (request_id is the key)
    assert [r["batch_line"] for r in rows] == list(range(len(lines))), [
        r["batch_line"] for r in rows
    ]
    completed = [r for r in rows if r["status"] == "completed"]
    assert len(completed) == len(output), Counter(r["status"] for r in rows)
    quota = await settled_quota(stack, http, user)  # each line charged once, settled once
    assert quota["requests"]["used"] == len(lines), quota
    assert (
        quota["tokens"]["used"]
        == sum(int(r["usage"]["total_tokens"]) for r in completed)
        == usage_of(output)
    )
