"""The routes file: parsing, validation with file:line: field problems (YAML and TOML), resolution, the shorthand, and `routes check`."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from inferstream.errors import ConfigurationError
from inferstream.routes import (
    TASKS,
    Backend,
    Problem,
    RoutesError,
    RouteTable,
    configured_routes,
    load_routes,
    parse_routes,
    routes_from_settings,
)
from inferstream.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "deploy" / "routes.yaml"
SETTINGS = Settings(
    ml_concurrency=7, ml_batch_size=9, ml_batch_wait_ms=11, ml_batch_concurrency=3, ml_rate_limit_rps=2.5,
    ml_call_timeout_s=44.0, ml_retry_budget_s=55.0, ml_breaker_threshold=6, ml_breaker_reset_s=8.0,
)
ENV = {"KEY_B": "sk-secret-b"}

YAML = """\
version: 1
defaults:
  call_timeout_s: 30
routes:
  - task: embed
    model: emb
    batch: {size: 8, wait_ms: 5, concurrency: 1}
    backends:
      - name: tei
        url: http://127.0.0.1:8001/v1
        weight: 1
  - task: generate
    model: gen
    default: true
    backends:
      - name: a
        url: http://127.0.0.1:8000/v1
        order: 1
      - name: b
        url: http://127.0.0.1:8002/v1
        api_key_env: KEY_B
        order: 2
"""

TOML = """\
version = 1
[defaults]
call_timeout_s = 30

[[routes]]
task = "embed"
model = "emb"
batch = {size = 8, wait_ms = 5, concurrency = 1}

[[routes.backends]]
name = "tei"
url = "http://127.0.0.1:8001/v1"
weight = 1

[[routes]]
task = "generate"
model = "gen"
default = true

[[routes.backends]]
name = "a"
url = "http://127.0.0.1:8000/v1"
order = 1

[[routes.backends]]
name = "b"
url = "http://127.0.0.1:8002/v1"
api_key_env = "KEY_B"
order = 2
"""


def yaml_table(text: str = YAML, environ: dict[str, str] | None = None, settings: Settings = SETTINGS) -> RouteTable:
    return parse_routes(text, source="r.yaml", fmt="yaml", settings=settings, environ=ENV if environ is None else environ)


def toml_table(text: str = TOML, environ: dict[str, str] | None = None) -> RouteTable:
    return parse_routes(text, source="r.toml", fmt="toml", settings=SETTINGS, environ=ENV if environ is None else environ)


def problems_of(text: str, fmt: str = "yaml", environ: dict[str, str] | None = None) -> list[Problem]:
    with pytest.raises(RoutesError) as caught:
        (yaml_table if fmt == "yaml" else toml_table)(text, environ)
    assert str(caught.value) == "\n".join(str(p) for p in caught.value.problems)
    return caught.value.problems


def edit(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, old
    return text.replace(old, new)


# ---- resolution -------------------------------------------------------------------


def test_resolution_file_then_defaults_then_settings() -> None:
    table = yaml_table()
    emb, gen = table.routes
    assert (emb.batch_size, emb.batch_wait_ms, emb.batch_concurrency) == (8, 5, 1)  # the route's own
    assert emb.call_timeout_s == gen.call_timeout_s == 30.0  # the defaults block
    assert (gen.concurrency, gen.rate_limit_rps, gen.retry_budget_s) == (7, 2.5, 55.0)  # the settings
    assert (gen.breaker_threshold, gen.breaker_reset_s, gen.batch_size) == (6, 8.0, 9)
    assert emb.max_priority == gen.max_priority == "high"
    assert emb.backends == (Backend("tei", "http://127.0.0.1:8001/v1", "emb"),)  # model defaults to the public name
    a, b = gen.backends
    assert (a.order, b.order, b.api_key_env, b.api_key, a.api_key) == (1, 2, "KEY_B", "sk-secret-b", "")
    assert (emb.line, gen.line) == (5, 12)
    assert table.source == "r.yaml" and len(table) == 2 and list(table) == list(table.routes)


def test_defaults_block_and_nested_limits_merge_per_field() -> None:
    text = edit(YAML, "  call_timeout_s: 30\n", "  concurrency: 3\n  batch: {wait_ms: 1}\n  breaker: {reset_s: 1.5}\n  max_priority: low\n")
    emb, gen = yaml_table(text).routes
    assert (emb.batch_size, emb.batch_wait_ms, emb.concurrency) == (8, 5, 3)
    assert (gen.batch_wait_ms, gen.breaker_reset_s, gen.breaker_threshold, gen.max_priority) == (1, 1.5, 6, "low")
    assert gen.call_timeout_s == 44.0


def test_default_route_is_the_marked_one_else_the_tasks_first() -> None:
    text = YAML + "  - task: generate\n    model: gen2\n    backends: [{url: 'http://127.0.0.1:8000/v1'}]\n"
    table = yaml_table(edit(text, "    default: true\n", ""))
    assert [r.default for r in table] == [True, True, False]
    text = text.replace("    model: gen2\n", "    model: gen2\n    default: true\n").replace("    default: true\n    backends:\n      - name: a", "    backends:\n      - name: a")
    table = yaml_table(text)
    assert [r.default for r in table] == [True, False, True]
    assert table.default_for("generate") is table.get("generate", "gen2")
    assert table.model_routes == {"embed": ["emb"], "generate": ["gen2", "gen"]}
    assert table.keys() == [("embed", "emb"), ("generate", "gen"), ("generate", "gen2")]
    assert table.get("embed", "nope") is None and table.default_for("nothing") is None


def test_yaml_and_toml_give_the_same_routes() -> None:
    assert yaml_table().routes == toml_table().routes
    assert [r.line for r in toml_table()] == [5, 15]


def test_route_helpers() -> None:
    gen = yaml_table(edit(YAML, "    default: true\n", "    default: true\n    max_priority: normal\n")).routes[1]
    assert [gen.cap_priority(p) for p in ("high", "normal", "low", "bogus")] == ["normal", "normal", "low", "normal"]
    assert gen.key == ("generate", "gen")
    assert gen.public() == {
        "id": "gen", "object": "model", "owned_by": "inferstream", "task": "generate", "default": True, "max_priority": "normal",
    }
    assert TASKS == ("generate", "embed")


def test_backend_defaults_name_from_url_and_strips_the_trailing_slash() -> None:
    text = edit(YAML, "      - name: tei\n        url: http://127.0.0.1:8001/v1\n", "      - url: https://api.example.test/v1/\n        model: real-id\n")
    (backend,) = yaml_table(text).routes[0].backends
    assert (backend.name, backend.url, backend.model, backend.weight) == ("api.example.test:443", "https://api.example.test/v1", "real-id", 1.0)


# ---- the shorthand ----------------------------------------------------------------


def test_shorthand_is_todays_behaviour() -> None:
    settings = Settings(models="embed:a, embed:b ,generate:g", model_url="http://127.0.0.1:9000/v1/", model_api_key="sk-x", ml_concurrency=5)
    table = routes_from_settings(settings)
    assert table.model_routes == settings.model_routes == {"embed": ["a", "b"], "generate": ["g"]}
    assert table.source == "INFERSTREAM_MODELS" and [r.line for r in table] == [None] * 3
    assert [r.default for r in table] == [True, False, True]
    a = table.get("embed", "a")
    assert a is not None and a.backends == (Backend("default", "http://127.0.0.1:9000/v1", "a", api_key="sk-x"),)
    assert (a.concurrency, a.batch_size, a.call_timeout_s, a.max_priority) == (5, 32, 60.0, "high")
    assert configured_routes(settings) == table
    assert routes_from_settings(Settings()).model_routes == Settings().model_routes


def test_shorthand_digest_excludes_the_api_key() -> None:
    base = routes_from_settings(Settings())
    assert routes_from_settings(Settings(model_api_key="sk-other")).digest == base.digest
    assert routes_from_settings(Settings(models="generate:x")).digest != base.digest
    assert routes_from_settings(Settings(ml_concurrency=1)).digest != base.digest


def test_shorthand_refuses_what_cannot_be_a_route() -> None:
    with pytest.raises(RoutesError) as caught:
        routes_from_settings(Settings(models="translate:x,generate:bad name"))
    assert [p.field for p in caught.value.problems] == ["translate", "generate:bad name"]


def test_configured_routes_loads_the_file_when_set(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(YAML)
    table = configured_routes(Settings(routes_file=str(path)), ENV)
    assert table.source == str(path) and table.keys() == [("embed", "emb"), ("generate", "gen")]


# ---- ${} expansion, keys, digest ---------------------------------------------------


def test_variables_are_expanded_from_environ_after_parsing() -> None:
    text = edit(YAML, "url: http://127.0.0.1:8001/v1", "url: ${EMBED_URL:-http://127.0.0.1:8009/v1}")
    text = edit(text, "        order: 1\n", "        order: ${ORDER}\n")
    text = edit(text, "        api_key_env: KEY_B\n", "        api_key_env: KEY_B\n        model: ${B_MODEL-id}$$\n")
    emb, gen = yaml_table(text, {**ENV, "ORDER": "3", "B_MODEL": ""}).routes
    assert emb.backends[0].url == "http://127.0.0.1:8009/v1"
    assert gen.backends[0].order == 3 and gen.backends[1].model == "$"  # `-`: only unset takes the default
    emb, gen = yaml_table(text, {**ENV, "EMBED_URL": "http://127.0.0.1:7000/v1", "ORDER": "1"}).routes
    assert emb.backends[0].url == "http://127.0.0.1:7000/v1" and gen.backends[1].model == "id$"
    (problem,) = problems_of(text, environ={**ENV, "ORDER": "x"})
    assert (problem.line, problem.message) == (18, "must be an integer (got 'x')")


def test_unset_variable_is_a_problem_at_its_line() -> None:
    text = edit(YAML, "url: http://127.0.0.1:8000/v1", "url: ${GPU_URL}")
    (problem,) = problems_of(text)
    assert str(problem).startswith("r.yaml:17: routes[1].backends[0].url: environment variable GPU_URL is not set")
    (problem,) = problems_of(edit(YAML, "url: http://127.0.0.1:8000/v1", "url: ${GPU URL}"))
    assert problem.line == 17 and "malformed" in problem.message


def test_keys_are_not_expanded() -> None:
    (problem,) = problems_of(edit(YAML, "        weight: 1\n", "        ${W}: 1\n"), environ={**ENV, "W": "weight"})
    assert (problem.line, problem.field) == (11, "routes[0].backends[0].${W}")


def test_api_keys_are_resolved_and_never_shown() -> None:
    table = yaml_table()
    backend = table.routes[1].backends[1]
    assert backend.api_key == "sk-secret-b"
    shown = [repr(table), str(table), repr(backend), str(table.routes[1]), json.dumps(table.describe()),
             json.dumps([r.public() for r in table])]
    assert not any("sk-secret-b" in text for text in shown)
    described = table.describe()[1]["backends"]
    assert [(b["name"], b["api_key_env"], b["api_key_set"]) for b in described] == [("a", None, False), ("b", "KEY_B", True)]
    assert "url" not in json.dumps([r.public() for r in table])


def test_digest_is_the_files_bytes(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(YAML)
    table = load_routes(path, SETTINGS, ENV)
    assert table.digest == hashlib.sha256(YAML.encode()).hexdigest()[:16] == yaml_table().digest
    assert load_routes(path, SETTINGS, {"KEY_B": "sk-other"}).digest == table.digest
    path.write_text(YAML + "# a comment\n")
    assert load_routes(path, SETTINGS, ENV).digest != table.digest


def test_load_routes_refuses_unknown_suffixes_and_unreadable_files(tmp_path: Path) -> None:
    for name, fragment in (("r.json", "must end in .yaml, .yml or .toml"), ("missing.yml", "cannot read the file")):
        with pytest.raises(RoutesError) as caught:
            load_routes(tmp_path / name, SETTINGS, ENV)
        assert str(caught.value).startswith(str(tmp_path / name)) and fragment in str(caught.value)
    assert issubclass(RoutesError, ConfigurationError)
    toml_path = tmp_path / "r.toml"
    toml_path.write_text(TOML)
    assert load_routes(toml_path, SETTINGS, ENV).routes == yaml_table().routes


# ---- validation: YAML ---------------------------------------------------------------

YAML_CASES = [
    # (old, new, line, field, fragment)
    ("        weight: 1\n", "        wieght: 1\n", 11, "routes[0].backends[0].wieght", "did you mean 'weight'? allowed here: name, url"),
    ("  - task: embed\n", "  - task: embed\n    colour: red\n", 6, "routes[0].colour", "unknown field"),
    ("weight: 1", "weight: heavy", 11, "routes[0].backends[0].weight", "must be a number (got 'heavy')"),
    ("weight: 1", "weight: -1", 11, "routes[0].backends[0].weight", "must be greater than 0 (got -1)"),
    ("weight: 1", "weight: 0", 11, "routes[0].backends[0].weight", "must be greater than 0"),
    ("weight: 1", "weight: .inf", 11, "routes[0].backends[0].weight", "must be a finite number"),
    ("task: embed", "task: emb", 5, "routes[0].task", "must be one of generate, embed (got 'emb')"),
    ("  - task: embed\n", "  -\n", 6, "routes[0].task", "missing"),  # the line of the mapping lacking it
    ("model: gen", "model: 'gen gpt'", 13, "routes[1].model", "at most 128 of"),
    ("model: gen", "model: -gen", 13, "routes[1].model", "must start with a letter or digit"),
    ("  - task: generate\n    model: gen\n    default: true\n", "  - task: embed\n    model: emb\n", 12, "routes[1]", "duplicate route embed/emb: already declared as routes[0]"),
    ("    default: true\n", "    default: maybe\n", 14, "routes[1].default", "must be true or false"),
    ("    model: emb\n", "    model: emb\n    concurrency: 0\n", 7, "routes[0].concurrency", "must be at least 1 (got 0)"),
    ("size: 8", "size: 0", 7, "routes[0].batch.size", "must be at least 1"),
    ("wait_ms: 5", "wait_ms: -1", 7, "routes[0].batch.wait_ms", "must be at least 0"),
    ("concurrency: 1}", "concurrency: 0}", 7, "routes[0].batch.concurrency", "must be at least 1"),
    ("size: 8", "size: 8.5", 7, "routes[0].batch.size", "must be an integer (got 8.5)"),
    ("    default: true\n", "    default: true\n    batch: {size: 2}\n", 15, "routes[1].batch", "only embed routes batch"),
    ("  call_timeout_s: 30", "  call_timeout_s: 0", 3, "defaults.call_timeout_s", "must be greater than 0"),
    ("  call_timeout_s: 30", "  rate_limit_rps: -1", 3, "defaults.rate_limit_rps", "must be at least 0"),
    ("  call_timeout_s: 30", "  retry_budget_s: -0.5", 3, "defaults.retry_budget_s", "must be at least 0"),
    ("  call_timeout_s: 30", "  breaker:\n    threshold: 0", 4, "defaults.breaker.threshold", "must be at least 1"),
    ("  call_timeout_s: 30", "  breaker: {reset_s: 0}", 3, "defaults.breaker.reset_s", "must be greater than 0"),
    ("  call_timeout_s: 30", "  max_priority: urgent", 3, "defaults.max_priority", "must be one of high, normal, low"),
    ("  call_timeout_s: 30", "  timeout: 30", 3, "defaults.timeout", "unknown field"),
    ("url: http://127.0.0.1:8000/v1", "url: ftp://127.0.0.1:8000/v1", 17, "routes[1].backends[0].url", "http:// or https://"),
    ("url: http://127.0.0.1:8000/v1", "url: http:///v1", 17, "routes[1].backends[0].url", "with a host"),
    ("url: http://127.0.0.1:8000/v1", "url: http://127.0.0.1:8000/v1?x=1", 17, "routes[1].backends[0].url", "query or fragment"),
    ("url: http://127.0.0.1:8000/v1", "url: http://127.0.0.1:8000/v1#top", 17, "routes[1].backends[0].url", "query or fragment"),
    ("url: http://127.0.0.1:8000/v1", "url: http://127.0.0.1:99999/v1", 17, "routes[1].backends[0].url", "not a valid URL"),
    ("        url: http://127.0.0.1:8001/v1\n", "", 9, "routes[0].backends[0].url", "missing"),
    ("name: b", "name: a", 19, "routes[1].backends[1].name", "'a' is already the name of backends[0]"),
    ("name: b", "name: b c", 19, "routes[1].backends[1].name", "must start with a letter or digit"),
    ("order: 2", "order: 0", 22, "routes[1].backends[1].order", "must be at least 1"),
    ("order: 2", "order: 1.5", 22, "routes[1].backends[1].order", "must be an integer"),
    ("api_key_env: KEY_B", "api_key_env: sk-123", 21, "routes[1].backends[1].api_key_env", "not an environment variable name"),
    ("api_key_env: KEY_B", "api_key_env: OPENAI_API_KEY", 21, "routes[1].backends[1].api_key_env", "environment variable OPENAI_API_KEY is not set"),
    ("api_key_env: KEY_B", "api_key: sk-123", 21, "routes[1].backends[1].api_key", "unknown field"),
    ("    backends:\n      - name: tei\n        url: http://127.0.0.1:8001/v1\n        weight: 1\n", "", 5, "routes[0].backends", "missing: a route needs at least one backend"),
    ("    backends:\n      - name: tei\n        url: http://127.0.0.1:8001/v1\n        weight: 1\n", "    backends: []\n", 8, "routes[0].backends", "is empty"),
    ("    backends:\n      - name: tei\n        url: http://127.0.0.1:8001/v1\n        weight: 1\n", "    backends: tei\n", 8, "routes[0].backends", "must be a list"),
    ("version: 1", "version: 2", 1, "version", "must be 1"),
    ("version: 1", "verison: 1", 1, "verison", "did you mean 'version'?"),
    ("        weight: 1\n", "        weight: 1\n        weight: 2\n", 12, "routes[0].backends[0].weight", "appears twice"),
]


@pytest.mark.parametrize(("old", "new", "line", "field", "fragment"), YAML_CASES, ids=[c[4][:40] + f"@{c[2]}" for c in YAML_CASES])
def test_yaml_validation(old: str, new: str, line: int, field: str, fragment: str) -> None:
    problems = problems_of(edit(YAML, old, new))
    assert [(p.file, p.line, p.field) for p in problems] == [("r.yaml", line, field)], problems
    assert fragment in problems[0].message
    assert str(problems[0]) == f"r.yaml:{line}: {field}: {problems[0].message}"


def test_yaml_more_than_one_default_per_task() -> None:
    text = YAML + "  - task: generate\n    model: gen2\n    default: true\n    backends: [{url: 'http://127.0.0.1:8000/v1'}]\n"
    (problem,) = problems_of(text)
    assert (problem.line, problem.field) == (25, "routes[2].default")
    assert "routes[1] is already the default generate route" in problem.message


def test_yaml_whole_file_problems() -> None:
    assert [str(p) for p in problems_of("routes: []\n")] == ["r.yaml:1: routes: is empty: declare at least one route"]
    assert [str(p) for p in problems_of("")] == ["r.yaml:1: the file is empty: it needs a `routes` list"]
    assert [(p.line, p.field) for p in problems_of("version: 1\n")] == [(1, "routes")]
    assert [(p.line, p.field) for p in problems_of("- task: embed\n")] == [(1, "")]
    assert [(p.line, p.field) for p in problems_of("routes: {task: embed}\n")] == [(1, "routes")]


def test_one_pass_reports_every_problem_in_line_order() -> None:
    text = edit(edit(edit(YAML, "weight: 1", "weight: -1"), "task: embed", "task: x"), "order: 2", "order: 0")
    problems = problems_of(text.replace("api_key_env: KEY_B", "api_key_env: NOPE"))
    assert [(p.line, p.field) for p in problems] == [
        (5, "routes[0].task"), (11, "routes[0].backends[0].weight"),
        (21, "routes[1].backends[1].api_key_env"), (22, "routes[1].backends[1].order"),
    ]


def test_credentials_in_a_url_are_refused_without_echoing_them() -> None:
    (problem,) = problems_of(edit(YAML, "url: http://127.0.0.1:8000/v1", "url: http://user:hunter2@127.0.0.1:8000/v1"))
    assert (problem.line, problem.field) == (17, "routes[1].backends[0].url")
    assert "api_key_env" in problem.message and "hunter2" not in problem.message


def test_empty_environment_variable_for_a_key() -> None:
    (problem,) = problems_of(YAML, environ={"KEY_B": ""})
    assert (problem.line, problem.message) == (21, "environment variable KEY_B is empty")


def test_yaml_syntax_error_carries_its_line() -> None:
    (problem,) = problems_of(edit(YAML, "    model: gen\n", "   model: gen\n"))
    assert problem.line == 13 and problem.message.startswith("YAML syntax error")
    (problem,) = problems_of(edit(YAML, "size: 8,", "size: [8,"))
    assert problem.line is not None and problem.line >= 7 and str(problem).startswith(f"r.yaml:{problem.line}: YAML")


def test_yaml_unsafe_tags_are_refused() -> None:
    (problem,) = problems_of(edit(YAML, "weight: 1", "weight: !!python/object:os.system x"))
    assert problem.line == 11 and "YAML" in problem.message


def test_yaml_anchors_and_merge_keys_work() -> None:
    text = edit(YAML, "      - name: a\n        url: http://127.0.0.1:8000/v1\n", "      - &a\n        name: a\n        url: http://127.0.0.1:8000/v1\n")
    text = edit(text, "      - name: b\n        url: http://127.0.0.1:8002/v1\n", "      - <<: *a\n        name: b\n")
    assert yaml_table(text).routes[1].backends[1].url == "http://127.0.0.1:8000/v1"


# ---- validation: TOML ---------------------------------------------------------------

TOML_CASES = [
    ('weight = 1', 'wieght = 1', 13, "routes[0].backends[0].wieght", "did you mean 'weight'?"),
    ('weight = 1', 'weight = -1', 13, "routes[0].backends[0].weight", "must be greater than 0 (got -1)"),
    ('order = 2', 'order = 0', 29, "routes[1].backends[1].order", "must be at least 1"),
    ('task = "embed"', 'task = "emb"', 6, "routes[0].task", "must be one of generate, embed"),
    ('model = "gen"', 'model = "gen gpt"', 17, "routes[1].model", "at most 128 of"),
    ('size = 8', 'size = 0', 8, "routes[0].batch.size", "must be at least 1"),
    ('wait_ms = 5', 'wiat_ms = 5', 8, "routes[0].batch.wiat_ms", "unknown field"),
    ('call_timeout_s = 30', 'call_timeout_s = 0', 3, "defaults.call_timeout_s", "must be greater than 0"),
    ('url = "http://127.0.0.1:8000/v1"', 'url = "ftp://127.0.0.1:8000/v1"', 22, "routes[1].backends[0].url", "http:// or https://"),
    ('url = "http://127.0.0.1:8000/v1"\n', "", 20, "routes[1].backends[0].url", "missing"),
    ('task = "embed"\n', "", 5, "routes[0].task", "missing"),
    ('name = "b"', 'name = "a"', 26, "routes[1].backends[1].name", "already the name of backends[0]"),
    ('api_key_env = "KEY_B"', 'api_key_env = "OPENAI_API_KEY"', 28, "routes[1].backends[1].api_key_env", "environment variable OPENAI_API_KEY is not set"),
    ("default = true\n", 'default = true\nbatch = {size = 2}\n', 19, "routes[1].batch", "only embed routes batch"),
    ("default = true\n", "default = true\n[routes.breaker]\nthreshold = 1\nreset_s = 0\n", 21, "routes[1].breaker.reset_s", "must be greater than 0"),
    ("default = true\n", "default = true\n[routes.breaker]\ntreshold = 1\n", 20, "routes[1].breaker.treshold", "did you mean 'threshold'?"),
    ("version = 1", "version = 2", 1, "version", "must be 1"),
    ('url = "http://127.0.0.1:8001/v1"', 'url = "${EMBED}"', 12, "routes[0].backends[0].url", "environment variable EMBED is not set"),
]


@pytest.mark.parametrize(("old", "new", "line", "field", "fragment"), TOML_CASES, ids=[c[4][:40] + f"@{c[2]}" for c in TOML_CASES])
def test_toml_validation(old: str, new: str, line: int, field: str, fragment: str) -> None:
    problems = problems_of(edit(TOML, old, new), "toml")
    assert [(p.file, p.line, p.field) for p in problems] == [("r.toml", line, field)], problems
    assert fragment in problems[0].message


def test_toml_inline_array_of_backends_gets_each_element_line() -> None:
    text = TOML[: TOML.index("[[routes.backends]]\nname = \"a\"")] + (
        "backends = [\n"
        '  {name = "a", url = "http://127.0.0.1:8000/v1"},  # primary\n'
        '  {name = "b", url = "http://127.0.0.1:8002/v1", order = 0},\n'
        "]\n"
    )
    (problem,) = problems_of(text, "toml")
    assert (problem.line, problem.field) == (22, "routes[1].backends[1].order")


def test_toml_strings_with_brackets_and_hashes_do_not_confuse_the_lines() -> None:
    text = edit(TOML, 'model = "emb"\n', 'model = "emb"\n# [[routes]] a comment\nnote = "[[routes]] # {x = 1}"\n')
    problems = problems_of(text, "toml")
    assert [(p.line, p.field) for p in problems] == [(9, "routes[0].note")]
    assert toml_table(edit(TOML, 'weight = 1', "weight = 1 # [[routes]]")).routes == toml_table().routes


def test_toml_syntax_error_carries_its_line() -> None:
    (problem,) = problems_of(edit(TOML, "order = 2", "order = = 2"), "toml")
    assert problem.line == 29 and problem.message.startswith("TOML syntax error") and "(at line" not in problem.message


# ---- the example file and the command ----------------------------------------------


def test_the_example_file() -> None:
    table = load_routes(EXAMPLE, Settings(), {"OVERFLOW_API_KEY": "sk-overflow"})
    assert table.source == str(EXAMPLE)
    assert table.model_routes == {"embed": ["all-MiniLM-L6-v2"], "generate": ["sim-gpt", "sim-gpt-large"]}
    emb, gen, large = table.routes
    assert emb.backends[0].model == "sentence-transformers/all-MiniLM-L6-v2" and emb.default
    assert all(b.url.startswith("http://127.0.0.1:") for r in table for b in r.backends)
    assert [(b.name, b.url, b.model, b.weight, b.order) for b in gen.backends] == [
        ("gpu-a", "http://127.0.0.1:8000/v1", "sim-gpt", 3.0, 1), ("gpu-b", "http://127.0.0.1:8001/v1", "sim-gpt", 1.0, 1),
    ]
    assert gen.default and not large.default and large.max_priority == "normal" and large.breaker_reset_s <= 2
    assert [(b.name, b.order, b.api_key_env, b.api_key) for b in large.backends] == [
        ("primary", 1, None, ""), ("overflow", 2, "OVERFLOW_API_KEY", "sk-overflow"),
    ]
    moved = load_routes(EXAMPLE, Settings(), {"OVERFLOW_API_KEY": "k", "GPU_A_URL": "http://127.0.0.1:9100/v1", "OVERFLOW_URL": "http://127.0.0.1:9101/v1"})
    assert [b.url for b in moved.routes[2].backends] == ["http://127.0.0.1:9100/v1", "http://127.0.0.1:9101/v1"]
    with pytest.raises(RoutesError, match="OVERFLOW_API_KEY is not set"):
        load_routes(EXAMPLE, Settings(), {})


def _faust(*args: str, **extra: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERSTREAM_") and k not in ("OVERFLOW_API_KEY",)}
    env |= {"INFERSTREAM_NAMESPACE": f"routes{uuid.uuid4().hex[:8]}", "PYTHONPATH": str(ROOT), **extra}
    faust = Path(sys.executable).parent / "faust"
    return subprocess.run([str(faust), "-A", "streams", "routes", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_routes_check_command_ok() -> None:
    done = _faust("check", "deploy/routes.yaml", OVERFLOW_API_KEY="sk-do-not-print")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[-1] == "deploy/routes.yaml: 3 routes OK"
    assert any(line.startswith("generate/sim-gpt default max_priority=high") for line in lines)
    assert "    overflow http://127.0.0.1:8001/v1 sim-gpt weight=1 order=2 key:set" in lines
    assert "sk-do-not-print" not in done.stdout + done.stderr


def test_routes_check_command_without_a_file_checks_the_shorthand() -> None:
    done = _faust("check")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "INFERSTREAM_MODELS: 2 routes OK"


def test_routes_check_command_fails_with_every_problem(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text(edit(edit(YAML, "weight: 1", "weight: -1"), "api_key_env: KEY_B", "api_key_env: KEY_NOT_SET_ANYWHERE"))
    done = _faust("check", str(path))
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        f"{path}:11: routes[0].backends[0].weight: must be greater than 0 (got -1)",
        f"{path}:21: routes[1].backends[1].api_key_env: environment variable KEY_NOT_SET_ANYWHERE is not set",
    ]
    assert "Traceback" not in done.stderr and "routes OK" not in done.stdout


def test_yaml_merges_shared_through_aliases_and_recursive_aliases() -> None:
    text = edit(YAML, "      - name: a\n        url: http://127.0.0.1:8000/v1\n        order: 1\n", "      - &a {<<: {url: 'http://127.0.0.1:8000/v1', order: 1}, name: a}\n")
    text = edit(text, "      - name: b\n        url: http://127.0.0.1:8002/v1\n", "      - <<: [*a, {name: z, weight: 2}]\n        name: b\n")
    text += "  - task: generate\n    model: gen2\n    backends: [*a]\n"
    table = yaml_table(text)
    assert [(b.name, b.url, b.weight, b.order) for b in table.routes[1].backends] == [
        ("a", "http://127.0.0.1:8000/v1", 1.0, 1), ("b", "http://127.0.0.1:8000/v1", 2.0, 2),
    ]
    assert [(b.name, b.url, b.model) for b in table.routes[2].backends] == [("a", "http://127.0.0.1:8000/v1", "gen2")]
    problems = problems_of("routes: &r [*r]\n")
    assert [(p.line, p.field) for p in problems] == [(1, "routes[0]")] and "recursive" in problems[0].message
