"""Inferstream's Faust application: ``faust -A streams worker``.

``streams.app`` builds the app; ``streams.wiring`` attaches topics, tables,
agents, services, views and commands for the roles this worker runs.
"""

from streams.app import app, settings
from streams import wiring  # noqa: E402,F401  (registers everything on the app)

__all__ = ["app", "settings"]
