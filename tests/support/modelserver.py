"""Start the reference model server as a real subprocess and wait until it serves.

Typical use::

    port = free_port()
    proc = start_modelserver(port, "--no-embeddings", "--latency-ms", "50")
    try:
        await wait_healthy(f"http://127.0.0.1:{port}", time.monotonic() + 60, proc)
        ...
    finally:
        stop_modelserver(proc)

or ``async with running_modelserver("--no-embeddings") as url: ...``; for unit tests of the wire
format, ``async with in_process_generator() as srv: ... base_url(srv)`` runs it in this process.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp.test_utils import TestServer

from devtools.localbroker import free_port

ROOT = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"
# Where each started server writes its output, so a failed start can show it.
_LOGS: dict[int, Path] = {}


class ModelServerError(RuntimeError):
    """The model server died or did not become healthy in time."""


def start_modelserver(
    port: int, *args: str, host: str = HOST, log_path: Path | None = None
) -> subprocess.Popen[bytes]:
    """Launch ``python -m modelserver --host host --port port *args``; output goes to a log file."""
    if log_path is None:
        fd, name = tempfile.mkstemp(prefix="modelserver-", suffix=".log")
        os.close(fd)
        log_path = Path(name)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "modelserver", "--host", host, "--port", str(port), *args],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    _LOGS[proc.pid] = log_path
    return proc


def server_log(proc: subprocess.Popen[bytes], tail: int = 4000) -> str:
    """The last ``tail`` characters the server wrote."""
    path = _LOGS.get(proc.pid)
    if path is None or not path.exists():
        return ""
    return path.read_text(errors="replace")[-tail:]


async def wait_healthy(
    url: str, deadline: float, proc: subprocess.Popen[bytes] | None = None
) -> dict[str, Any]:
    """Poll ``url/healthz`` until it answers 200; ``deadline`` is a ``time.monotonic()`` value.

    Returns the health body. Raises :class:`ModelServerError` if ``proc`` exits
    first or the deadline passes.
    """
    timeout = aiohttp.ClientTimeout(total=2)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        while True:
            if proc is not None and proc.poll() is not None:
                raise ModelServerError(
                    f"model server exited with {proc.returncode}:\n{server_log(proc)}"
                )
            try:
                async with session.get(f"{url.rstrip('/')}/healthz") as resp:
                    if resp.status == 200:
                        body: dict[str, Any] = await resp.json()
                        return body
            except (TimeoutError, aiohttp.ClientError):
                pass
            if time.monotonic() >= deadline:
                log = server_log(proc) if proc is not None else ""
                raise ModelServerError(f"model server at {url} not healthy in time:\n{log}")
            await asyncio.sleep(0.1)


def stop_modelserver(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> int:
    """SIGTERM, then SIGKILL after ``timeout``; removes the log file. Returns the exit code."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)
    path = _LOGS.pop(proc.pid, None)
    if path is not None:
        path.unlink(missing_ok=True)
    return proc.returncode


@asynccontextmanager
async def running_modelserver(*args: str, startup_timeout: float = 90.0) -> AsyncIterator[str]:
    """A healthy model server on a free port for the block; yields its base URL (no ``/v1``)."""
    port = free_port()
    proc = start_modelserver(port, *args)
    try:
        await wait_healthy(f"http://{HOST}:{port}", time.monotonic() + startup_timeout, proc)
        yield f"http://{HOST}:{port}"
    finally:
        stop_modelserver(proc)


@asynccontextmanager
async def model_faults(
    http: aiohttp.ClientSession, model_base_url: str, **faults: Any
) -> AsyncIterator[None]:
    """Change the shared model server's faults (``POST /admin/faults``) for a block; always put them back."""
    url = model_base_url + "/admin/faults"
    async with http.get(url) as r:
        saved = {k: v for k, v in (await r.json()).items() if k in faults}
    async with http.post(url, json=faults) as r:
        assert r.status == 200, await r.text()
    try:
        yield
    finally:
        async with http.post(url, json={**saved, "fail_next": 0}) as r:
            assert r.status == 200


@asynccontextmanager
async def in_process_generator() -> AsyncIterator[TestServer]:
    """The reference model server in this process (aiohttp's TestServer), without the embedding model."""
    from modelserver.app import build_app
    from modelserver.config import ServerConfig

    srv = TestServer(build_app(ServerConfig(embeddings=False)), host=HOST)
    await srv.start_server()
    try:
        yield srv
    finally:
        await srv.close()


def base_url(srv: TestServer) -> str:
    """Its OpenAI base URL (``.../v1``)."""
    return f"http://{HOST}:{srv.port}/v1"
