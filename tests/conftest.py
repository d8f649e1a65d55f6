"""Session-wide real parts: a Tansu broker and a reference model server, started for the run.

Pipelines (namespaces with worker processes) are built per test module on top
of these; see ``tests/support/pipeline.py``.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest

from devtools.localbroker import LocalBroker
from tests.support.modelserver import running_modelserver


@pytest.fixture(scope="session")
def broker_url() -> Iterator[str]:
    """The Kafka-protocol broker: ``INFERSTREAM_TEST_BROKER_URL`` if set, else a fresh Tansu."""
    given = os.environ.get("INFERSTREAM_TEST_BROKER_URL")
    if given:
        yield given
        return
    with LocalBroker() as broker:
        yield broker.url


@pytest.fixture(scope="session")
async def model_base_url() -> AsyncIterator[str]:
    """One reference model server (real embeddings) shared by the session; yields its URL without /v1."""
    async with running_modelserver() as url:
        yield url


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def faults(http: aiohttp.ClientSession, model_base_url: str) -> AsyncIterator[Any]:
    """The shared model server's fault knobs, reset afterwards (other modules use the same server)."""

    async def set_faults(**changes: Any) -> None:
        async with http.post(f"{model_base_url}/admin/faults", json=changes) as r:
            r.raise_for_status()

    reset = {"latency_ms": 0, "error_rate": 0.0, "error_status": 503, "fail_next": 0}
    await set_faults(**reset)
    try:
        yield set_faults
    finally:
        await set_faults(**reset)
