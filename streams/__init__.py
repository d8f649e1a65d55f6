"""Inferstream's Faust application: ``faust -A streams worker``.

``streams.app`` builds the app; ``streams.wiring`` attaches topics, tables,
agents, services, views and commands for the roles this worker runs.
"""

from streams import wiring  # noqa: F401  (registers everything on the app)
from streams.app import app, settings

__all__ = ["app", "settings"]
