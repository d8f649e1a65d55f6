"""docker-compose.yml cannot run here (no Docker engine), so check its consistency statically."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from inferstream.settings import PREFIX, Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
ONE_SHOT = "service_completed_successfully"


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):  # the `- NAME=value` form
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): str(v) for k, v in env.items()}


def depends_on(service: dict[str, Any]) -> dict[str, str]:
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return {name: "service_started" for name in deps}
    return {name: spec.get("condition", "service_started") for name, spec in deps.items()}


def one_shot_services() -> set[str]:
    return {
        name for s in SERVICES.values() for name, cond in depends_on(s).items() if cond == ONE_SHOT
    }


def inferstream_envs() -> list[tuple[str, dict[str, str]]]:
    return [(name, environment(s)) for name, s in SERVICES.items() if environment(s)]


def test_every_inferstream_variable_is_a_setting() -> None:
    known = Settings.env_names()
    seen = {key for _, env in inferstream_envs() for key in env if key.startswith(PREFIX)}
    assert seen, "the compose file sets no INFERSTREAM_* variable"
    assert seen <= known, f"unknown settings: {sorted(seen - known)}"


@pytest.mark.parametrize("name", [n for n, _ in inferstream_envs()])
def test_each_service_environment_builds_valid_settings(name: str) -> None:
    Settings.from_env(environment(SERVICES[name]))  # raises on a value of the wrong type


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_every_long_running_service_has_a_healthcheck(name: str) -> None:
    service = SERVICES[name]
    if name in one_shot_services():
        # A one-shot job has no "healthy" state; its dependents wait for it to succeed.
        assert service.get("restart") == "no", f"{name} is one-shot but may restart"
        return
    check = service.get("healthcheck") or {}
    assert not check.get("disable"), f"{name} disables its healthcheck"
    assert check.get("test"), f"{name} has no healthcheck"


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_dependencies_exist_and_wait_for_health(name: str) -> None:
    for target, condition in depends_on(SERVICES[name]).items():
        assert target in SERVICES, f"{name} depends on unknown service {target}"
        expected = ONE_SHOT if target in one_shot_services() else "service_healthy"
        assert condition == expected, f"{name} -> {target}: {condition}"


def test_urls_point_at_services_in_the_file() -> None:
    for name, env in inferstream_envs():
        for key, value in env.items():
            if key.startswith(PREFIX) and key.endswith(("_URL", "_DSN")) and "://" in value:
                host = urlsplit(value).hostname
                assert host in SERVICES, f"{name}: {key}={value} names no service"


def roles_of(name: str) -> frozenset[str]:
    return Settings.from_env(environment(SERVICES[name])).role_set


def test_the_topology_is_the_local_default_a_pipeline_worker_and_an_ml_worker() -> None:
    # The same split scripts/up starts unless INFERSTREAM_LOCAL_TOPOLOGY=all-in-one.
    workers = {n: roles_of(n) for n, s in SERVICES.items() if "worker" in s.get("command", [])}
    assert workers == {"pipeline-worker": {"pipeline"}, "ml-worker": {"ml"}}
    up = (ROOT / "scripts" / "up").read_text()
    assert "TOPOLOGY=${INFERSTREAM_LOCAL_TOPOLOGY:-split}" in up


def test_the_pipeline_worker_advertises_its_service_name_and_uses_redpanda() -> None:
    service = SERVICES["pipeline-worker"]
    worker = environment(service)
    assert worker["INFERSTREAM_WEB_HOST"] == "pipeline-worker"
    assert worker["INFERSTREAM_BROKER_URL"] == "kafka://redpanda:9092"
    assert f"{worker['INFERSTREAM_WEB_PORT']}:" in " ".join(service.get("ports", []))
    assert "redpanda" in depends_on(service)


def test_the_ml_worker_checks_its_own_port_and_waits_for_the_model() -> None:
    ml = SERVICES["ml-worker"]
    port = environment(ml)["INFERSTREAM_WEB_PORT"]
    assert f":{port}/readyz" in " ".join(ml["healthcheck"]["test"])
    assert "modelserver" in depends_on(ml)
    assert not ml.get("ports"), "published ports would stop `--scale ml-worker=N`"


def test_the_image_pins_cpu_torch_before_the_project() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    torch = re.search(r"pip install torch==2\.13\.0 --index-url \S+/cpu\b", dockerfile)
    project = re.search(r"pip install '\.\[model\]'", dockerfile)
    assert torch and project and torch.start() < project.start()
    for name, service in SERVICES.items():
        if "build" in service:
            assert service["build"] == ".", f"{name} builds from an unexpected context"
