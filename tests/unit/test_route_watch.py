"""RouteWatcher over a temporary routes file: reloads that add, retire, change and refuse; polling; SIGHUP."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from inferstream.route_watch import RouteWatcher
from inferstream.routes import RouteTable
from inferstream.settings import Settings
from tests.support.wait import wait_for

GEN = ("generate", "sim-gpt")
EMBED = ("embed", "mini")
EXTRA = ("generate", "sim-gpt-large")


def routes_yaml(*routes: tuple[str, str], concurrency: int = 4) -> str:
    """A routes file with one backend per route; ``concurrency`` lets a test change a route."""
    lines = ["routes:"]
    for task, model in routes:
        lines += [
            f"  - task: {task}",
            f"    model: {model}",
            f"    concurrency: {concurrency}",
            "    backends:",
            "      - {name: local, url: 'http://127.0.0.1:9200/v1', model: sim-gpt}",
        ]
    return "\n".join(lines) + "\n"


class Recorder:
    """A subscriber that keeps every table it is handed."""

    def __init__(self) -> None:
        self.tables: list[RouteTable] = []

    async def __call__(self, table: RouteTable) -> None:
        self.tables.append(table)


class RoutesFile:
    """The temporary routes file; plain writes (a small local file), so the tests' coroutines read simply."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __str__(self) -> str:
        return str(self.path)

    def write(self, text: str) -> None:
        self.path.write_text(text)

    def write_parents(self, text: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.write(text)

    def read(self) -> str:
        return self.path.read_text()


@pytest.fixture
def routes_file(tmp_path: Path) -> RoutesFile:
    file = RoutesFile(tmp_path / "routes.yaml")
    file.write(routes_yaml(GEN, EMBED))
    return file


@pytest.fixture
def settings(routes_file: RoutesFile) -> Settings:
    return Settings(namespace="trwatch", routes_file=str(routes_file), routes_poll_s=0)


@pytest.fixture
def watcher(settings: Settings) -> RouteWatcher:
    return RouteWatcher(settings, environ={})


def test_initial_load(watcher: RouteWatcher, routes_file: RoutesFile) -> None:
    table = watcher.load()
    assert table.keys() == [GEN, EMBED]
    assert table.source == str(routes_file)
    assert watcher.route(*GEN) is not None and watcher.route(*EXTRA) is None
    assert watcher.served_keys == {GEN, EMBED} and watcher.retired == {}
    assert watcher.model_routes == {"generate": ["sim-gpt"], "embed": ["mini"]}
    status = watcher.status()
    assert status["routes"] == ["generate/sim-gpt", "embed/mini"] and status["retired"] == []
    assert status["reloads"] == 0 and status["reload_error"] is None and status["digest"] == table.digest


async def test_reload_adds_retires_and_readds(watcher: RouteWatcher, routes_file: RoutesFile) -> None:
    watcher.load()
    seen = Recorder()
    watcher.subscribe(seen)

    routes_file.write(routes_yaml(GEN, EXTRA))  # embed/mini removed, sim-gpt-large added
    assert await watcher.reload() is True
    assert watcher.route(*EXTRA) is not None
    assert watcher.route(*EMBED) is None  # no longer accepts submissions...
    assert [r.key for r in watcher.served()] == [GEN, EXTRA, EMBED]  # ...but its queue is still served
    assert watcher.served_keys == {GEN, EXTRA, EMBED}
    assert set(watcher.retired) == {EMBED}
    assert watcher.status()["retired"] == ["embed/mini"] and watcher.status()["reloads"] == 1
    assert watcher.model_routes == {"generate": ["sim-gpt", "sim-gpt-large"]}

    routes_file.write(routes_yaml(GEN, EXTRA, EMBED))
    assert await watcher.reload() is True
    assert watcher.retired == {}  # re-added: it accepts submissions again
    assert watcher.route(*EMBED) is not None
    assert [r.key for r in watcher.served()] == [GEN, EXTRA, EMBED]
    assert [t.keys() for t in seen.tables] == [[GEN, EXTRA], [GEN, EXTRA, EMBED]]
    assert seen.tables[-1] is watcher.table


async def test_a_changed_route(watcher: RouteWatcher, routes_file: RoutesFile) -> None:
    before = watcher.load().get(*GEN)
    assert before is not None and before.concurrency == 4
    routes_file.write(routes_yaml(GEN, EMBED, concurrency=9))
    assert await watcher.reload() is True
    after = watcher.route(*GEN)
    assert after is not None and after.concurrency == 9 and after != before
    assert watcher.retired == {}  # changed, not removed


async def test_an_identical_rewrite_is_no_change(watcher: RouteWatcher, routes_file: RoutesFile) -> None:
    table = watcher.load()
    seen = Recorder()
    watcher.subscribe(seen)
    routes_file.write(routes_file.read())
    assert await watcher.reload() is False
    assert watcher.table is table and seen.tables == [] and watcher.reloads == 0


async def test_a_comment_only_change_is_no_change_but_the_digest_follows(
    watcher: RouteWatcher, routes_file: RoutesFile
) -> None:
    table = watcher.load()
    seen = Recorder()
    watcher.subscribe(seen)
    routes_file.write("# reviewed\n" + routes_file.read())
    assert await watcher.reload() is False
    assert seen.tables == [] and watcher.reloads == 0 and watcher.retired == {}
    assert watcher.table.routes == table.routes
    assert watcher.status()["digest"] == watcher.table.digest != table.digest  # /readyz names the file now loaded


async def test_a_broken_file_is_refused_and_the_next_good_one_clears_the_error(
    watcher: RouteWatcher, routes_file: RoutesFile
) -> None:
    table = watcher.load()
    seen = Recorder()
    watcher.subscribe(seen)
    broken = routes_yaml(GEN, EMBED).replace("concurrency: 4", "concurrency: lots", 1)
    line = next(i for i, text in enumerate(broken.splitlines(), start=1) if "lots" in text)
    routes_file.write(broken)

    assert await watcher.reload() is False
    assert watcher.table is table and seen.tables == []
    error = watcher.status()["reload_error"]
    assert error is not None and error["at"] is not None
    assert f"{routes_file}:{line}:" in error["message"] and "concurrency" in error["message"]

    routes_file.write("routes: [\n")  # a syntax error is refused the same way
    assert await watcher.reload() is False
    assert str(routes_file) in watcher.status()["reload_error"]["message"]

    routes_file.write(routes_yaml(GEN, EMBED, EXTRA))
    assert await watcher.reload() is True
    assert watcher.status()["reload_error"] is None and watcher.error is None
    assert [t.keys() for t in seen.tables] == [[GEN, EMBED, EXTRA]]


async def test_the_good_file_back_after_a_refusal_clears_the_error_without_a_change(
    watcher: RouteWatcher, routes_file: RoutesFile
) -> None:
    good = routes_file.read()
    watcher.load()
    routes_file.write("routes: [\n")
    assert await watcher.reload() is False and watcher.error is not None
    routes_file.write(good)
    assert await watcher.reload() is False  # the same routes as before: nothing to change...
    assert watcher.status()["reload_error"] is None  # ...but the refusal is over


async def test_subscribers_run_once_per_change_with_the_new_table(watcher: RouteWatcher, routes_file: RoutesFile) -> None:
    watcher.load()
    first, second = Recorder(), Recorder()
    watcher.subscribe(first)
    watcher.subscribe(second)
    for routes in [(GEN,), (GEN,), (GEN, EXTRA)]:
        routes_file.write(routes_yaml(*routes))
        await watcher.reload()
    assert [t.keys() for t in first.tables] == [[GEN], [GEN, EXTRA]]
    assert second.tables == first.tables


async def test_a_vanished_file_is_refused_and_its_return_clears_the_error(
    watcher: RouteWatcher, routes_file: RoutesFile
) -> None:
    table = watcher.load()
    good = routes_file.read()
    routes_file.path.unlink()
    assert await watcher.reload() is False
    assert watcher.table is table and "cannot read the file" in (watcher.error or "")
    routes_file.write(good)
    assert await watcher.reload() is False and watcher.error is None


@pytest.fixture
async def started() -> AsyncIterator[Any]:
    running: list[RouteWatcher] = []

    async def start(watcher: RouteWatcher) -> RouteWatcher:
        await watcher.start()
        running.append(watcher)
        return watcher

    yield start
    for watcher in running:
        await watcher.stop()


async def test_polling_picks_up_a_changed_file(settings: Settings, routes_file: RoutesFile, started: Any) -> None:
    watcher = await started(RouteWatcher(replace(settings, routes_poll_s=0.05), environ={}))
    assert watcher.table.keys() == [GEN, EMBED]
    seen = Recorder()
    watcher.subscribe(seen)
    routes_file.write(routes_yaml(GEN, EMBED, EXTRA))
    await wait_for(lambda: watcher.reloads == 1, timeout=5, what="the poll to reload the file")
    assert watcher.route(*EXTRA) is not None and [t.keys() for t in seen.tables] == [[GEN, EMBED, EXTRA]]


async def test_polling_follows_a_configmap_style_symlink_swap(tmp_path: Path, started: Any) -> None:
    # Kubernetes updates a mounted ConfigMap by pointing `..data` at a new directory: the file's own
    # path never changes, only what it resolves to.
    for version, routes in (("v1", (GEN,)), ("v2", (GEN, EXTRA))):
        RoutesFile(tmp_path / version / "routes.yaml").write_parents(routes_yaml(*routes))
    (tmp_path / "..data").symlink_to("v1")
    (tmp_path / "routes.yaml").symlink_to("..data/routes.yaml")
    settings = Settings(namespace="trwatch", routes_file=str(tmp_path / "routes.yaml"), routes_poll_s=0.05)
    watcher = await started(RouteWatcher(settings, environ={}))
    assert watcher.table.keys() == [GEN]
    (tmp_path / "..data_tmp").symlink_to("v2")
    os.replace(tmp_path / "..data_tmp", tmp_path / "..data")  # atomic, as the kubelet does it
    await wait_for(lambda: watcher.reloads == 1, timeout=5, what="the poll to follow the swap")
    assert watcher.table.keys() == [GEN, EXTRA]


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="SIGHUP needs the main thread")
async def test_sighup_reloads(settings: Settings, routes_file: RoutesFile) -> None:
    watcher = RouteWatcher(settings, environ={})  # routes_poll_s=0: only the signal reloads
    await watcher.start()
    try:
        # Without the handler SIGHUP would end the test run: make sure it is installed before sending it.
        assert signal.getsignal(signal.SIGHUP) not in (signal.SIG_DFL, signal.SIG_IGN, None)
        routes_file.write(routes_yaml(GEN))
        os.kill(os.getpid(), signal.SIGHUP)
        await wait_for(lambda: watcher.reloads == 1, timeout=5, what="SIGHUP to reload the file")
        assert watcher.table.keys() == [GEN] and set(watcher.retired) == {EMBED}
    finally:
        await watcher.stop()
    assert signal.getsignal(signal.SIGHUP) == signal.SIG_DFL  # stopping gives SIGHUP back


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="SIGHUP needs the main thread")
async def test_without_a_routes_file_the_shorthand_serves_and_sighup_only_logs(
    started: Any, caplog: pytest.LogCaptureFixture
) -> None:
    shorthand = Settings(namespace="trwatch", models="generate:sim-gpt,embed:mini", routes_poll_s=0.05)
    watcher = await started(RouteWatcher(shorthand, environ={}))
    assert watcher.table.source == "INFERSTREAM_MODELS" and watcher.table.keys() == [GEN, EMBED]
    assert await watcher.reload() is False and watcher.reloads == 0
    # SIGHUP must not end a worker that has no file: the handler is there and says why nothing happens.
    assert signal.getsignal(signal.SIGHUP) not in (signal.SIG_DFL, signal.SIG_IGN, None)
    caplog.set_level("INFO", logger="inferstream.route_watch")
    os.kill(os.getpid(), signal.SIGHUP)
    await wait_for(
        lambda: any("SIGHUP: no routes file" in r.getMessage() for r in caplog.records), timeout=5, what="the log"
    )
    assert watcher.reloads == 0 and watcher.table.source == "INFERSTREAM_MODELS"
