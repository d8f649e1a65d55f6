"""Runs real Inferstream workers as processes against the test broker and services.

One :class:`Pipeline` is one namespace: its own topics, consumer group,
RabbitMQ queues, Redis keys and PostgreSQL schema, removed by ``cleanup()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import redis.asyncio as aioredis
import redis.exceptions as redis_errors

from bridges.clients.rabbitmq import RabbitClient
from bridges.clients.store import Store
from inferstream.settings import Settings
from schemas.migrate import migrate
from tests.support.modelserver import free_port
from tests.support.wait import wait_for

ROOT = Path(__file__).resolve().parents[2]
LOG_DIR = Path(os.environ.get("INFERSTREAM_TEST_LOG_DIR", "/tmp/inferstream-test-logs"))


class WorkerProcess:
    """``faust -A streams worker`` in a subprocess, logging to a file."""

    def __init__(self, env: dict[str, str], port: int, name: str, log_level: str = "info") -> None:
        self.env = env
        self.port = port
        self.log_level = log_level
        self.url = f"http://127.0.0.1:{port}"
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        self.log_path = LOG_DIR / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "faust", "-A", "streams", "worker", "-l", self.log_level],
            cwd=ROOT,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()

    async def wait_ready(self, timeout: float = 60.0) -> None:
        async with aiohttp.ClientSession() as http:

            async def ready() -> bool:
                if self.proc is not None and self.proc.poll() is not None:
                    raise AssertionError(
                        f"worker exited with {self.proc.returncode}:\n{self.log_tail()}"
                    )
                try:
                    async with http.get(
                        self.url + "/readyz", timeout=aiohttp.ClientTimeout(total=1)
                    ) as r:
                        return r.status == 200
                except (TimeoutError, aiohttp.ClientError):
                    return False

            try:
                await wait_for(
                    ready, timeout=timeout, interval=0.2, what=f"worker {self.url} ready"
                )
            except AssertionError as exc:
                raise AssertionError(f"{exc}\n{self.log_tail()}") from None

    async def metric(self, http: aiohttp.ClientSession, name: str) -> float:
        """The value of an unlabelled Prometheus sample on this worker's ``/metrics`` (0 when absent)."""
        async with http.get(self.url + "/metrics") as r:
            text = await r.text()
        found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
        return float(found.group(1)) if found else 0.0

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=60)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"


class Pipeline:
    """A namespace of the pipeline with its workers; build with :meth:`create`."""

    def __init__(self, broker_url: str, model_url: str, **overrides: str) -> None:
        self.namespace = "t" + uuid.uuid4().hex[:10]
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("INFERSTREAM_")},
            "INFERSTREAM_BROKER_URL": broker_url,
            "INFERSTREAM_MODEL_URL": model_url,
            "INFERSTREAM_NAMESPACE": self.namespace,
            "INFERSTREAM_SESSION_TIMEOUT_S": "6",
            "INFERSTREAM_FETCH_MAX_WAIT_MS": "20",
            "INFERSTREAM_PARTITIONS": "4",
            "INFERSTREAM_KEY_REFRESH_S": "1",
            "INFERSTREAM_ML_RETRY_BASE_S": "0.05",
            "INFERSTREAM_ML_BREAKER_RESET_S": "1",
            "INFERSTREAM_WEBHOOK_ALLOW": "127.0.0.0/8,::1,localhost",  # test receivers are local
            "PYTHONUNBUFFERED": "1",
            **{f"INFERSTREAM_{k.upper()}": v for k, v in overrides.items()},
        }
        self.settings = Settings.from_env(self.env)
        self.store = Store(self.settings)
        self.workers: list[WorkerProcess] = []
        # Work queues beyond INFERSTREAM_MODELS' (a routes file's routes) that cleanup must delete.
        self.extra_routes: set[tuple[str, str]] = set()

    @classmethod
    async def create(cls, broker_url: str, model_url: str, **overrides: str) -> Pipeline:
        pipeline = cls(broker_url, model_url, **overrides)
        await migrate(pipeline.settings.postgres_dsn, pipeline.settings.db_schema)
        return pipeline

    @classmethod
    @contextlib.asynccontextmanager
    async def session(cls, broker_url: str, model_url: str, **overrides: str) -> AsyncIterator[Pipeline]:
        """A pipeline for the block, cleaned up after it (the usual module fixture)."""
        pipeline = await cls.create(broker_url, model_url, **overrides)
        try:
            yield pipeline
        finally:
            await pipeline.cleanup()

    async def start_worker(
        self, *, wait: bool = True, log_level: str = "info", **overrides: str
    ) -> WorkerProcess:
        port = int(overrides.pop("web_port", 0)) or free_port()
        env = {
            **self.env,
            "INFERSTREAM_WEB_PORT": str(port),
            **{f"INFERSTREAM_{k.upper()}": v for k, v in overrides.items()},
        }
        worker = WorkerProcess(env, port, f"{self.namespace}-{port}", log_level)
        worker.start()
        self.workers.append(worker)
        if wait:
            await worker.wait_ready()
        return worker

    async def cli(self, *args: str, timeout: float = 120.0) -> tuple[int, str]:
        """Run ``faust -A streams ARGS`` as an operator would, in this namespace: exit code and output."""
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "faust", "-A", "streams", *args,
            cwd=ROOT, env=self.env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
        assert proc.returncode is not None
        return proc.returncode, out.decode(errors="replace")

    async def create_key(self, user_id: str, plan: str = "default") -> str:
        return await self.store.keys.create_key(user_id, plan)

    async def set_plan(
        self,
        name: str,
        *,
        requests_per_day: int,
        tokens_per_day: int,
        requests_per_minute: int = 100_000,
        max_priority: str = "high",
    ) -> None:
        await self.store.keys.set_plan(
            name, requests_per_day, tokens_per_day, requests_per_minute, max_priority
        )

    async def cleanup(self) -> None:
        for worker in self.workers:
            worker.stop()
        rabbit = RabbitClient(self.settings)
        try:
            await rabbit.delete_namespace(self.extra_routes)
        finally:
            await rabbit.close()
        pool = await self.store.connect()
        await pool.execute(f'DROP SCHEMA IF EXISTS "{self.settings.db_schema}" CASCADE')
        await self.store.close()
        redis = aioredis.Redis.from_url(self.settings.redis_url)
        try:
            keys = [k async for k in redis.scan_iter(match=f"{self.namespace}:*", count=1000)]
            for i in range(0, len(keys), 1000):
                await redis.delete(*keys[i : i + 1000])
        except redis_errors.ConnectionError:
            pass  # a fault test's private Redis, already gone: nothing left to delete
        finally:
            await redis.aclose()


class Api:
    """A small client of the public HTTP contract."""

    def __init__(self, http: aiohttp.ClientSession, base_url: str, key: str | None) -> None:
        self.http = http
        self.base_url = base_url
        self.key = key

    def headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        h = {"Authorization": f"Bearer {self.key}"} if self.key else {}
        return {**h, **(extra or {})}

    async def call(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        data: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any, dict[str, str]]:
        async with self.http.request(
            method, self.base_url + path, json=json, data=data, headers=self.headers(headers)
        ) as r:
            body = await r.json(content_type=None) if r.content_length != 0 else None
            return r.status, body, dict(r.headers)

    async def wait_key_active(self, timeout: float = 10.0) -> Api:
        """New keys reach every worker's key cache within INFERSTREAM_KEY_REFRESH_S."""

        last: list[Any] = []

        async def accepted() -> bool:
            status, body, _ = await self.call("GET", "/v1/quota")
            last[:] = [status, body]
            return status == 200

        try:
            await wait_for(accepted, timeout=timeout, interval=0.1, what="the new API key to be accepted")
        except AssertionError as exc:
            raise AssertionError(f"{exc}: last answer {last}") from None
        return self

    async def submit(self, body: dict[str, Any], **kw: Any) -> tuple[int, Any, dict[str, str]]:
        return await self.call("POST", "/v1/requests", json=body, **kw)

    async def get(self, request_id: str) -> tuple[int, Any, dict[str, str]]:
        return await self.call("GET", f"/v1/requests/{request_id}")

    async def wait_status(
        self, request_id: str, statuses: set[str], timeout: float = 30.0
    ) -> dict[str, Any]:
        async def check() -> dict[str, Any] | None:
            status, body, _ = await self.get(request_id)
            return body if status == 200 and body["status"] in statuses else None

        result: dict[str, Any] = await wait_for(
            check, timeout=timeout, interval=0.05, what=f"{request_id} in {statuses}"
        )
        return result
