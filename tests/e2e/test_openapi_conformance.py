"""Schemathesis against a real worker's served ``/openapi.json``: every answer is one the spec documents."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator

import aiohttp
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
