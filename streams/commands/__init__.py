"""Operator commands, together: ``faust -A streams migrate | keys | plans | topics | replay | redrive | quota audit``.

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
from streams.commands.audit import register_audit
from streams.commands.redrive import register_redrive
from streams.commands.replay import register_replay
from streams.commands.routes import register_routes
from streams.commands.topics import register_topics


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
        click.argument("action", type=click.Choice(["set"])),
        click.argument("name"),
        option("--requests-per-day", type=int, required=True),
        option("--tokens-per-day", type=int, required=True),
        option("--requests-per-minute", type=int, required=True),
        option("--max-priority", type=click.Choice(["high", "normal", "low"]), default="high", show_default=True),
        option(
            "--admin/--no-admin", default=None,
            help="Keys of the plan see every user's quota and failures on /dashboard (default: unchanged; new plans: no).",
        ),
    )
    async def plans(
        self: AppCommand,
        action: str,
        name: str,
        requests_per_day: int,
        tokens_per_day: int,
        requests_per_minute: int,
        max_priority: str,
        admin: bool | None,
    ) -> None:
        """Create or change a plan (``plans set NAME ...``); running workers apply it within a second."""
        try:
            plan = await store.keys.set_plan(
                name, requests_per_day, tokens_per_day, requests_per_minute, max_priority, admin=admin
            )
            self.say(
                f"plan {name}: {requests_per_day} requests/day, {tokens_per_day} tokens/day, "
                f"{requests_per_minute} requests/minute, max priority {max_priority}"
                + (", admin" if plan.admin else "")
            )
        finally:
            await store.close()

    register_replay(app, settings, store, RedisClient(settings))
    register_redrive(app, settings, store)

    register_audit(app, settings, store)
    register_topics(app, settings)
    register_routes(app, settings)
