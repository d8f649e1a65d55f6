"""Validation of a parsed routes file: every rule, each problem at its field's path; the resolved values of a valid file.

Plain checks rather than a schema library, so that one pass reports every
problem with a message that says what is allowed. Limits resolve as: the
route's own value, else the file's ``defaults`` block, else the ``INFERSTREAM_ML_*`` setting.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from inferstream.routes_source import Path

TASKS = ("generate", "embed")  # schemas.records.Task values
PRIORITY_NAMES = ("high", "normal", "low")
# The public model name becomes part of a RabbitMQ queue name.
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")
MODEL_NAME_RULE = "must start with a letter or digit and have at most 128 of A-Z a-z 0-9 . _ : / -"
BACKEND_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

ROOT_FIELDS = ("version", "defaults", "routes")
LIMIT_FIELDS = (
    "concurrency", "batch", "rate_limit_rps", "call_timeout_s", "retry_budget_s", "breaker", "max_priority",
)
ROUTE_FIELDS = ("task", "model", "default", "backends", *LIMIT_FIELDS)
BACKEND_FIELDS = ("name", "url", "model", "weight", "order", "api_key_env")
BATCH_FIELDS = ("size", "wait_ms", "concurrency")
BREAKER_FIELDS = ("threshold", "reset_s")

# (field in the file, Route attribute, integer?, bound, bound is inclusive)
_SCALAR_LIMITS = (
    ("concurrency", "concurrency", True, 1, True),
    ("rate_limit_rps", "rate_limit_rps", False, 0, True),
    ("call_timeout_s", "call_timeout_s", False, 0, False),
    ("retry_budget_s", "retry_budget_s", False, 0, True),
)
_NESTED_LIMITS = {
    "batch": (("size", "batch_size", True, 1, True), ("wait_ms", "batch_wait_ms", True, 0, True),
              ("concurrency", "batch_concurrency", True, 1, True)),
    "breaker": (("threshold", "breaker_threshold", True, 1, True), ("reset_s", "breaker_reset_s", False, 0, False)),
}
_NESTED_FIELDS = {"batch": BATCH_FIELDS, "breaker": BREAKER_FIELDS}


def check_document(
    data: Any,
    base_limits: Mapping[str, Any],
    environ: Mapping[str, str],
    expanded: set[Path],
    found: list[tuple[Path, str]],
) -> list[dict[str, Any]]:
    """Each route's resolved values (``backends``: a list of ``Backend`` keyword arguments); problems go to ``found``."""
    check = _Checker(environ, expanded, found)
    if data is None:
        found.append(((), "the file is empty: it needs a `routes` list"))
        return []
    root = check.mapping(data, (), ROOT_FIELDS)
    if root is None:
        return []
    if "version" in root and (type(root["version"]) is not int or root["version"] != 1):
        found.append((("version",), f"must be 1, the only version there is (got {_shown(root['version'])})"))
    defaults: dict[str, Any] = {}
    if "defaults" in root:
        block = check.mapping(root["defaults"], ("defaults",), LIMIT_FIELDS)
        defaults = check.limits(block, ("defaults",)) if block is not None else {}
    if "routes" not in root:
        found.append((("routes",), "missing: the file needs a `routes` list with at least one route"))
        return []
    items = root["routes"]
    if not isinstance(items, list):
        found.append((("routes",), f"must be a list of routes (got {_shown(items)})"))
        return []
    if not items:
        found.append((("routes",), "is empty: declare at least one route"))
    resolved = []
    seen: dict[tuple[str, str], int] = {}
    default_of: dict[str, int] = {}
    for index, item in enumerate(items):
        route = check.route(item, ("routes", index), base_limits, defaults)
        if route is None:
            continue
        key = (route["task"], route["model"])
        if key in seen:
            found.append((("routes", index), f"duplicate route {key[0]}/{key[1]}: already declared as routes[{seen[key]}]"))
        seen.setdefault(key, index)
        if route["default"]:
            if route["task"] in default_of:
                found.append((("routes", index, "default"), f"routes[{default_of[route['task']]}] is already the default {route['task']} route; only one may be"))
            default_of.setdefault(route["task"], index)
        resolved.append(route)
    for route in resolved:  # a task without `default: true` defaults to its first route
        if route["task"] not in default_of:
            default_of[route["task"]] = -1
            route["default"] = True
    return resolved


class _Checker:
    def __init__(self, environ: Mapping[str, str], expanded: set[Path], found: list[tuple[Path, str]]) -> None:
        self.environ, self.expanded, self.found = environ, expanded, found

    def problem(self, path: Path, message: str) -> None:
        self.found.append((path, message))

    def mapping(self, value: Any, path: Path, allowed: tuple[str, ...]) -> dict[str, Any] | None:
        if not isinstance(value, dict):
            self.problem(path, f"must be a mapping of {', '.join(allowed)} (got {_shown(value)})")
            return None
        for key in value:
            if key not in allowed:
                close = difflib.get_close_matches(key, allowed, n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                self.problem(path + (key,), f"unknown field ({hint}allowed here: {', '.join(allowed)})")
        return value

    def number(self, value: Any, path: Path, integer: bool, bound: float, inclusive: bool) -> Any:
        """``value`` if it is a number within its bound, else None (and a problem)."""
        if isinstance(value, str) and path in self.expanded:  # `${VAR}` in a numeric field
            try:
                value = int(value) if integer else float(value)
            except ValueError:
                pass
        kind = "an integer" if integer else "a number"
        if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
            self.problem(path, f"must be {kind} (got {_shown(value)})")
            return None
        if not math.isfinite(value):
            self.problem(path, f"must be a finite number (got {value})")
            return None
        if value < bound or (value == bound and not inclusive):
            rule = f"at least {bound}" if inclusive else f"greater than {bound}"
            self.problem(path, f"must be {rule} (got {_shown(value)})")
            return None
        return value if integer else float(value)

    def string(self, value: Any, path: Path) -> str | None:
        if isinstance(value, str) and value:
            return value
        self.problem(path, f"must be a non-empty string (got {_shown(value)})")
        return None

    def limits(self, block: dict[str, Any], path: Path) -> dict[str, Any]:
        """The limits ``block`` sets, under ``Route`` attribute names."""
        out: dict[str, Any] = {}
        for name, attribute, integer, bound, inclusive in _SCALAR_LIMITS:
            if name in block:
                value = self.number(block[name], path + (name,), integer, bound, inclusive)
                if value is not None:
                    out[attribute] = value
        for group, specs in _NESTED_LIMITS.items():
            if group not in block:
                continue
            nested = self.mapping(block[group], path + (group,), _NESTED_FIELDS[group]) or {}
            for name, attribute, integer, bound, inclusive in specs:
                if name in nested:
                    value = self.number(nested[name], path + (group, name), integer, bound, inclusive)
                    if value is not None:
                        out[attribute] = value
        if "max_priority" in block:
            priority = block["max_priority"]
            if priority in PRIORITY_NAMES:
                out["max_priority"] = priority
            else:
                self.problem(path + ("max_priority",), f"must be one of {', '.join(PRIORITY_NAMES)} (got {_shown(priority)})")
        return out

    def route(self, item: Any, path: Path, base: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any] | None:
        block = self.mapping(item, path, ROUTE_FIELDS)
        if block is None:
            return None
        ok = True
        task = block.get("task")
        if "task" not in block:
            self.problem(path + ("task",), f"missing: every route needs a task ({', '.join(TASKS)})")
            ok = False
        elif task not in TASKS:
            self.problem(path + ("task",), f"must be one of {', '.join(TASKS)} (got {_shown(task)})")
            ok = False
        model = block.get("model")
        if "model" not in block:
            self.problem(path + ("model",), "missing: every route needs the public model name clients send")
            ok = False
        elif not isinstance(model, str) or not MODEL_NAME.match(model):
            self.problem(path + ("model",), f"{MODEL_NAME_RULE} (got {_shown(model)})")
            ok = False
        default = block.get("default", False)
        if not isinstance(default, bool):
            self.problem(path + ("default",), f"must be true or false (got {_shown(default)})")
            ok = False
        if "batch" in block and task == "generate":
            self.problem(path + ("batch",), "only embed routes batch: remove `batch` from this generate route")
        own = self.limits(block, path)
        backends = self.backends(block, path, model if isinstance(model, str) else "")
        if not ok or backends is None:
            return None
        return {"task": task, "model": model, "default": default, **base, **defaults, **own, "backends": backends}

    def backends(self, block: dict[str, Any], path: Path, model: str) -> list[dict[str, Any]] | None:
        where = path + ("backends",)
        if "backends" not in block:
            self.problem(where, "missing: a route needs at least one backend")
            return None
        items = block["backends"]
        if not isinstance(items, list):
            self.problem(where, f"must be a list of backends (got {_shown(items)})")
            return None
        if not items:
            self.problem(where, "is empty: a route needs at least one backend")
            return None
        out: list[dict[str, Any]] = []
        names: dict[str, int] = {}
        failed = False
        for index, item in enumerate(items):
            backend = self.backend(item, where + (index,), model)
            if backend is None:
                failed = True
                continue
            name = backend["name"]
            if name in names:
                how = "" if "name" in item else " (the default name is the URL's host:port: give each backend a `name`)"
                self.problem(where + (index, "name"), f"{name!r} is already the name of backends[{names[name]}]; names must be unique within a route{how}")
                failed = True
            names.setdefault(name, index)
            out.append(backend)
        return None if failed else out

    def backend(self, item: Any, path: Path, route_model: str) -> dict[str, Any] | None:
        block = self.mapping(item, path, BACKEND_FIELDS)
        if block is None:
            return None
        before = len(self.found)
        url = self.url(block, path)
        model = self.string(block["model"], path + ("model",)) if "model" in block else route_model
        weight = self.number(block.get("weight", 1.0), path + ("weight",), False, 0, False)
        order = self.number(block.get("order", 1), path + ("order",), True, 1, True)
        name = _default_name(url) if url is not None else None
        if "name" in block:
            name = self.string(block["name"], path + ("name",))
        if name is not None and not BACKEND_NAME.match(name):
            self.problem(path + ("name",), f"{name!r} must start with a letter or digit and have at most 64 of A-Z a-z 0-9 . _ : -")
        key_env, key = None, ""
        if "api_key_env" in block:
            key_env = self.string(block["api_key_env"], path + ("api_key_env",))
            if key_env is not None and not ENV_NAME.match(key_env):
                self.problem(path + ("api_key_env",), f"{key_env!r} is not an environment variable name (the key itself never goes in the file)")
            elif key_env is not None:
                key = self.environ.get(key_env, "")
                if not key:
                    state = "is not set" if key_env not in self.environ else "is empty"
                    self.problem(path + ("api_key_env",), f"environment variable {key_env} {state}")
        if len(self.found) > before:
            return None
        return {"name": name, "url": url, "model": model, "weight": weight, "order": order, "api_key_env": key_env, "api_key": key}

    def url(self, block: dict[str, Any], path: Path) -> str | None:
        where = path + ("url",)
        if "url" not in block:
            self.problem(where, "missing: every backend needs the base URL of its OpenAI-compatible API")
            return None
        url = self.string(block["url"], where)
        if url is None:
            return None
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018  (raises ValueError on a port that is not a number in range)
        except ValueError as exc:
            self.problem(where, f"is not a valid URL: {exc}")
            return None
        if parts.username is not None or parts.password is not None:  # checked first: the URL is not echoed
            self.problem(where, "must not hold credentials (user:password@): put the key in an environment variable and name it in api_key_env")
        elif parts.scheme not in ("http", "https") or not parts.hostname:
            self.problem(where, f"must be an http:// or https:// URL with a host, such as http://127.0.0.1:8000/v1 (got {url!r})")
        elif parts.query or parts.fragment or url.endswith(("?", "#")):
            self.problem(where, f"must not have a query or fragment (got {url!r})")
        else:
            return url.rstrip("/")
        return None


def _default_name(url: str) -> str:
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return f"{parts.hostname}:{port}"


def _shown(value: Any) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, str) else str(value)


__all__ = ["MODEL_NAME", "MODEL_NAME_RULE", "TASKS", "check_document"]
