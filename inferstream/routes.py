"""Routes: each public route (task and model name) with its backends, fallbacks and limits, from a file or the shorthand.

A routes file (``INFERSTREAM_ROUTES_FILE``, YAML or TOML; ``deploy/routes.yaml`` is
the commented example) is parsed, validated and resolved here into a frozen
:class:`RouteTable`; every problem names the file, the line and the field. Without
a file, ``INFERSTREAM_MODELS`` and ``INFERSTREAM_MODEL_URL`` give one backend per route.

Besides :mod:`inferstream.settings`, this is the one module that reads the
environment (``environ`` defaults to ``os.environ``): for the API keys named by
``api_key_env`` and for ``${NAME}`` expansion in the file's string values.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path as FilePath
from typing import Any, Literal

from inferstream.errors import ConfigurationError
from inferstream.routes_check import MODEL_NAME, MODEL_NAME_RULE, TASKS, check_document
from inferstream.routes_source import (
    Document,
    Path,
    SourceError,
    dotted,
    expand,
    read_toml,
    read_yaml,
)
from inferstream.settings import PRIORITIES, Settings

__all__ = [
    "TASKS",
    "Backend",
    "Problem",
    "Route",
    "RouteTable",
    "RoutesError",
    "configured_routes",
    "load_routes",
    "parse_routes",
    "routes_from_settings",
]

SHORTHAND = "INFERSTREAM_MODELS"


@dataclass(frozen=True)
class Backend:
    """One OpenAI-compatible server a route's calls may go to."""

    name: str  # unique within its route; recorded on every result and a metric label
    url: str  # base URL (".../v1"), no trailing "/"
    model: str  # the backend's own model id, sent as "model"
    weight: float = 1.0  # share of calls among healthy backends of the same order
    order: int = 1  # the lowest order with a healthy backend takes the calls; higher orders are fallbacks
    api_key_env: str | None = None  # the environment variable holding the Bearer key
    api_key: str = field(default="", repr=False, compare=True)  # never in repr, str, logs or describe()


@dataclass(frozen=True)
class Route:
    """A public route: what clients name (task, model), where its calls go, and its limits per ML worker."""

    task: str
    model: str
    backends: tuple[Backend, ...]
    default: bool
    concurrency: int
    batch_size: int
    batch_wait_ms: int
    batch_concurrency: int
    rate_limit_rps: float
    call_timeout_s: float
    retry_budget_s: float
    breaker_threshold: int
    breaker_reset_s: float
    max_priority: str
    line: int | None = field(default=None, compare=False)

    @property
    def key(self) -> tuple[str, str]:
        return (self.task, self.model)

    def cap_priority(self, priority: str) -> str:
        """A priority above the route's maximum is capped, not rejected (as ``Plan.cap_priority``)."""
        wanted = PRIORITIES.index(priority) if priority in PRIORITIES else PRIORITIES.index("normal")
        return PRIORITIES[min(wanted, PRIORITIES.index(self.max_priority))]  # type: ignore[arg-type]

    def public(self) -> dict[str, Any]:
        """What ``GET /v1/models`` shows: no URLs, backend names or keys."""
        return {
            "id": self.model,
            "object": "model",
            "owned_by": "inferstream",
            "task": self.task,
            "default": self.default,
            "max_priority": self.max_priority,
        }

    def describe(self) -> dict[str, Any]:
        """Everything but the API keys (only whether one is set)."""
        limits: dict[str, Any] = {
            "concurrency": self.concurrency,
            "rate_limit_rps": self.rate_limit_rps,
            "call_timeout_s": self.call_timeout_s,
            "retry_budget_s": self.retry_budget_s,
            "breaker_threshold": self.breaker_threshold,
            "breaker_reset_s": self.breaker_reset_s,
        }
        if self.task == "embed":
            limits |= {
                "batch_size": self.batch_size,
                "batch_wait_ms": self.batch_wait_ms,
                "batch_concurrency": self.batch_concurrency,
            }
        backends = [
            {
                "name": b.name,
                "url": b.url,
                "model": b.model,
                "weight": b.weight,
                "order": b.order,
                "api_key_env": b.api_key_env,
                "api_key_set": bool(b.api_key),
            }
            for b in self.backends
        ]
        return {
            "task": self.task,
            "model": self.model,
            "default": self.default,
            "max_priority": self.max_priority,
            "line": self.line,
            "limits": limits,
            "backends": backends,
        }


@dataclass(frozen=True)
class RouteTable:
    """Every route of a deployment in declared order; ``digest`` tells whether two tables come from the same config."""

    routes: tuple[Route, ...]
    source: str
    digest: str

    def get(self, task: str, model: str) -> Route | None:
        return next((r for r in self.routes if r.task == task and r.model == model), None)

    def default_for(self, task: str) -> Route | None:
        return next((r for r in self.routes if r.task == task and r.default), None)

    @property
    def model_routes(self) -> dict[str, list[str]]:
        """``{"generate": [default, others in order], ...}``: the shape ``schemas.api.parse_submission`` takes."""
        out: dict[str, list[str]] = {}
        for route in self.routes:
            out.setdefault(route.task, [])
        for task, models in out.items():
            ordered = sorted((r for r in self.routes if r.task == task), key=lambda r: not r.default)
            models.extend(r.model for r in ordered)
        return out

    def keys(self) -> list[tuple[str, str]]:
        return [r.key for r in self.routes]

    def __iter__(self) -> Iterator[Route]:
        return iter(self.routes)

    def __len__(self) -> int:
        return len(self.routes)

    def describe(self) -> list[dict[str, Any]]:
        """Per route everything but the API keys, for ``routes check`` and ``/readyz``."""
        return [r.describe() for r in self.routes]


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a routes file, where it is."""

    file: str
    line: int | None
    field: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else self.file
        return f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"


class RoutesError(ConfigurationError):
    """A routes file or the shorthand does not validate; ``str()`` lists every problem, one per line."""

    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("\n".join(str(p) for p in problems))
        self.problems = problems


def parse_routes(
    text: str,
    *,
    source: str,
    fmt: Literal["yaml", "toml"],
    settings: Settings,
    environ: Mapping[str, str] | None = None,
) -> RouteTable:
    """Parse, validate and resolve a routes file's text; ``RoutesError`` lists every problem found."""
    return _parse(text, text.encode(), source, fmt, settings, os.environ if environ is None else environ)


def load_routes(
    path: str | os.PathLike[str], settings: Settings, environ: Mapping[str, str] | None = None
) -> RouteTable:
    """Read the routes file at ``path`` (format from its suffix: .yaml, .yml or .toml)."""
    source = os.fspath(path)
    suffix = FilePath(source).suffix.lower()
    fmt: Literal["yaml", "toml"]
    if suffix in (".yaml", ".yml"):
        fmt = "yaml"
    elif suffix == ".toml":
        fmt = "toml"
    else:
        raise RoutesError([Problem(source, None, "", "a routes file must end in .yaml, .yml or .toml")])
    try:
        raw = FilePath(source).read_bytes()
        text = raw.decode("utf-8")
    except OSError as exc:
        raise RoutesError([Problem(source, None, "", f"cannot read the file: {exc.strerror or exc}")]) from None
    except UnicodeDecodeError as exc:
        raise RoutesError([Problem(source, None, "", f"not UTF-8 text ({exc.reason} at byte {exc.start})")]) from None
    return _parse(text, raw, source, fmt, settings, os.environ if environ is None else environ)


def routes_from_settings(settings: Settings) -> RouteTable:
    """The shorthand: one backend (``INFERSTREAM_MODEL_URL``) per ``INFERSTREAM_MODELS`` route; a task's first model is its default."""
    problems: list[Problem] = []
    routes: list[Route] = []
    limits = settings_limits(settings)
    for task, models in settings.model_routes.items():
        if task not in TASKS:
            problems.append(Problem(SHORTHAND, None, task, f"unknown task (one of {', '.join(TASKS)})"))
        for index, model in enumerate(models):
            if not MODEL_NAME.match(model):
                problems.append(Problem(SHORTHAND, None, f"{task}:{model}", MODEL_NAME_RULE))
            backend = Backend("default", settings.model_url.rstrip("/"), model, api_key=settings.model_api_key)
            routes.append(Route(task, model, (backend,), index == 0, line=None, **limits))
    if not routes:
        problems.append(Problem(SHORTHAND, None, "", "no routes: set it to task:model,... or set INFERSTREAM_ROUTES_FILE"))
    if problems:
        raise RoutesError(problems)
    inputs = {"models": settings.models, "model_url": settings.model_url, "limits": limits}
    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]
    return RouteTable(tuple(routes), SHORTHAND, digest)


def configured_routes(settings: Settings, environ: Mapping[str, str] | None = None) -> RouteTable:
    """The routes file when ``INFERSTREAM_ROUTES_FILE`` is set, else the shorthand."""
    if settings.routes_file:
        return load_routes(settings.routes_file, settings, environ)
    return routes_from_settings(settings)


def settings_limits(settings: Settings) -> dict[str, Any]:
    """The per-route limits every route starts from: the ``INFERSTREAM_ML_*`` settings."""
    return {
        "concurrency": settings.ml_concurrency,
        "batch_size": settings.ml_batch_size,
        "batch_wait_ms": settings.ml_batch_wait_ms,
        "batch_concurrency": settings.ml_batch_concurrency,
        "rate_limit_rps": settings.ml_rate_limit_rps,
        "call_timeout_s": settings.ml_call_timeout_s,
        "retry_budget_s": settings.ml_retry_budget_s,
        "breaker_threshold": settings.ml_breaker_threshold,
        "breaker_reset_s": settings.ml_breaker_reset_s,
        "max_priority": "high",
    }


def _parse(
    text: str, raw: bytes, source: str, fmt: str, settings: Settings, environ: Mapping[str, str]
) -> RouteTable:
    try:
        doc: Document = read_yaml(text) if fmt == "yaml" else read_toml(text)
    except SourceError as exc:
        raise RoutesError([Problem(source, exc.line, "", exc.message)]) from None
    expanded: set[Path] = set()
    found: list[tuple[Path, str]] = list(doc.problems)
    doc.data = expand(doc.data, (), environ, expanded, found)
    unexpanded = {path for path, _ in found}
    checked: list[tuple[Path, str]] = []
    resolved = check_document(doc.data, settings_limits(settings), environ, expanded, checked)
    found += [(path, message) for path, message in checked if path not in unexpanded]  # said once is enough
    if found:
        problems = [Problem(source, doc.line(path), dotted(path), message) for path, message in found]
        problems.sort(key=lambda p: p.line or 0)
        raise RoutesError(problems)
    routes = []
    for index, values in enumerate(resolved):
        backends = tuple(Backend(**b) for b in values.pop("backends"))
        routes.append(Route(backends=backends, line=doc.line(("routes", index)), **values))
    return RouteTable(tuple(routes), source, hashlib.sha256(raw).hexdigest()[:16])
