"""What ``/dashboard`` shows, read from this process's Prometheus registry: rates and percentiles over a window.

The registry holds cumulative counters and histogram buckets since the process started. Each
dashboard read takes a :class:`Snapshot` (at most one per second, however many pages poll) and
keeps them for :data:`WINDOW_S`; rates and percentiles are the difference between the newest and
the oldest kept snapshot, so they follow the last minute, not the process's whole life. The
percentiles are interpolated within buckets as Prometheus' ``histogram_quantile`` does, so they
are as coarse as the buckets. Metrics another part of the process has not registered (an
ML-only worker has no admissions, one without the sampler no queue depths) are simply absent.
Reading costs one pass over the registry per snapshot, only while a dashboard is open.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import REGISTRY
from prometheus_client.registry import Collector

WINDOW_S = 60.0
MIN_INTERVAL_S = 1.0
QUANTILES = (0.5, 0.9, 0.99)
# Stage shown on the page -> the histogram it reads (T's per-stage histograms, the model calls, HTTP).
STAGES = (
    ("admission", "inferstream_admission_seconds"),
    ("queue wait", "inferstream_queue_wait_seconds"),
    ("model call", "inferstream_model_call_seconds"),
    ("end to end", "inferstream_end_to_end_seconds"),
    ("http", "inferstream_http_request_seconds"),
)
BREAKER_STATES = {0: "closed", 1: "half-open", 2: "open"}

Labels = tuple[tuple[str, str], ...]


@dataclass
class Snapshot:
    """The registry's samples at one moment: sample name -> labels -> value."""

    at: float
    samples: dict[str, dict[Labels, float]] = field(default_factory=dict)

    def series(self, name: str) -> dict[Labels, float]:
        return self.samples.get(name, {})

    def total(self, name: str, **match: str) -> float | None:
        """The sum over the series of ``name`` whose labels include ``match``; None when there is none."""
        found = [v for labels, v in self.series(name).items() if _matches(labels, match)]
        return sum(found) if found else None

    def buckets(self, name: str) -> dict[float, float]:
        """``name``'s cumulative buckets summed over every label set: upper bound -> count."""
        out: dict[float, float] = defaultdict(float)
        for labels, value in self.series(name + "_bucket").items():
            le = dict(labels).get("le")
            if le is not None:
                out[float(le)] += value
        return dict(out)


def _matches(labels: Labels, match: Mapping[str, str]) -> bool:
    have = dict(labels)
    return all(have.get(k) == v for k, v in match.items())


def take_snapshot(registry: Collector = REGISTRY, now: Callable[[], float] = time.time) -> Snapshot:
    snap = Snapshot(at=now())
    for family in registry.collect():
        if not family.name.startswith("inferstream_"):
            continue
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            snap.samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return snap


def quantile(q: float, buckets: Mapping[float, float]) -> float | None:
    """``histogram_quantile(q, ...)`` over cumulative ``buckets``; None with no observations."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    total = buckets[bounds[-1]]
    rank = q * total
    lower, below = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower  # in the +Inf bucket: the highest finite bound, as Prometheus answers
            width = count - below
            return lower + (bound - lower) * ((rank - below) / width if width > 0 else 1.0)
        lower, below = bound, count
    return lower


def _delta(new: Mapping[float, float], old: Mapping[float, float]) -> dict[float, float]:
    # A reset counter (process restarted: impossible within one process) would go negative: clamp.
    return {le: max(0.0, v - old.get(le, 0.0)) for le, v in new.items()}


class Window:
    """Snapshots of the last :data:`WINDOW_S` seconds; :meth:`latest` takes one when due."""

    def __init__(
        self,
        take: Callable[[], Snapshot] = take_snapshot,
        window_s: float = WINDOW_S,
        min_interval_s: float = MIN_INTERVAL_S,
    ) -> None:
        self._take = take
        self.window_s = window_s
        self.min_interval_s = min_interval_s
        self._snaps: deque[Snapshot] = deque()

    def latest(self, now: float | None = None) -> tuple[Snapshot, Snapshot | None]:
        """The newest snapshot and the oldest kept one to compare it with (None: no earlier one)."""
        current = time.time() if now is None else now
        if not self._snaps or current - self._snaps[-1].at >= self.min_interval_s:
            self._snaps.append(self._take())
        # Keep one snapshot older than the window, so the span covered is a full window when it can be.
        while len(self._snaps) > 2 and self._snaps[-1].at - self._snaps[1].at >= self.window_s:
            self._snaps.popleft()
        newest = self._snaps[-1]
        oldest = self._snaps[0] if len(self._snaps) > 1 else None
        return newest, oldest


def rate(new: Snapshot, old: Snapshot | None, name: str, **match: str) -> tuple[float, float] | None:
    """(total now, per second over the window) of a counter; None when the counter is absent."""
    total = new.total(name, **match)
    if total is None:
        return None
    if old is None or new.at <= old.at:
        return total, 0.0
    before = old.total(name, **match) or 0.0
    return total, max(0.0, total - before) / (new.at - old.at)


def latency(new: Snapshot, old: Snapshot | None, name: str) -> dict[str, Any] | None:
    """Observations and percentiles of histogram ``name`` within the window; None when absent."""
    buckets = new.buckets(name)
    if not buckets:
        return None
    if old is not None:
        buckets = _delta(buckets, old.buckets(name))
    count = max(buckets.values(), default=0.0)
    out: dict[str, Any] = {"count": count}
    for q in QUANTILES:
        value = quantile(q, buckets)
        out[f"p{round(q * 100)}"] = None if value is None else round(value, 6)
    return out


def labelled(snap: Snapshot, name: str, keys: Iterable[str]) -> list[dict[str, Any]]:
    """Each series of ``name`` as ``{key: label, ..., "value": v}``, in label order."""
    wanted = tuple(keys)
    rows = []
    for labels, value in sorted(snap.series(name).items()):
        have = dict(labels)
        rows.append({**{k: have.get(k, "") for k in wanted}, "value": value})
    return rows
