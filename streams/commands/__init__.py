"""Operator commands, together: ``faust -A streams migrate | keys | plans set/list | topics | replay | redrive | quota audit``.

They run without starting a worker; each opens the clients it needs and closes them.
"""

from __future__ import annotations

import click
import faust
from faust.cli import AppCommand, option

from bridges.clients.redis import RedisClient
from bridges.clients.store import Store
from inferstream.settings import Settings
from schemas.migrate import migrate as apply_migrations
from schemas.plans import Plan
from streams.commands.audit import register_audit
from streams.commands.redrive import register_redrive
from streams.commands.replay import register_replay
from streams.commands.routes import register_routes
from streams.commands.topics import register_topics


def describe_plan(plan: Plan) -> str:
    """One line per plan: its limits, priorities (the batch priority as its batches get it) and flags."""
    batch = plan.cap_batch_priority()
    capped = "" if batch == plan.batch_priority else f" (set {plan.batch_priority}, capped)"
    return (
        f"plan {plan.name}: {plan.requests_per_day} requests/day, {plan.tokens_per_day} tokens/day, "
        f"{plan.requests_per_minute} requests/minute, max priority {plan.max_priority}, "
        f"batch priority {batch}{capped}" + (", admin" if plan.admin else "")
    )


def register(app: faust.App, settings: Settings, store: Store) -> None:
    @app.command()
    async def migrate(self: AppCommand) -> None:
        """Apply the SQL migrations to this namespace's schema (idempotent)."""
        applied = await apply_migrations(settings.postgres_dsn, settings.db_schema)
        if applied:
            self.say(f"applied {len(applied)} migration(s) to schema {settings.db_schema}: {', '.join(applied)}")
        else:
            self.say(f"schema {settings.db_schema} is up to date")

    @app.command(
        click.argument("action", type=click.Choice(["create", "revoke"])),
        click.argument("key", required=False),
        option("--user", help="User id the new key belongs to (create)."),
        option("--plan", default="default", show_default=True, help="Plan of the new key (create)."),
    )
    async def keys(self: AppCommand, action: str, key: str | None, user: str | None, plan: str) -> None:
        """Create an API key (printed once, alone on the last line) or revoke one."""
        try:
            if action == "create":
                if not user:
                    raise click.UsageError("keys create needs --user USER")
                new_key = await store.keys.create_key(user, plan)
                self.say(f"created a key for user {user!r} on plan {plan!r}; it is shown only once:")
                self.say(new_key)
            else:
                if not key:
                    raise click.UsageError("keys revoke needs the KEY")
                if not await store.keys.revoke_key(key):
                    raise click.ClickException("no such active key")
                self.say("revoked; running workers refuse it within a second")
        finally:
            await store.close()

    @app.command(
        click.argument("action", type=click.Choice(["set", "list"])),
        click.argument("name", required=False),
        option("--requests-per-day", type=int, help="Requests a user may make per day (set: required)."),
        option("--tokens-per-day", type=int, help="Tokens a user may use per day (set: required)."),
        option("--requests-per-minute", type=int, help="Requests a user may make per minute (set: required)."),
        option("--max-priority", type=click.Choice(["high", "normal", "low"]), default="high", show_default=True),
        option(
            "--admin/--no-admin", default=None,
            help="Keys of the plan see every user's quota and failures on /dashboard (default: unchanged; new plans: no).",
        ),
        option(
            "--batch-priority", type=click.Choice(["high", "normal", "low"]), default=None,
            help="Priority of the plan's Batch API lines, capped by --max-priority (default: unchanged; new plans: low).",
        ),
    )  # fmt: skip
    async def plans(
        self: AppCommand,
        action: str,
        name: str | None,
        requests_per_day: int | None,
        tokens_per_day: int | None,
        requests_per_minute: int | None,
        max_priority: str,
        admin: bool | None,
        batch_priority: str | None,
    ) -> None:
        """Create or change a plan (``plans set NAME ...``; running workers apply it within a second),
        or list the plans (``plans list``)."""
        try:
            if action == "list":
                for plan in sorted((await store.keys.load_plans()).values(), key=lambda p: p.name):
                    self.say(describe_plan(plan))
                return
            limits = (requests_per_day, tokens_per_day, requests_per_minute)
            if not name or None in limits:
                raise click.UsageError(
                    "plans set needs NAME --requests-per-day N --tokens-per-day N --requests-per-minute N"
                )
            assert requests_per_day is not None and tokens_per_day is not None and requests_per_minute is not None
            plan = await store.keys.set_plan(
                name, requests_per_day, tokens_per_day, requests_per_minute, max_priority, admin=admin,
                batch_priority=batch_priority,
            )  # fmt: skip
            self.say(describe_plan(plan))
        finally:
            await store.close()

    register_replay(app, settings, store, RedisClient(settings))
    register_redrive(app, settings, store)

    register_audit(app, settings, store)
    register_topics(app, settings)
    register_routes(app, settings)
