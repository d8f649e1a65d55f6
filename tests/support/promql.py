"""The PromQL the deploy files hold (Grafana panels, Prometheus rules) and the metric names it selects.

The name extraction is a small tokenizer, not a parser: the expressions are
checked by ``promtool`` (tests/unit/test_alert_rules.py), so here they are
known to be valid PromQL and only the selectors' names need picking out.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy/grafana/inferstream.json"
ALERTS = ROOT / "deploy/prometheus/alerts.yml"
ALERT_TESTS = ROOT / "deploy/prometheus/alerts.test.yml"
# Series Prometheus makes itself for every target; no /metrics page has them.
SYNTHETIC = frozenset({"up", "scrape_duration_seconds", "scrape_samples_scraped"})
# What Grafana's range variables stand for when an expression is checked outside Grafana.
GRAFANA_RANGES = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "1h"}

_KEYWORDS = frozenset(
    {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left", "group_right",
     "inf", "nan", "atan2"}
)
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_TOKEN = re.compile(r"[0-9][0-9a-zA-Z.]*|[a-zA-Z_:][a-zA-Z0-9_:]*(\s*\()?")


def grafana_to_promql(expr: str) -> str:
    """A panel's expression with Grafana's range variables replaced, as Prometheus would receive it."""
    for var, value in GRAFANA_RANGES.items():
        expr = expr.replace(var, value)
    return expr


def metric_names(expr: str) -> set[str]:
    """The metric names ``expr`` selects (function names, keywords, labels and durations left out)."""
    text = _STRING.sub('""', grafana_to_promql(expr))
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # ranges and subqueries
    text = _GROUPING.sub("", text)
    names: set[str] = set()
    for match in _TOKEN.finditer(text):
        token = match.group(0)
        if token[0].isdigit() or match.group(1) is not None or token in _KEYWORDS:
            continue  # a number or duration, a function call, or a keyword
        names.add(token)
    return names


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def dashboard_panels(board: dict[str, Any] | None = None) -> Iterator[dict[str, Any]]:
    """Every panel, those inside collapsed rows included."""
    for panel in (board or dashboard())["panels"]:
        yield panel
        yield from panel.get("panels", [])


def dashboard_exprs(board: dict[str, Any] | None = None) -> dict[str, str]:
    """``{"<panel title> [<refId>]": expr}`` for every query of every panel."""
    return {
        f"{panel['title']} [{target['refId']}]": target["expr"]
        for panel in dashboard_panels(board)
        for target in panel.get("targets", [])
        if target.get("expr")
    }


def alert_rules() -> list[dict[str, Any]]:
    loaded = yaml.safe_load(ALERTS.read_text())
    return [rule for group in loaded["groups"] for rule in group["rules"]]


def rule_exprs() -> dict[str, str]:
    return {rule.get("alert") or rule["record"]: rule["expr"] for rule in alert_rules()}


def referenced_metrics() -> dict[str, set[str]]:
    """Each metric name the dashboard and the rules select, with where it is used."""
    used: dict[str, set[str]] = {}
    for where, exprs in (("panel", dashboard_exprs()), ("rule", rule_exprs())):
        for name, expr in exprs.items():
            for metric in metric_names(expr):
                used.setdefault(metric, set()).add(f"{where} {name}")
    return used
