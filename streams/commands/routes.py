"""``faust -A streams routes check [FILE]``: validate a routes file exactly as a worker loads it, and show what it resolves to."""

from __future__ import annotations

import click
import faust
from faust.cli import AppCommand

from inferstream.routes import Route, RoutesError, RouteTable, load_routes, routes_from_settings
from inferstream.settings import Settings


def register_routes(app: faust.App, settings: Settings) -> None:
    @app.command(
        click.argument("action", type=click.Choice(["check"])),
        click.argument("file", required=False),
    )
    async def routes(self: AppCommand, action: str, file: str | None) -> None:
        """Check FILE (default: INFERSTREAM_ROUTES_FILE; without either, the INFERSTREAM_MODELS shorthand); exit 1 on a problem."""
        path = file or settings.routes_file
        try:
            table = load_routes(path, settings) if path else routes_from_settings(settings)
        except RoutesError as exc:
            for problem in exc.problems:
                click.echo(str(problem), err=True)
            raise SystemExit(1) from None
        for line in table_lines(table):
            self.say(line)


def table_lines(table: RouteTable) -> list[str]:
    """One line per route, one per backend under it, then the verdict; API keys only as set or none."""
    lines: list[str] = []
    for route in table:
        lines.append(route_line(route))
        for b in route.backends:
            key = "set" if b.api_key else "none"
            lines.append(f"    {b.name} {b.url} {b.model} weight={b.weight:g} order={b.order} key:{key}")
    lines.append(f"{table.source}: {len(table)} routes OK")
    return lines


def route_line(route: Route) -> str:
    parts = [
        f"{route.task}/{route.model}",
        "default" if route.default else "-",
        f"max_priority={route.max_priority}",
        f"concurrency={route.concurrency}",
    ]
    if route.task == "embed":
        parts.append(f"batch={route.batch_size}/{route.batch_wait_ms}ms/{route.batch_concurrency}")
    rate = f"{route.rate_limit_rps:g}/s" if route.rate_limit_rps else "unlimited"
    parts += [
        f"rate={rate}",
        f"timeout={route.call_timeout_s:g}s",
        f"retry_budget={route.retry_budget_s:g}s",
        f"breaker={route.breaker_threshold}/{route.breaker_reset_s:g}s",
    ]
    return " ".join(parts)
