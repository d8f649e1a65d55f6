"""The RocksDB table store (production) takes admissions written from a view and keeps them across a restart."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest

from tests.support.pipeline import Api, Pipeline

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="session")]


@pytest.fixture(scope="module")
async def pipeline(broker_url: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Pipeline]:
    data_dir = str(tmp_path_factory.mktemp("rocksdb") / "tables")
    async with Pipeline.session(
        broker_url, "http://127.0.0.1:9/v1", roles="pipeline", table_store="rocksdb://", data_dir=data_dir
    ) as p:
        yield p


async def test_admissions_persist_in_rocksdb_across_a_restart(pipeline: Pipeline, http: aiohttp.ClientSession) -> None:
    worker = await pipeline.start_worker()
    api = await Api(http, worker.url, await pipeline.create_key("rocky")).wait_key_active()
    for _ in range(3):
        status, body, _ = await api.submit({"task": "embed", "input": "kept in rocksdb"})
        assert status == 202, body
    status, quota, _ = await api.call("GET", "/v1/quota")
    assert status == 200 and quota["requests"]["used"] == 3

    worker.stop()
    restarted = await pipeline.start_worker(web_port=str(worker.port))
    api = await Api(http, restarted.url, api.key).wait_key_active(timeout=30)
    status, quota, _ = await api.call("GET", "/v1/quota")
    assert status == 200 and quota["requests"]["used"] == 3
    status, body, headers = await api.submit({"task": "embed", "input": "one more"})
    assert status == 202 and headers["X-RateLimit-Remaining-Requests"] == "96", body
