"""The routes a worker serves now: loaded at start, reloaded on SIGHUP or when the routes file changes.

Every part that needs routes reads them here, at the moment it needs them: the
gateway (which routes accept submissions, their defaults and priority caps),
the forward agent and RabbitMQ client (which routes have work queues), the ML
workers (each route's backends and limits). A reload swaps one immutable
:class:`~inferstream.routes.RouteTable`; subscribers (the RabbitMQ client
declaring new queues, the ML worker adding consumers and new endpoints) run
before it returns.

A reload takes effect for new work only:

- a **new** route's queue is declared and consumed, and the gateway admits it;
- a **removed** route is *retired*: the gateway refuses it (400 naming the
  route), while its queue keeps its consumer (with the route's last backends)
  so what was admitted drains; a retired route is forgotten when the process
  stops, so drain a removed route's queue before restarting its workers;
- a **changed** route serves new messages with the new settings; messages
  already being worked finish on the endpoint (backends, breakers) they started on;
- a file that does not validate is **refused**: the old routes stay, and the
  problems are logged and shown in ``/readyz`` until a good file loads.

The file is polled (``INFERSTREAM_ROUTES_POLL_S``; its bytes are compared, not
only its time stamp) rather than watched with inotify: a Kubernetes ConfigMap
changes by swapping a symlink above the file, which file watches miss.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from mode import Service

from inferstream import clock
from inferstream.routes import Route, RoutesError, RouteTable, configured_routes, load_routes
from inferstream.settings import Settings

__all__ = ["RouteKey", "RouteWatcher"]

log = logging.getLogger(__name__)

RouteKey = tuple[str, str]  # (task, public model)
Subscriber = Callable[[RouteTable], Awaitable[None]]


class RouteWatcher(Service):
    """The current routes, the retired ones, and how the last reload went; see the module docstring."""

    def __init__(self, settings: Settings, *, environ: Mapping[str, str] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.settings = settings
        self.environ = environ
        self._table: RouteTable | None = None
        self.retired: dict[RouteKey, Route] = {}
        self.served_keys: frozenset[RouteKey] = frozenset()
        self.model_routes: dict[str, list[str]] = {}
        self.loaded_at: float | None = None
        self.reloads = 0
        self.error: str | None = None
        self.error_at: float | None = None
        self._subscribers: list[Subscriber] = []
        self._stamp: tuple[int, int, int] | None = None
        self._lock = asyncio.Lock()

    # ---- reading -------------------------------------------------------
    @property
    def table(self) -> RouteTable:
        """The routes now (loaded on first use; a file that does not validate raises RoutesError)."""
        if self._table is None:
            self._stamp = self._file_stamp()
            self._install(configured_routes(self.settings, self.environ))
        assert self._table is not None
        return self._table

    def load(self) -> RouteTable:
        """Load now, before the worker serves (preflight): a broken file stops the start with its problems."""
        return self.table

    def route(self, task: str, model: str) -> Route | None:
        """The route that accepts submissions, or None (unknown or retired)."""
        return self.table.get(task, model)

    def served(self) -> list[Route]:
        """Every route with a work queue here: the current ones, then the retired ones still draining."""
        return [*self.table, *self.retired.values()]

    def subscribe(self, subscriber: Subscriber) -> None:
        """``subscriber(table)`` runs after every reload that changed the routes."""
        self._subscribers.append(subscriber)

    def status(self) -> dict[str, Any]:
        """For ``/readyz``: where the routes came from, which are served, and the last refused reload."""
        table = self.table
        return {
            "source": table.source,
            "digest": table.digest,
            "loaded_at": self.loaded_at,
            "reloads": self.reloads,
            "routes": [f"{task}/{model}" for task, model in table.keys()],
            "retired": [f"{task}/{model}" for task, model in self.retired],
            "reload_error": None if self.error is None else {"message": self.error, "at": self.error_at},
        }

    # ---- reloading -----------------------------------------------------
    def _install(self, table: RouteTable) -> None:
        old = self._table
        if old is not None:
            for route in old:
                if table.get(*route.key) is None:
                    self.retired[route.key] = route
        for key in table.keys():
            self.retired.pop(key, None)
        self._table = table
        self.served_keys = frozenset(r.key for r in self.served())
        self.model_routes = table.model_routes
        self.loaded_at = clock.now()

    async def reload(self, why: str = "requested") -> bool:
        """Load the file again; True when the routes changed. A file that does not validate changes nothing."""
        path = self.settings.routes_file
        if not path:
            log.info("%s: no routes file to reload (INFERSTREAM_ROUTES_FILE is not set)", why)
            return False
        async with self._lock:
            old = self.table
            self._stamp = self._file_stamp()
            try:
                table = await asyncio.to_thread(load_routes, path, self.settings, self.environ)
            except RoutesError as exc:
                self.error, self.error_at = str(exc), clock.now()
                log.error("routes file %s refused (%s); still serving routes %s:\n%s", path, why, old.digest, exc)
                return False
            self.error = self.error_at = None
            if table.routes == old.routes:  # the same routes (a comment changed, or nothing)
                if table.digest != old.digest:
                    self._table = table
                return False
            self._install(table)
            self.reloads += 1
            before, after = set(old.keys()), set(table.keys())
            changed = [k for k in before & after if old.get(*k) != table.get(*k)]
            log.info(
                "routes reloaded from %s (%s), %s -> %s: added %s, removed %s, changed %s",
                path, why, old.digest, table.digest, _names(after - before), _names(before - after), _names(changed),
            )  # fmt: skip
            for subscriber in self._subscribers:
                try:
                    await subscriber(table)
                except Exception:  # one part failing to follow must not stop the watcher or the others
                    log.exception("applying the reloaded routes failed in %r", subscriber)
            return True

    def _file_stamp(self) -> tuple[int, int, int] | None:
        path = self.settings.routes_file
        if not path:
            return None
        try:
            st = os.stat(path)
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size, st.st_ino

    async def on_start(self) -> None:
        self.load()
        if threading.current_thread() is threading.main_thread():
            # SIGHUP's default action ends the process; mode's worker handles only INT, TERM and USR1/2.
            # Without a routes file it only logs that there is nothing to reload.
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self._on_sighup)

    async def on_stop(self) -> None:
        if threading.current_thread() is threading.main_thread():
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)

    def _on_sighup(self) -> None:
        self.add_future(self.reload("SIGHUP"))

    @Service.task
    async def _poll(self) -> None:
        interval = self.settings.routes_poll_s
        if not self.settings.routes_file or interval <= 0:
            return
        while not self.should_stop:
            await self.sleep(interval)
            if self._file_stamp() != self._stamp:
                await self.reload("the file changed")


def _names(keys: Any) -> list[str]:
    return sorted(f"{task}/{model}" for task, model in keys)
