"""The README's Routes section and docker-compose.yml agree with the routes code and deploy/routes.yaml."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from inferstream import routes_check
from inferstream.routes import RoutesError, load_routes, parse_routes
from inferstream.settings import Settings
from streams.commands.routes import table_lines

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "deploy" / "routes.yaml"
README = (ROOT / "README.md").read_text(encoding="utf-8")
MOUNT_TARGET = "/etc/inferstream/routes.yaml"
MOUNT = f"./deploy/routes.yaml:{MOUNT_TARGET}:ro"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.MULTILINE | re.DOTALL)
# The limit blocks that are mappings, documented as `block.field`.
NESTED = {"batch": routes_check.BATCH_FIELDS, "breaker": routes_check.BREAKER_FIELDS}


def routes_section() -> str:
    start = README.index("\n## Routes\n")
    end = README.index("\n## ", start + 1)
    return README[start:end]


def blocks(language: str) -> list[str]:
    return [body for lang, body in FENCE.findall(routes_section()) if lang == language]


def prose() -> str:
    """The section without its code blocks, so that the example file does not count as documentation."""
    return FENCE.sub("", routes_section())


def test_the_routes_section_follows_running_it() -> None:
    headings = re.findall(r"^## (.+)$", README, re.MULTILINE)
    assert headings[headings.index("Running it") + 1] == "Routes"


def test_the_readme_example_is_deploy_routes_yaml_byte_for_byte() -> None:
    assert blocks("yaml"), "the Routes section has no yaml block"
    assert blocks("yaml")[0].encode("utf-8") == EXAMPLE.read_bytes()


def documented_fields() -> set[str]:
    """The first cell of each row of the field table: `task`, `batch.size`, backend `url`, ..."""
    table = prose()[prose().index("| Field |") :]
    rows = re.findall(r"^\| ((?:backend )?`[\w.]+`) \|", table, re.MULTILINE)
    return {row.replace("`", "") for row in rows}


def accepted_fields() -> set[str]:
    fields = set(routes_check.ROOT_FIELDS)
    for name in routes_check.ROUTE_FIELDS:
        if name in NESTED:
            fields |= {f"{name}.{sub}" for sub in NESTED[name]}
        else:
            fields.add(name)
    fields |= {f"backend {name}" for name in routes_check.BACKEND_FIELDS}
    return fields


def test_the_field_table_documents_exactly_the_fields_the_checker_accepts() -> None:
    assert documented_fields() == accepted_fields()


def test_the_defaults_row_names_every_limit_field() -> None:
    row = next(line for line in prose().splitlines() if line.startswith("| `defaults` |"))
    for name in routes_check.LIMIT_FIELDS:
        assert f"`{name}`" in row, name


def test_the_quoted_check_output_is_what_the_command_prints() -> None:
    text = EXAMPLE.read_text(encoding="utf-8")
    table = parse_routes(
        text, source="deploy/routes.yaml", fmt="yaml", settings=Settings.from_env({}), environ={"OVERFLOW_API_KEY": "x"}
    )
    printed = next(b for b in blocks("") if "routes check deploy/routes.yaml" in b)
    for line in table_lines(table):
        assert line in printed.splitlines(), line


def test_the_quoted_broken_file_fails_with_the_quoted_lines() -> None:
    broken = blocks("yaml")[1]
    with pytest.raises(RoutesError) as caught:
        parse_routes(broken, source="broken.yaml", fmt="yaml", settings=Settings.from_env({}), environ={})
    printed = next(b for b in blocks("") if "routes check broken.yaml" in b).splitlines()
    assert [str(p) for p in caught.value.problems] == [line for line in printed if line.startswith("broken.yaml:")]


def test_the_models_example_is_what_get_v1_models_answers_for_the_example() -> None:
    text = EXAMPLE.read_text(encoding="utf-8")
    table = parse_routes(
        text, source="deploy/routes.yaml", fmt="yaml", settings=Settings.from_env({}), environ={"OVERFLOW_API_KEY": "x"}
    )
    shown = json.loads(next(b for b in blocks("json") if '"object": "list"' in b))
    created = {entry.pop("created") for entry in shown["data"]}
    assert len(created) == 1  # the time the routes were loaded, the same for every route
    assert shown["data"] == [route.public() for route in table]


# ---- docker-compose.yml ------------------------------------------------------

COMPOSE: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
WORKERS = sorted(n for n, s in COMPOSE["services"].items() if "worker" in s.get("command", []))
_COMPOSE_DEFAULT = re.compile(r"\$\{(\w+):-([^}]*)\}")


def compose_environment(name: str) -> dict[str, str]:
    """The service's environment as the container gets it, with no variables set on the host."""
    env = COMPOSE["services"][name].get("environment") or {}
    return {str(k): _COMPOSE_DEFAULT.sub(lambda m: m.group(2), str(v)) for k, v in env.items()}


def test_both_workers_are_there() -> None:
    assert WORKERS == ["ml-worker", "pipeline-worker"]


@pytest.mark.parametrize("name", WORKERS)
def test_each_worker_mounts_the_example_and_points_at_it(name: str) -> None:
    service = COMPOSE["services"][name]
    assert MOUNT in service.get("volumes", [])
    assert compose_environment(name)["INFERSTREAM_ROUTES_FILE"] == MOUNT_TARGET


@pytest.mark.parametrize("name", WORKERS)
def test_the_example_resolves_in_each_worker_to_the_compose_model_server(name: str) -> None:
    env = compose_environment(name)
    table = load_routes(EXAMPLE, Settings.from_env(env), environ=env)
    urls = {b.url for route in table for b in route.backends}
    assert urls == {"http://modelserver:8000/v1"}
    assert all(b.api_key for route in table for b in route.backends if b.api_key_env)
