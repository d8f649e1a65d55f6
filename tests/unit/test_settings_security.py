"""Published default secrets: a worker serving a non-loopback address refuses to start."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from devtools.localbroker import free_port
from inferstream.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
FAUST = Path(sys.executable).with_name("faust")
SECRETS = {"key_secret": "k" * 32, "webhook_secret": "w" * 32}


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "localhost", "::1", "[::1]"])
def test_loopback_keeps_the_default_secrets_working(host: str) -> None:
    assert Settings(web_host=host).insecure_defaults() == []


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.0.0.4", "worker", "gateway.example.com"])
def test_a_public_bind_with_default_secrets_names_each_variable(host: str) -> None:
    problems = Settings(web_host=host).insecure_defaults()
    assert len(problems) == 2
    assert "INFERSTREAM_KEY_SECRET" in problems[0] and repr(host) in problems[0]
    assert "INFERSTREAM_WEBHOOK_SECRET" in problems[1]
    only_webhook = Settings(web_host=host, key_secret=SECRETS["key_secret"]).insecure_defaults()
    assert len(only_webhook) == 1 and "INFERSTREAM_WEBHOOK_SECRET" in only_webhook[0]
    both = Settings(web_host=host, key_secret="k" * 32, webhook_secret="w" * 32)
    assert both.insecure_defaults() == []


def _env(**settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERSTREAM_")}
    # Nothing listens there: a worker that got past the check could not reach anything off loopback.
    env["INFERSTREAM_BROKER_URL"] = f"kafka://127.0.0.1:{free_port()}"
    env["INFERSTREAM_WEB_PORT"] = str(free_port())
    env.update({f"INFERSTREAM_{k.upper()}": v for k, v in settings.items()})
    return env


def _run(args: list[str], env: dict[str, str]) -> tuple[int, str]:
    """Exit status and output of a command run from the checkout."""
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    return done.returncode, done.stdout + done.stderr


def test_worker_with_default_secrets_on_a_public_bind_exits_before_starting() -> None:
    started = time.monotonic()
    code, output = _run([str(FAUST), "-A", "streams", "worker", "-l", "info"], _env(web_host="0.0.0.0"))
    assert code != 0, output
    assert "INFERSTREAM_KEY_SECRET" in output and "INFERSTREAM_WEBHOOK_SECRET" in output, output
    assert "refuses to start" in output, output
    assert "Starting" not in output and "ƒaµS†" not in output  # no banner: nothing was started
    assert time.monotonic() - started < 60


def test_the_app_still_builds_on_loopback_and_with_secrets_set() -> None:
    for env in (_env(web_host="127.0.0.1"), _env(web_host="0.0.0.0", **SECRETS)):
        code, output = _run([sys.executable, "-c", "import streams; streams.app"], env)
        assert code == 0, output


def test_the_bind_checked_is_the_one_given_when_it_differs() -> None:
    assert Settings(web_host="127.0.0.1").insecure_defaults(bind="0.0.0.0") != []
    assert Settings(web_host="0.0.0.0").insecure_defaults(bind="127.0.0.1") == []


def test_worker_web_bind_flag_to_a_public_address_is_refused_before_binding() -> None:
    """``--web-bind`` changes the bind after the app is built: the worker checks it before it starts."""
    port = free_port()
    code, output = _run(
        [str(FAUST), "-A", "streams", "worker", "-l", "info", "--web-bind", "0.0.0.0", "--web-port", str(port)],
        _env(web_host="127.0.0.1", roles="ml"),  # ml: no broker needed to reach the check
    )
    assert code != 0, output
    assert "INFERSTREAM_KEY_SECRET" in output and "'0.0.0.0'" in output, output
    assert "refuses to start" in output, output
