"""Schemathesis against a real worker's served ``/openapi.json``: every answer is one the spec documents.

Generated cases rarely name a file or batch that exists, so the Batch API's
answers about real ones (200, 409) are checked apart, with cases built around
a batch run for the purpose.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator

import aiohttp
import orjson
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import Case, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import Failure, FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.support.pipeline import Api, Pipeline, WorkerProcess
from tests.support.wait import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="session")]

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
]
EXAMPLES_PER_OPERATION = 25
BUDGET_S = 120


@pytest.fixture(scope="module")
async def pipeline(broker_url: str, model_base_url: str) -> AsyncIterator[Pipeline]:
    async with Pipeline.session(broker_url, model_base_url + "/v1", max_body_bytes="65536") as p:
        yield p


@pytest.fixture(scope="module")
async def worker(pipeline: Pipeline) -> WorkerProcess:
    return await pipeline.start_worker()


def _loopback_only(case: Case) -> None:
    """Never ask the worker to call out: a generated public ``callback_url`` would get a webhook."""
    if isinstance(case.body, dict):
        case.body.pop("callback_url", None)


def _run(
    spec_url: str, base_url: str, key: str, mode: GenerationMode
) -> tuple[list[str], Counter[str]]:
    """Every operation, ``EXAMPLES_PER_OPERATION`` cases each: the failures (one per operation), the answers seen."""
    schema = schemathesis.openapi.from_url(spec_url, timeout=10)
    failures: list[str] = []
    seen: Counter[str] = Counter()
    for result in schema.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            database=None,
            derandomize=True,
            phases=[
                Phase.explicit,
                Phase.generate,
            ],  # no shrinking: bounded time, the case is printed
            suppress_health_check=list(HealthCheck),
        )
        def conforms(case: Case) -> None:
            _loopback_only(case)
            response = case.call_and_validate(
                base_url=base_url,
                headers={"Authorization": f"Bearer {key}"},
                checks=CHECKS,
                timeout=30,
            )
            seen[f"{case.operation.label} {response.status_code}"] += 1

        try:
            conforms()
        except Unsatisfiable:  # negative mode, an operation with no input to break (/healthz)
            continue
        except (Failure, FailureGroup) as exc:  # kept, reported with every other operation's
            failures.append(f"{operation.label}: {exc!r}")
    return failures, seen


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=str)
async def test_served_spec_tells_the_truth(
    pipeline: Pipeline, worker: WorkerProcess, http: aiohttp.ClientSession, mode: GenerationMode
) -> None:
    key = await pipeline.create_key(f"st-{mode}")
    await Api(http, worker.url, key).wait_key_active()
    started = time.monotonic()
    failures, seen = await asyncio.to_thread(
        _run, worker.url + "/openapi.json", worker.url, key, mode
    )
    elapsed = time.monotonic() - started
    assert not failures, "\n\n".join(failures)
    print(f"{mode}: {sum(seen.values())} cases in {elapsed:.0f} s: {dict(sorted(seen.items()))}")
    if mode is GenerationMode.POSITIVE:  # the cases reached admission, not only validation
        assert seen["POST /v1/requests 202"] and seen["GET /v1/requests 200"], seen
    assert elapsed < BUDGET_S, f"schemathesis took {elapsed:.0f} s"


def _real_ids(spec_url: str, base_url: str, key: str, ids: dict[str, str]) -> Counter[str]:
    """The Batch API's operations on an existing file and (final) batch: each answer conforms."""
    schema = schemathesis.openapi.from_url(spec_url, timeout=10)
    file_id, batch_id, output_id = ids["input"], ids["batch"], ids["output"]
    cases = [
        ("/v1/files/{file_id}", "GET", {"path_parameters": {"file_id": file_id}}),
        ("/v1/files/{file_id}/content", "GET", {"path_parameters": {"file_id": output_id}}),
        ("/v1/files", "GET", {"query": {"purpose": "batch_output", "limit": 1}}),
        ("/v1/files", "GET", {"query": {"after": output_id}}),
        ("/v1/batches/{batch_id}", "GET", {"path_parameters": {"batch_id": batch_id}}),
        ("/v1/batches", "GET", {"query": {"limit": 1}}),
        ("/v1/batches", "GET", {"query": {"after": batch_id}}),
        ("/v1/batches/{batch_id}/cancel", "POST", {"path_parameters": {"batch_id": batch_id}}),
        ("/v1/files/{file_id}", "DELETE", {"path_parameters": {"file_id": file_id}}),
        ("/v1/files/{file_id}", "GET", {"path_parameters": {"file_id": file_id}}),  # deleted: 404
    ]
    seen: Counter[str] = Counter()
    for path, method, parts in cases:
        case = schema[path][method].Case(**parts)  # type: ignore[arg-type]
        response = case.call_and_validate(
            base_url=base_url, headers={"Authorization": f"Bearer {key}"}, checks=CHECKS, timeout=30
        )
        seen[f"{method} {path} {response.status_code}"] += 1
    return seen


async def test_batch_routes_answer_as_documented_about_real_files_and_batches(
    pipeline: Pipeline, worker: WorkerProcess, http: aiohttp.ClientSession
) -> None:
    key = await pipeline.create_key("st-batch")
    api = await Api(http, worker.url, key).wait_key_active()
    line = {
        "custom_id": "one",
        "method": "POST",
        "url": "/v1/embeddings",
        "body": {"input": "conform"},
    }
    form = aiohttp.FormData()
    form.add_field("purpose", "batch")
    form.add_field(
        "file", orjson.dumps(line) + b"\n", filename="one.jsonl", content_type="application/jsonl"
    )
    async with http.post(worker.url + "/v1/files", data=form, headers=api.headers()) as r:
        uploaded = await r.json()
        assert r.status == 200, uploaded
    status, batch, _ = await api.call(
        "POST",
        "/v1/batches",
        json={
            "input_file_id": uploaded["id"],
            "endpoint": "/v1/embeddings",
            "completion_window": "24h",
        },
    )
    assert status == 200, batch

    async def final() -> dict[str, str] | None:
        status, doc, _ = await api.call("GET", f"/v1/batches/{batch['id']}")
        return doc if status == 200 and doc["status"] == "completed" else None

    done = await wait_for(final, timeout=60, interval=0.2, what="the batch completed")
    ids = {"input": uploaded["id"], "batch": batch["id"], "output": done["output_file_id"]}
    seen = await asyncio.to_thread(_real_ids, worker.url + "/openapi.json", worker.url, key, ids)
    assert seen == {
        "GET /v1/files/{file_id} 200": 1,
        "GET /v1/files/{file_id}/content 200": 1,
        "GET /v1/files 200": 2,
        "GET /v1/batches/{batch_id} 200": 1,
        "GET /v1/batches 200": 2,
        "POST /v1/batches/{batch_id}/cancel 409": 1,
        "DELETE /v1/files/{file_id} 200": 1,
        "GET /v1/files/{file_id} 404": 1,
    }, seen
