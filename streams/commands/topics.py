"""``faust -A streams topics [--check]``: create the log's topics for deployments that disable auto-create."""

from __future__ import annotations

import faust
from faust.cli import AppCommand, option

from inferstream.settings import Settings
from streams.topology import (
    changelogs_of,
    check_copartitioned,
    ensure_topics,
    existing_counts,
    topic_specs,
)


def register_topics(app: faust.App, settings: Settings) -> None:
    @app.command(option("--check", is_flag=True, default=False, help="Only check; create nothing."))
    async def topics(self: AppCommand, check: bool) -> None:
        """Create the log's topics with INFERSTREAM_PARTITIONS partitions (idempotent) and check co-partitioning."""
        specs = topic_specs(settings, changelogs_of(app))
        if check:
            counts = await existing_counts(settings.bootstrap_servers, [s.name for s in specs])
            check_copartitioned(specs, counts, "INFERSTREAM_PARTITIONS")
        else:
            counts = await ensure_topics(settings.bootstrap_servers, specs)
        for spec in specs:
            shown = counts.get(spec.name)
            self.say(f"{spec.name}: {shown if shown is not None else 'missing'} partitions ({spec.purpose})")
