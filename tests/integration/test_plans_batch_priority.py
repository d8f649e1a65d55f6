"""A plan's batch priority (Batch API): stored and loaded with the plan, capped by its max priority, and
set or listed with ``faust -A streams plans``, against a real PostgreSQL."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from bridges.clients.store import Store
from inferstream.errors import InvalidRequest
from schemas.plans import DEFAULT_PLAN, Plan
from tests.support.postgres import DSN, drop_schema, fresh_store

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
async def store() -> AsyncIterator[Store]:
    async with fresh_store() as s:
        yield s


def test_the_batch_priority_is_capped_by_the_max_priority() -> None:
    assert DEFAULT_PLAN.batch_priority == "low" and DEFAULT_PLAN.cap_batch_priority() == "low"
    plan = Plan("p", 1, 1, 1, max_priority="normal", batch_priority="high")
    assert plan.cap_batch_priority() == "normal"
    assert (
        Plan("p", 1, 1, 1, max_priority="high", batch_priority="normal").cap_batch_priority()
        == "normal"
    )
    assert (
        Plan("p", 1, 1, 1, max_priority="low", batch_priority="normal").cap_batch_priority()
        == "low"
    )


async def test_the_batch_priority_is_stored_kept_and_checked(store: Store) -> None:
    assert (await store.keys.load_plans())[
        "default"
    ].batch_priority == "low"  # the migration's default
    new = await store.keys.set_plan("bulk", 10, 10, 10, "high")
    assert new.batch_priority == "low"
    changed = await store.keys.set_plan("bulk", 10, 10, 10, "high", batch_priority="high")
    assert changed.batch_priority == "high" and changed.cap_batch_priority() == "high"
    # A change that does not name it keeps it (as `plans set` without --batch-priority).
    kept = await store.keys.set_plan("bulk", 20, 20, 20, "normal")
    assert kept.batch_priority == "high" and kept.cap_batch_priority() == "normal"
    assert (await store.keys.load_plans())["bulk"] == Plan(
        "bulk", 20, 20, 20, "normal", batch_priority="high"
    )
    with pytest.raises(InvalidRequest, match="batch_priority"):
        await store.keys.set_plan("bulk", 1, 1, 1, "high", batch_priority="urgent")


@pytest.fixture
def cli_schema() -> Iterator[str]:
    schema = f"t{uuid.uuid4().hex[:8]}"
    yield schema
    import asyncio

    asyncio.run(drop_schema(schema))


def _faust(schema: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERSTREAM_")}
    env |= {
        "INFERSTREAM_NAMESPACE": schema,
        "INFERSTREAM_POSTGRES_DSN": DSN,
        "PYTHONPATH": str(ROOT),
    }
    faust = Path(sys.executable).parent / "faust"
    return subprocess.run(
        [str(faust), "-A", "streams", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_plans_set_and_list_show_the_batch_priority(cli_schema: str) -> None:
    assert _faust(cli_schema, "migrate").returncode == 0
    limits = [
        "--requests-per-day",
        "100",
        "--tokens-per-day",
        "1000",
        "--requests-per-minute",
        "10",
    ]
    done = _faust(
        cli_schema,
        "plans",
        "set",
        "bulk",
        *limits,
        "--max-priority",
        "normal",
        "--batch-priority",
        "high",
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == (
        "plan bulk: 100 requests/day, 1000 tokens/day, 10 requests/minute, max priority normal,"
        " batch priority normal (set high, capped)"
    )
    done = _faust(cli_schema, "plans", "list")
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if line.startswith("plan ")]
    assert [line.split(":")[0] for line in lines] == ["plan bulk", "plan default"]
    assert lines[1].endswith("max priority high, batch priority low")
    bad = _faust(cli_schema, "plans", "set", "bulk", *limits, "--batch-priority", "urgent")
    assert bad.returncode != 0 and "urgent" in bad.stderr
    missing = _faust(cli_schema, "plans", "set", "bulk")
    assert missing.returncode != 0 and "--requests-per-day" in missing.stderr
