"""Inferstream's Faust application: ``faust -A streams worker``.

Importing this package (or any module in it) builds nothing, opens nothing and
changes no global state. ``streams.app`` is built on first access, which is
what ``faust -A streams`` does: the settings are read from the environment and
:func:`streams.pipeline.build_pipeline` attaches everything the worker's roles
need. Tests and tools build their own with ``build_pipeline(Settings(...))``.
"""

from __future__ import annotations

import functools
from typing import Any

__all__ = ["app"]


@functools.cache
def _app() -> Any:
    from streams.pipeline import from_environment

    return from_environment()


def __getattr__(name: str) -> Any:
    if name == "app":
        return _app()
    raise AttributeError(f"module 'streams' has no attribute {name!r}")
