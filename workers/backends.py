"""The backends of one route, each with its model client and circuit breaker, chosen per call.

Choice (:meth:`BackendPool.pick`), per call: fallback orders are tried lowest
first (``order`` in the routes file, as LiteLLM's). Within the first order that
can take a call, a half-open backend whose probe is free gets it: that is how a
recovered backend takes its share back while its fallback serves. Otherwise the
closed backends of that order share the calls by weight, by smooth weighted
round robin (nginx's): deterministic, exact over every sum-of-weights calls, and
interleaved rather than in runs. A backend whose breaker opens drops out of the
choice, so its share moves to the others of its order and, once the whole
order is out, to the next order: the fallbacks. When no backend can take a
call, :meth:`BackendPool.acquire` waits for the first breaker that lets one go.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import groupby
from typing import Any

from bridges.clients.model import ModelClient
from inferstream.routes import Backend, Route
from inferstream.settings import Settings
from workers import metrics
from workers.breaker import STATE_VALUE, BreakerState, CircuitBreaker

__all__ = ["BackendPool", "Upstream"]

BreakerChange = Callable[[str, BreakerState, BreakerState], None]


@dataclass(eq=False)
class Upstream:
    """One backend as a route's ML worker uses it: its client, breaker, metric children and WRR weight."""

    spec: Backend
    client: ModelClient
    breaker: CircuitBreaker
    labels: tuple[str, str, str]  # task, public model, backend name
    seconds: Any  # its child of the model-call latency histogram
    current: float = 0.0  # smooth weighted round robin's running weight
    _calls: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.spec.name

    def calls(self, outcome: str) -> Any:
        child = self._calls.get(outcome)
        if child is None:
            child = self._calls[outcome] = metrics.MODEL_CALLS.labels(*self.labels, outcome)
        return child


class BackendPool:
    """Every backend of ``route``; see the module docstring for how a call's backend is chosen."""

    def __init__(self, settings: Settings, route: Route, *, on_breaker_change: BreakerChange | None = None) -> None:
        self.route = route
        self._changed = asyncio.Event()
        self.upstreams: list[Upstream] = []
        for spec in route.backends:
            labels = (route.task, route.model, spec.name)

            def changed(name: str, old: BreakerState, new: BreakerState, labels: tuple[str, ...] = labels) -> None:
                metrics.BREAKER_STATE.labels(*labels).set(STATE_VALUE[new])
                self._signal()
                if on_breaker_change is not None:
                    on_breaker_change(name, old, new)

            breaker = CircuitBreaker(
                f"{route.task}/{route.model}@{spec.name}", route.breaker_threshold, route.breaker_reset_s,
                on_change=changed,
            )  # fmt: skip
            metrics.BREAKER_STATE.labels(*labels).set(0)
            client = ModelClient(settings, base_url=spec.url, api_key=spec.api_key, timeout_s=route.call_timeout_s)
            seconds = metrics.MODEL_CALL_SECONDS.labels(*labels)
            self.upstreams.append(Upstream(spec, client, breaker, labels, seconds))
        ordered = sorted(self.upstreams, key=lambda u: u.spec.order)  # stable: declared order within an order
        self._orders = [list(group) for _, group in groupby(ordered, key=lambda u: u.spec.order)]

    def by_name(self, name: str) -> Upstream:
        return next(u for u in self.upstreams if u.name == name)

    def _signal(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    # ---- choice --------------------------------------------------------
    def pick(self) -> tuple[Upstream, bool] | None:
        """The backend for the next call and whether it is its breaker's probe; None when none may take it."""
        for order in self._orders:
            for upstream in order:
                if upstream.breaker.probe_free:
                    probe = upstream.breaker.try_acquire()
                    if probe is not None:
                        return upstream, probe
            closed = [u for u in order if u.breaker.state == "closed"]
            if closed:
                return self._weighted(closed), False
        return None

    @staticmethod
    def _weighted(candidates: list[Upstream]) -> Upstream:
        if len(candidates) == 1:
            return candidates[0]
        total = 0.0
        best = candidates[0]
        for upstream in candidates:
            upstream.current += upstream.spec.weight
            total += upstream.spec.weight
            if upstream.current > best.current:
                best = upstream
        best.current -= total
        return best

    async def acquire(self) -> tuple[Upstream, bool]:
        """Wait until some backend may take a call; the caller bounds the wait (deadline, retry budget)."""
        while True:
            picked = self.pick()
            if picked is not None:
                return picked
            waits = [w for u in self.upstreams if (w := u.breaker.seconds_until_probe()) is not None]
            try:
                await asyncio.wait_for(self._changed.wait(), min(waits) if waits else None)
            except TimeoutError:
                pass

    @property
    def accepting(self) -> bool:
        """Some backend is closed or has a free probe: taking work from the queue makes sense."""
        return any(u.breaker.state == "closed" or u.breaker.probe_free for u in self.upstreams)

    @property
    def probing(self) -> bool:
        """No backend is closed, so the calls that go out are probes."""
        return not any(u.breaker.state == "closed" for u in self.upstreams)

    # ---- outcomes ------------------------------------------------------
    def succeeded(self, upstream: Upstream, probe: bool) -> None:
        upstream.breaker.on_success(probe)
        if probe:
            self._signal()

    def failed(self, upstream: Upstream, probe: bool) -> None:
        upstream.breaker.on_failure(probe)
        if probe:
            self._signal()

    def abandoned(self, upstream: Upstream, probe: bool) -> None:
        upstream.breaker.release(probe)
        if probe:
            self._signal()

    # ---- reporting and shutdown ---------------------------------------
    @property
    def state(self) -> BreakerState:
        """The route's breaker as one: closed if any backend is, else half-open if any is, else open."""
        states = {u.breaker.state for u in self.upstreams}
        for state in ("closed", "half_open"):
            if state in states:
                return state  # type: ignore[return-value]
        return "open"

    def health(self) -> dict[str, Any]:
        return {
            u.name: {  # no URL: /readyz is unauthenticated, and the routes file says where each name points
                "model": u.spec.model,
                "weight": u.spec.weight,
                "order": u.spec.order,
                "breaker": u.breaker.state,
                "consecutive_failures": u.breaker.consecutive_failures,
            }
            for u in self.upstreams
        }

    async def close(self) -> None:
        for upstream in self.upstreams:
            await upstream.client.close()
