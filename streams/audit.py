"""``faust -A streams quota audit --user U [--day D]``: rebuild one user's daily usage from the log and compare it with the table.

The log is the history: the requests topic holds every admission (a released
admission never reached it), the results topic every terminal status. The
rebuild applies the rules of :mod:`tables.quota` to them. The table's side is
the last state of that user and day in the ``quota`` table's changelog, so the
command needs no running worker. Both are printed with any difference; the
exit code is 1 when they differ.

Two figures can differ for a moment without a fault: a result that the settle
agent has not processed yet, and an admission whose 202 was still in flight.
A settlement is attributed to the day of the result's ``at`` (the table uses
the time it processed the result), which can differ only across midnight.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import click
import faust
import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.partitioner import DefaultPartitioner
from faust.cli import AppCommand, option

from bridges.postgres import Store
from inferstream import clock
from inferstream.settings import Settings
from schemas.records import TERMINAL

QUOTA_TABLE = "quota"  # the name tables.definitions gives the quota table
READ_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Usage:
    """What the quota table holds for one user and day, without the per-minute window."""

    requests_used: int
    tokens_used: int
    tokens_reserved: int


ZERO = Usage(0, 0, 0)


def rebuild(requests: Iterable[Mapping[str, Any]], results: Iterable[Mapping[str, Any]], user_id: str, day: str) -> Usage:
    """Replay admissions and terminal results (each in log order) through the quota rules."""
    admitted: dict[str, int] = {}
    for req in requests:
        if req.get("user_id") == user_id and req.get("quota_day") == day:
            admitted.setdefault(str(req.get("request_id")), int(req.get("estimated_tokens") or 0))
    used = 0
    settled: set[str] = set()
    for ev in results:
        rid = str(ev.get("request_id"))
        if rid not in admitted or rid in settled or ev.get("status") not in TERMINAL:
            continue
        if clock.utc_day(float(ev.get("at") or 0.0)) != day:
            continue  # settled after the window closed: the table dropped it with the window
        settled.add(rid)
        total = _total_tokens(ev.get("usage"))
        reserved = admitted[rid]
        used += max(0, total) if ev.get("status") == "completed" else max(0, min(total, reserved))
    reserved = sum(est for rid, est in admitted.items() if rid not in settled)
    return Usage(requests_used=len(admitted), tokens_used=used, tokens_reserved=reserved)


def _total_tokens(usage: Any) -> int:
    if not isinstance(usage, Mapping):
        return 0
    try:
        return int(usage.get("total_tokens") or 0)
    except (TypeError, ValueError):
        return 0


def table_usage(states: Iterable[Mapping[str, Any] | None], day: str) -> Usage | None:
    """The last changelog state of ``day`` (None when the table never held that day)."""
    last: Mapping[str, Any] | None = None
    for state in states:
        if state is not None and state.get("day") == day:
            last = state
    if last is None:
        return None
    return Usage(
        requests_used=int(last.get("requests_used", 0)),
        tokens_used=int(last.get("tokens_used", 0)),
        tokens_reserved=int(last.get("tokens_reserved", 0)),
    )


def differences(log: Usage, table: Usage | None) -> list[str]:
    held = table or ZERO
    return [
        f"{name}: log {getattr(log, name)} != table {getattr(held, name)}"
        for name in ("requests_used", "tokens_used", "tokens_reserved")
        if getattr(log, name) != getattr(held, name)
    ]


def bootstrap_servers(broker_url: str) -> list[str]:
    """``kafka://h1:9092;kafka://h2:9092`` -> ``["h1:9092", "h2:9092"]``."""
    parts = broker_url.replace(",", ";").split(";")
    return [p.strip().split("://", 1)[-1].rstrip("/") for p in parts if p.strip()]


async def read_user_records(servers: list[str], topic: str, user_id: str) -> list[Any]:
    """Every value under the user's key, in order, from the one partition the default partitioner maps it to."""
    key = orjson.dumps(user_id)  # keys are JSON-encoded, like the table's
    consumer = AIOKafkaConsumer(
        bootstrap_servers=servers, enable_auto_commit=False, group_id=None, auto_offset_reset="earliest"
    )
    await consumer.start()
    try:
        if topic not in await consumer.topics():  # also refreshes the metadata
            return []
        partitions = consumer.partitions_for_topic(topic)
        if not partitions:
            return []
        ordered = sorted(partitions)
        tp = TopicPartition(topic, DefaultPartitioner()(key, ordered, ordered))
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        end = (await consumer.end_offsets([tp]))[tp]
        values: list[Any] = []
        deadline = time.monotonic() + READ_TIMEOUT_S
        while await consumer.position(tp) < end:
            if time.monotonic() > deadline:
                raise click.ClickException(f"reading {topic} timed out after {READ_TIMEOUT_S:.0f} s")
            for records in (await consumer.getmany(tp, timeout_ms=500)).values():
                for rec in records:
                    if rec.key == key and rec.offset < end:
                        values.append(orjson.loads(rec.value) if rec.value is not None else None)
        return values
    finally:
        await consumer.stop()


async def audit(settings: Settings, changelog_topic: str, user_id: str, day: str) -> tuple[Usage, Usage | None]:
    servers = bootstrap_servers(settings.broker_url)
    requests, results, states = await asyncio.gather(
        read_user_records(servers, settings.requests_topic, user_id),
        read_user_records(servers, settings.results_topic, user_id),
        read_user_records(servers, changelog_topic, user_id),
    )
    return rebuild(requests, results, user_id, day), table_usage(states, day)


def register_audit(app: faust.App, settings: Settings, store: Store) -> None:
    """Adds ``quota audit`` to the app's commands (``store`` is unused: the log is the only source)."""
    changelog_topic = f"{app.conf.id}-{QUOTA_TABLE}-changelog"

    @app.command(
        click.argument("action", type=click.Choice(["audit"])),
        option("--user", required=True, help="User whose usage to rebuild."),
        option("--day", default=None, help="UTC day YYYY-MM-DD (default: today)."),
    )
    async def quota(self: AppCommand, action: str, user: str, day: str | None) -> None:
        """Rebuild a user's usage for a day from the log and compare it with the quota table (exit 1 on a difference)."""
        day = day or clock.utc_day(clock.now())
        log_usage, table = await audit(settings, changelog_topic, user, day)
        self.say(f"quota audit of user {user!r} for {day}")
        self.say(f"log:   {orjson.dumps(asdict(log_usage)).decode()}")
        self.say(f"table: {orjson.dumps(asdict(table)).decode() if table else 'no state for that day'}")
        diff = differences(log_usage, table)
        for line in diff:
            self.say(f"DIFFERENCE {line}")
        if diff:
            raise SystemExit(1)
        self.say("no difference")
