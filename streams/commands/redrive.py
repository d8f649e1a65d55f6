"""``faust -A streams redrive``: list dead letters and re-submit chosen ones as new requests.

PostgreSQL's ``dead_letters`` table is the source of truth (the pipeline's
:class:`bridges.dead_letters.DeadLetterRecorder` moves every RabbitMQ dead
letter there). A terminal row never goes back, so a redrive cannot revive the
old request: it writes a fresh :class:`InferenceRequest` (new id; same user,
task, model, input, params, priority, callback; ``metadata.redrive_of`` = the
old id; a deadline keeps its original length from now) straight to the
requests topic, and records ``redriven_at``, ``redrive_count`` and the new id
in the dead letter and the old row's history. It is an operator's action: no
quota is checked or charged (the quota settler ignores a request it did not
reserve for).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import click
import faust
import orjson
from aiokafka import AIOKafkaProducer
from faust.cli import AppCommand, option

from bridges.clients.store import DeadLetters, Store
from inferstream import clock
from inferstream.ids import new_request_id
from inferstream.settings import Settings
from schemas.records import InferenceRequest

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Redriven:
    old_id: str
    new: InferenceRequest


def resubmission(dead: Mapping[str, Any], now: float) -> InferenceRequest:
    """The new request that re-runs a dead letter's request (see the module docstring)."""
    old = InferenceRequest.from_data(dict(dead["payload"]))
    deadline = None
    if old.deadline_at is not None and old.created_at:
        deadline = now + max(0.0, old.deadline_at - old.created_at)
    return InferenceRequest(
        **{
            **old.asdict(),
            "request_id": new_request_id(now),
            "created_at": now,
            "quota_day": clock.utc_day(now),
            "deadline_at": deadline,
            "metadata": {**(old.metadata or {}), "redrive_of": old.request_id},
            "redrive_of": old.request_id,
        }
    )


async def redrive_letters(
    settings: Settings, store: DeadLetters, dead_letters: Sequence[Mapping[str, Any]]
) -> list[Redriven]:
    """Write a new request per dead letter to the log (acked), then record each redrive."""
    if not dead_letters:
        return []
    now = clock.now()
    planned = [Redriven(d["request_id"], resubmission(d, now)) for d in dead_letters]
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers, acks="all")
    await producer.start()
    try:
        pending = [
            await producer.send(
                settings.requests_topic, key=orjson.dumps(r.new.user_id), value=r.new.to_bytes()
            )
            for r in planned
        ]
        for fut in pending:
            await fut
    finally:
        await producer.stop()
    for r in planned:
        await store.mark_redriven(r.old_id, r.new.request_id)
    return planned


def describe(dead: Mapping[str, Any]) -> str:
    error = dead.get("error") or {}
    payload = dead.get("payload") or {}
    when = dead["created_at"].isoformat(timespec="seconds")
    redriven = (
        f" redriven {dead['redrive_count']}x, last {dead['redriven_at'].isoformat(timespec='seconds')}"
        if dead.get("redriven_at")
        else (f" redriven {dead['redrive_count']}x before" if dead.get("redrive_count") else "")
    )
    return (
        f"{dead['request_id']}  user={dead['user_id']}  {payload.get('task')}/{payload.get('model')}"
        f"  attempts={len(dead.get('history') or [])}  {when}"
        f"  {error.get('type', '?')}: {error.get('message', '')}{redriven}"
    )


def register_redrive(app: faust.App, settings: Settings, store: Store) -> None:
    @app.command(
        click.argument("request_ids", nargs=-1),
        option(
            "--list",
            "list_only",
            is_flag=True,
            help="List dead letters (pending ones unless --all).",
        ),
        option(
            "--all", "all_pending", is_flag=True, help="Redrive every dead letter not yet redriven."
        ),
        option(
            "--limit",
            type=int,
            default=100,
            show_default=True,
            help="Most dead letters listed or redriven.",
        ),
    )
    async def redrive(
        self: AppCommand,
        request_ids: tuple[str, ...],
        list_only: bool,
        all_pending: bool,
        limit: int,
    ) -> None:
        """List dead letters, or re-submit them as new requests linked to the old ones."""
        try:
            if list_only or not (all_pending or request_ids):
                rows = await store.dead_letters.list_dead_letters(limit, pending_only=not all_pending)
                self.say(f"{len(rows)} dead letter(s){'' if all_pending else ' not yet redriven'}:")
                for row in rows:
                    self.say(describe(row))
                return
            if all_pending and request_ids:
                raise click.UsageError("give REQUEST_IDs or --all, not both")
            if all_pending:
                chosen = await store.dead_letters.list_dead_letters(limit, pending_only=True)
            else:
                chosen = []
                for rid in request_ids:
                    found = await store.dead_letters.get_dead_letter(rid)
                    if found is None:
                        raise click.ClickException(f"no dead letter {rid!r}")
                    chosen.append(found)
            done = await redrive_letters(settings, store.dead_letters, chosen)
            self.say(f"redrove {len(done)} dead letter(s):")
            for r in done:
                self.say(
                    f"{r.old_id} -> {r.new.request_id}  user={r.new.user_id}  {r.new.task}/{r.new.model}"
                )
        finally:
            await store.close()
