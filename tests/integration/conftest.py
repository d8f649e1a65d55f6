"""Fixtures shared by the integration tests of one part against a real service."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from inferstream.settings import Settings

REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture
async def redis_settings() -> AsyncIterator[Settings]:
    """Settings with a fresh namespace on the local Redis; its keys are deleted afterwards."""
    ns = f"t{uuid.uuid4().hex[:8]}"
    yield Settings(namespace=ns, redis_url=REDIS_URL, result_ttl_s=60)
    raw = aioredis.Redis.from_url(REDIS_URL)
    keys = [k async for k in raw.scan_iter(match=f"{ns}:*")]
    if keys:
        await raw.delete(*keys)
    await raw.aclose()
