"""``faust -A streams quota audit (--user U | --all) [--day D]``: rebuild daily usage from the log and compare it with the table.

The log is the history: the requests topic holds every admission (a released
admission never reached it), the results topic every terminal status. The
rebuild applies the rules of :mod:`tables.quota` to them, once per request id:
an admission or a result that is in the log twice (a producer retry, a crash
before the offset commit) counts once, as the table's idempotent settlement
does. The table's side is the last state of each user in the ``quota`` table's
changelog, so the command needs no running worker. Every partition of all
three topics is read to its true end (:mod:`streams.logread`); the changelog
first, so every settlement the table holds has its result in the log read
after it. ``replay`` writes nothing to the log (it re-projects into PostgreSQL),
so it cannot change an audit. The exit code is 1 when the two sides differ.

Two figures can differ for a moment without a fault: a result that the settle
agent has not processed yet, and an admission whose 202 was still in flight.
A settlement is attributed to the day of the result's ``at`` (the table uses
the time it processed the result), which can differ only across midnight.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import click
import faust
import orjson
from aiokafka.partitioner import DefaultPartitioner
from faust.cli import AppCommand, option

from bridges.clients.store import Store
from inferstream import clock
from inferstream.settings import Settings
from schemas.records import TERMINAL
from streams.logread import read_topic
from tables.quota import charge

__all__ = [
    "Usage",
    "audit",
    "audit_all",
    "rebuild_all",
    "register_audit",
    "table_usages",
]

QUOTA_TABLE = "quota"  # the name tables.definitions gives the quota table
KeyValue = tuple[bytes | None, bytes | None]


@dataclass(frozen=True)
class Usage:
    """What the quota table holds for one user and day, without the per-minute window."""

    requests_used: int
    tokens_used: int
    tokens_reserved: int


ZERO = Usage(0, 0, 0)
FIELDS = ("requests_used", "tokens_used", "tokens_reserved")


def rebuild_all(
    requests: Iterable[Mapping[str, Any]], results: Iterable[Mapping[str, Any]], day: str
) -> dict[str, Usage]:
    """Per user, admissions and terminal results (each in log order) replayed through the quota rules."""
    # request id -> (user, reserved tokens) of its first admission
    admitted: dict[str, tuple[str, int]] = {}
    for req in requests:
        if req.get("quota_day") == day and req.get("user_id") is not None:
            admitted.setdefault(
                str(req.get("request_id")),
                (str(req["user_id"]), int(req.get("estimated_tokens") or 0)),
            )
    used: dict[str, int] = {}
    settled: set[str] = set()
    for ev in results:
        rid = str(ev.get("request_id"))
        if rid not in admitted or rid in settled or ev.get("status") not in TERMINAL:
            continue  # like the table: the first terminal result settles, a repeat finds no reservation
        if clock.utc_day(float(ev.get("at") or 0.0)) != day:
            continue  # settled after the window closed: the table dropped it with the window
        settled.add(rid)
        user, reserved = admitted[rid]
        used[user] = used.get(user, 0) + charge(
            str(ev["status"]), _total_tokens(ev.get("usage")), reserved
        )
    counts: dict[str, list[int]] = {}
    for rid, (user, reserved) in admitted.items():
        c = counts.setdefault(user, [0, 0])
        c[0] += 1
        c[1] += 0 if rid in settled else reserved
    return {user: Usage(n, used.get(user, 0), held) for user, (n, held) in counts.items()}


def _total_tokens(usage: Any) -> int:
    if not isinstance(usage, Mapping):
        return 0
    try:
        return int(usage.get("total_tokens") or 0)
    except (TypeError, ValueError):
        return 0


@dataclass
class TableSide:
    """The changelog's verdict: each user's usage on ``day``, and users found on a partition not their own."""

    usages: dict[str, Usage] = field(default_factory=dict)
    misplaced: dict[str, list[int]] = field(default_factory=dict)


def table_usages(changelog: Mapping[int, Sequence[KeyValue]], day: str) -> TableSide:
    """Per user, the state of ``day`` the table holds: the last one under the user's key in the partition
    the table's partitioner gives the key (every partition is read; a tombstone deletes, a later
    day's state leaves ``day``'s final state as it was)."""
    partitions = sorted(changelog)
    last: dict[str, dict[int, Usage | None]] = {}
    for partition in partitions:
        for key, value in changelog[partition]:
            if key is None:
                continue
            user = str(orjson.loads(key))
            state = orjson.loads(value) if value is not None else None
            per_partition = last.setdefault(user, {})
            if state is None:
                per_partition[partition] = None
            elif state.get("day") == day:
                per_partition[partition] = Usage(*(int(state.get(name, 0)) for name in FIELDS))
            else:
                per_partition.setdefault(partition, None)
    side = TableSide()
    for user, found in last.items():
        home = DefaultPartitioner()(orjson.dumps(user), partitions, partitions)
        strays = sorted(p for p, usage in found.items() if p != home and usage is not None)
        if strays:
            side.misplaced[user] = strays
        usage = found.get(home)
        if usage is not None:
            side.usages[user] = usage
    return side


def differences(log: Usage, table: Usage | None, user: str, day: str) -> list[str]:
    held = table or ZERO
    return [
        f"{name}: log {getattr(log, name)} != table {getattr(held, name)} (user {user!r}, day {day})"
        for name in FIELDS
        if getattr(log, name) != getattr(held, name)
    ]


def _values(records: Mapping[int, Sequence[KeyValue]]) -> list[Mapping[str, Any]]:
    """Decoded values in log order per partition; tombstones and undecodable records skipped (the agents skip them too)."""
    out: list[Mapping[str, Any]] = []
    for partition in sorted(records):
        for _, value in records[partition]:
            if value is None:
                continue
            try:
                doc = orjson.loads(value)
            except orjson.JSONDecodeError:
                continue
            if isinstance(doc, Mapping):
                out.append(doc)
    return out


async def _read(servers: list[str], topic: str) -> dict[int, list[KeyValue]]:
    return {
        p: [(r.key, r.value) for r in recs]
        for p, recs in (await read_topic(servers, topic)).items()
    }


@dataclass
class Report:
    day: str
    log: dict[str, Usage]
    table: TableSide

    def users(self) -> list[str]:
        return sorted(set(self.log) | set(self.table.usages) | set(self.table.misplaced))

    def differences(self, user: str) -> list[str]:
        diff = differences(self.log.get(user, ZERO), self.table.usages.get(user), user, self.day)
        if user in self.table.misplaced:
            diff.append(
                f"changelog partitions {self.table.misplaced[user]} also hold a state (user {user!r}, day {self.day})"
            )
        return diff


async def audit_all(settings: Settings, changelog_topic: str, day: str) -> Report:
    # The changelog first: whatever the table settled, the log read afterwards holds the result of.
    servers = settings.bootstrap_servers
    changelog = await _read(servers, changelog_topic)
    requests, results = await asyncio.gather(
        _read(servers, settings.requests_topic), _read(servers, settings.results_topic)
    )
    return Report(
        day, rebuild_all(_values(requests), _values(results), day), table_usages(changelog, day)
    )


async def audit(
    settings: Settings, changelog_topic: str, user_id: str, day: str
) -> tuple[Usage, Usage | None]:
    """One user's ``(log, table)`` usage on ``day``; the table's is None when it holds no state for that day."""
    report = await audit_all(settings, changelog_topic, day)
    return report.log.get(user_id, ZERO), report.table.usages.get(user_id)


def _json(usage: Usage) -> str:
    return orjson.dumps(asdict(usage)).decode()


def register_audit(app: faust.App, settings: Settings, store: Store) -> None:
    """Adds ``quota audit`` to the app's commands (``store`` is unused: the log is the only source)."""

    @app.command(
        click.argument("action", type=click.Choice(["audit"])),
        option("--user", default=None, help="User whose usage to rebuild."),
        option(
            "--all",
            "every_user",
            is_flag=True,
            default=False,
            help="Audit every user seen on that day.",
        ),
        option("--day", default=None, help="UTC day YYYY-MM-DD (default: today)."),
    )
    async def quota(
        self: AppCommand, action: str, user: str | None, every_user: bool, day: str | None
    ) -> None:
        """Rebuild usage for a day from the log and compare it with the quota table (exit 1 on a difference)."""
        if (user is not None) == every_user:
            raise click.UsageError("quota audit needs exactly one of --user USER and --all")
        table = app.tables.get(QUOTA_TABLE)
        if table is None:
            raise click.ClickException(
                f"this app defines no {QUOTA_TABLE!r} table (INFERSTREAM_ROLES has no pipeline)"
            )
        day = day or clock.utc_day(clock.now())
        report = await audit_all(settings, table.changelog_topic.get_topic_name(), day)
        found = False
        if user is not None:
            held = report.table.usages.get(user)
            self.say(f"quota audit of user {user!r} for {day}")
            self.say(f"log:   {_json(report.log.get(user, ZERO))}")
            self.say(f"table: {_json(held) if held else 'no state for that day'}")
            for line in report.differences(user):
                found = True
                self.say(f"DIFFERENCE {line}")
            if not found:
                self.say("no difference")
        else:
            users = report.users()
            self.say(f"quota audit of {len(users)} users for {day}")
            for name in users:
                diff = report.differences(name)
                found = found or bool(diff)
                for line in diff:
                    self.say(f"DIFFERENCE {line}")
                if not diff:
                    self.say(f"user {name!r}: no difference")
        if found:
            raise SystemExit(1)
