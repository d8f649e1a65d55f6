"""JSON logs of a real run at DEBUG: every line either worker writes is one JSON object, and none holds a secret.

A pipeline worker and an ML worker run with ``INFERSTREAM_LOG_FORMAT=json`` at
``-l debug`` (Faust's, mode's, aiokafka's and aio-pika's DEBUG lines included).
The test submits requests whose input is a recognisable prompt, with a key; one
request fails at the model and is dead-lettered, one is refused as invalid, one
comes with an unknown key. After the workers stop, the whole of both logs is
parsed line by line and grepped for the key, its digest and the prompt. A worker
that refuses to start (a missing routes file) logs why as JSON, traceback in one field.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from inferstream.apikeys import hash_key
from tests.support.pipeline import Api, Pipeline, WorkerProcess
from tests.support.wait import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="session")]

TERMINAL = {"completed", "failed", "cancelled", "expired"}
FIELDS = {"time", "level", "logger", "message"}
PROMPT = f"zebra quartz {uuid.uuid4().hex} prompt"


@pytest.fixture(scope="module")
async def pipeline(broker_url: str, model_base_url: str) -> AsyncIterator[Pipeline]:
    async with Pipeline.session(broker_url, model_base_url + "/v1", log_format="json") as p:
        yield p


@pytest.fixture(scope="module")
async def workers(pipeline: Pipeline) -> AsyncIterator[tuple[WorkerProcess, WorkerProcess]]:
    pipe = await pipeline.start_worker(roles="pipeline", log_level="debug")
    ml = await pipeline.start_worker(roles="ml", log_level="debug")
    yield pipe, ml


async def finish(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    status, answer, _ = await api.submit(body)
    assert status == 202, answer
    return await api.wait_status(answer["request_id"], TERMINAL, timeout=60)


def parse(worker: WorkerProcess) -> list[dict[str, Any]]:
    objects = []
    for number, line in enumerate(worker.log_path.read_text().splitlines(), 1):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            raise AssertionError(f"{worker.log_path}:{number} is not JSON: {line[:300]!r}") from None
        assert isinstance(obj, dict) and FIELDS <= obj.keys(), f"{worker.log_path}:{number}: {line[:300]}"
        objects.append(obj)
    return objects


async def test_a_debug_run_logs_json_lines_without_keys_digests_or_prompts(
    http: aiohttp.ClientSession, pipeline: Pipeline, workers: tuple[WorkerProcess, WorkerProcess], faults: Any
) -> None:
    pipe, ml = workers
    key = await pipeline.create_key(f"u{uuid.uuid4().hex[:8]}")
    api = await Api(http, pipe.url, key).wait_key_active()

    ids = []
    for body in (
        {"task": "generate", "input": PROMPT, "params": {"max_tokens": 4}},
        {"task": "embed", "input": [PROMPT, PROMPT + " again"]},
    ):
        doc = await finish(api, body)
        assert doc["status"] == "completed", doc
        ids.append(doc["request_id"])
    # A model failure (fatal: failed and dead-lettered), an invalid request, an unknown key.
    await faults(fail_next=1, error_status=400)
    failed = await finish(api, {"task": "generate", "input": PROMPT + " failing", "params": {"max_tokens": 4}})
    assert failed["status"] == "failed", failed
    ids.append(failed["request_id"])
    status, _, _ = await api.submit({"task": "generate", "input": PROMPT, "params": {"max_tokens": "many"}})
    assert status == 400
    status, _, _ = await Api(http, pipe.url, key + "x").submit({"task": "embed", "input": PROMPT})
    assert status == 401
    for worker in (pipe, ml):
        worker.stop()

    digest = hash_key(pipeline.settings.key_secret, key)
    secrets = {"the API key": key, "its digest": digest, "the prompt": PROMPT, "the prompt's words": PROMPT.split()[2]}
    logged = {}
    for worker in (pipe, ml):
        objects = parse(worker)
        text = worker.log_path.read_text()
        for what, secret in secrets.items():
            assert secret not in text, f"{what} is in {worker.log_path}"
        # DEBUG lines from the libraries, and the worker's own lifecycle, all as JSON.
        loggers = {o["logger"].split(".")[0] for o in objects}
        assert {"faust", "mode", "aiokafka" if worker is pipe else "aio_pika"} <= loggers, loggers
        assert "DEBUG" in {o["level"] for o in objects}
        for obj in objects:
            if "request_id" in obj:
                assert obj["request_id"] in ids, obj
        logged[worker] = objects
    # The ML worker logged the failure and the pipeline worker recorded the dead letter, naming the request.
    assert any(failed["request_id"] in o["message"] for o in logged[ml] if o["level"] == "WARNING")
    assert any(failed["request_id"] in o["message"] for o in logged[pipe] if "dead letter" in o["message"])
    # Faust's banner (raw stdout) is one object, not a table of lines.
    assert any(o["logger"] == "stdout" and "transport" in o["message"] for o in logged[pipe])


async def test_a_worker_that_cannot_start_logs_why_as_json_with_the_traceback_in_one_field(
    pipeline: Pipeline,
) -> None:
    worker = await pipeline.start_worker(wait=False, routes_file="/nonexistent/routes.yaml")
    await wait_for(lambda: worker.proc is not None and worker.proc.poll() is not None, timeout=60, what="the worker to exit")
    assert worker.proc is not None and worker.proc.returncode != 0
    objects = parse(worker)
    failure = next(o for o in objects if "RoutesError" in o["message"])
    assert failure["level"] == "ERROR" and failure["exception"].startswith("Traceback")
    assert failure["exception"].endswith("cannot read the file: No such file or directory")
