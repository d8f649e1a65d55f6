"""The client library and the ``inferstream`` CLI against a real worker: submit --wait, events resumed after
a cut connection, heartbeats, cancel, quota, models, and the error bodies as typed errors."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from inferstream import client as c
from inferstream.ids import new_request_id
from tests.support.modelserver import model_faults
from tests.support.pipeline import Pipeline, WorkerProcess
from tests.support.wait import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="session")]

CLI = Path(sys.executable).with_name("inferstream")
HEARTBEAT_S = 0.5


class Proxy:
    """A loopback TCP proxy in front of a worker: records the ``Last-Event-ID`` of each event stream
    it carries, and cuts the next ``cuts`` of them right after their first event."""

    def __init__(self, upstream: int, cuts: int = 0) -> None:
        self.upstream = upstream
        self.cuts = cuts
        self.streams: list[str | None] = []
        self.url = ""
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> Proxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream)
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        cut = False
        if "/events" in lines[0]:
            found = [
                ln.split(":", 1)[1].strip()
                for ln in lines
                if ln.lower().startswith("last-event-id:")
            ]
            self.streams.append(found[0] if found else None)
            cut, self.cuts = self.cuts > 0, max(0, self.cuts - 1)
        up_writer.write(head)

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, watch: bool) -> None:
            tail = b""
            while chunk := await src.read(65_536):
                dst.write(chunk)
                await dst.drain()
                if watch and b"\n\n" in tail + chunk:  # the first whole event has gone through
                    # A FIN, not a reset: the client reads what was sent, then finds the body cut short.
                    writer.close()
                    up_writer.transport.abort()
                    return
                tail = chunk[-1:]
            dst.close()

        try:
            await asyncio.gather(pump(reader, up_writer, False), pump(up_reader, writer, cut))
        except (ConnectionError, OSError):
            pass  # one side went away: the other is closed below
        finally:
            writer.close()
            up_writer.close()


@pytest.fixture(scope="module")
async def pipeline(broker_url: str, model_base_url: str) -> AsyncIterator[Pipeline]:
    async with Pipeline.session(
        broker_url, model_base_url + "/v1", sse_heartbeat_s=str(HEARTBEAT_S)
    ) as p:
        yield p


@pytest.fixture(scope="module")
async def worker(pipeline: Pipeline) -> WorkerProcess:
    return await pipeline.start_worker()


async def active_key(
    pipeline: Pipeline, worker: WorkerProcess, user: str, plan: str = "default"
) -> str:
    key = await pipeline.create_key(user, plan)

    async def accepted() -> bool:
        async with c.AsyncClient(worker.url, key) as probe:
            try:
                await probe.quota()
            except (c.AuthenticationError, c.Unavailable):
                return False
        return True

    await wait_for(accepted, timeout=15, interval=0.1, what=f"the key of {user}")
    return key


@pytest.fixture(scope="module")
async def key(pipeline: Pipeline, worker: WorkerProcess) -> str:
    return await active_key(pipeline, worker, "carol")


@pytest.fixture
async def client(worker: WorkerProcess, key: str) -> AsyncIterator[c.AsyncClient]:
    async with c.AsyncClient(worker.url, key) as cl:
        yield cl


async def inferstream(worker: WorkerProcess, key: str, *args: str) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERSTREAM_")}
    env.update({c.BASE_URL_ENV: worker.url, c.API_KEY_ENV: key})
    proc = await asyncio.create_subprocess_exec(
        CLI, *args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 90)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_cli_submit_wait_events_get_quota(worker: WorkerProcess, key: str) -> None:
    code, out, err = await inferstream(
        worker, key, "submit", "--task", "generate", "--input", "hello from the cli",
        "--max-tokens", "8", "--wait", "--wait-timeout", "60",
    )  # fmt: skip
    assert code == 0, err
    doc = orjson.loads(out)
    assert (
        doc["status"] == "completed" and doc["result"]["text"] and doc["usage"]["total_tokens"] > 0
    )
    code, out, err = await inferstream(worker, key, "events", doc["request_id"])
    assert code == 0, err
    [event] = [
        orjson.loads(line) for line in out.splitlines()
    ]  # a new stream starts at the current state
    assert (
        event["id"] == 4
        and event["event"] == "completed"
        and event["data"]["result"] == doc["result"]
    )
    code, out, _ = await inferstream(worker, key, "get", doc["request_id"])
    assert code == 0 and orjson.loads(out)["request_id"] == doc["request_id"]
    code, out, _ = await inferstream(worker, key, "quota")
    assert code == 0 and orjson.loads(out)["user_id"] == "carol"
    code, _, err = await inferstream(worker, key, "get", new_request_id())
    assert code == 1 and "404 not_found" in err


async def test_events_resume_after_a_cut_connection(
    worker: WorkerProcess, key: str, http: aiohttp.ClientSession, model_base_url: str
) -> None:
    async with (
        model_faults(http, model_base_url, latency_ms=1500),
        Proxy(worker.port, cuts=1) as proxy,
    ):
        # One connection per request, so the proxy sees every stream's head.
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))
        async with (
            session,
            c.AsyncClient(proxy.url, key, session=session, reconnect_delay=0.05) as cl,
        ):
            accepted = await cl.submit("generate", "cut me off", params={"max_tokens": 8})
            events = [event async for event in cl.events(accepted.request_id)]
    ids = [e.id for e in events]
    assert ids == sorted(set(ids)) and ids[-1] == 4, ids  # increasing, nothing twice
    assert events[-1].event == "completed" and events[-1].data.result is not None
    assert len(proxy.streams) == 2 and proxy.streams[0] is None
    assert proxy.streams[1] == str(ids[0])  # resumed after the event the cut connection carried
    assert not any(e.snapshot for e in events)  # the history served the resume


async def test_heartbeats_hold_a_stream_longer_than_the_read_timeout(
    worker: WorkerProcess, key: str, http: aiohttp.ClientSession, model_base_url: str
) -> None:
    async with model_faults(http, model_base_url, latency_ms=4000), Proxy(worker.port) as proxy:
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))
        async with (
            session,
            c.AsyncClient(proxy.url, key, session=session, read_timeout=4 * HEARTBEAT_S) as cl,
        ):
            accepted = await cl.submit("generate", "slow and steady", params={"max_tokens": 8})
            done = await cl.wait(accepted.request_id, timeout=60)
    assert done.status == "completed"
    assert proxy.streams == [
        None
    ]  # 2.5 s of model work, read timeout 2 s: one connection throughout


async def test_cancel_then_conflict(
    client: c.AsyncClient, http: aiohttp.ClientSession, model_base_url: str
) -> None:
    async with model_faults(http, model_base_url, latency_ms=20_000):
        accepted = await client.submit("generate", "cancel me", params={"max_tokens": 8})

        async def running() -> bool:
            return (await client.get(accepted.request_id)).status == "running"

        await wait_for(running, timeout=30, what="the model call to start")
        cancelled = await client.cancel(accepted.request_id)
        assert cancelled.cancel_requested and cancelled.request_id == accepted.request_id
        final = await client.wait(accepted.request_id, timeout=15)  # well inside the model's 20 s
    assert final.status == "cancelled" and final.usage is None
    with pytest.raises(c.Conflict) as conflict:
        await client.cancel(accepted.request_id)
    assert conflict.value.current_status == "cancelled"


async def test_errors_arrive_typed(
    pipeline: Pipeline, worker: WorkerProcess, client: c.AsyncClient
) -> None:
    with pytest.raises(c.BadRequest) as blank:
        await client.submit("generate", "   ")
    assert blank.value.field == "input"
    with pytest.raises(c.BadRequest) as tokens:
        await client.submit("generate", "x", params={"max_tokens": 0})
    assert tokens.value.field == "params.max_tokens"
    with pytest.raises(c.NotFound):
        await client.get(new_request_id())
    with pytest.raises(c.NotFound):
        await client.cancel(new_request_id())
    async with c.AsyncClient(worker.url, "not-a-key") as stranger:
        with pytest.raises(c.AuthenticationError):
            await stranger.models()

    await pipeline.set_plan("tiny", requests_per_day=2, tokens_per_day=100_000)
    async with c.AsyncClient(worker.url, await active_key(pipeline, worker, "dan", "tiny")) as dan:
        for _ in range(2):
            await dan.submit("embed", "counted")
        with pytest.raises(c.RequestQuotaExceeded) as refused:
            await dan.submit("embed", "one too many")
        quota = await dan.quota()
    err = refused.value
    assert err.status == 429 and err.retry_after is not None and err.retry_after > 0
    assert err.requests is not None and (err.requests.used, err.requests.limit) == (2, 2)
    assert err.rate_limits is not None and err.rate_limits.remaining_requests == 0
    assert quota.plan == "tiny" and quota.requests.used == 2 and quota.requests.remaining == 0


async def test_models_quota_and_the_blocking_client(
    worker: WorkerProcess, key: str, client: c.AsyncClient
) -> None:
    models = await client.models()
    defaults = {m.task: m.id for m in models.data if m.default}
    assert defaults == {"generate": "sim-gpt", "embed": "all-MiniLM-L6-v2"}
    before = (await client.quota()).requests.used

    def blocking() -> Any:
        with c.Client(worker.url, key) as cl:
            accepted = cl.submit("embed", ["one", "two"])
            return cl.wait(accepted.request_id, timeout=60), [
                e.id for e in cl.events(accepted.request_id)
            ]

    done, ids = await asyncio.to_thread(blocking)
    assert done.status == "completed" and done.result is not None
    assert len(done.result.embeddings or []) == 2 and len(done.result.embeddings[0]) == 384
    assert ids == [4]
    assert (await client.quota()).requests.used == before + 1
    page = await client.list_requests(status="completed", limit=1)
    assert [d.request_id for d in page.data] == [done.request_id]  # newest first


async def test_a_stream_token_opens_one_requests_stream_without_the_key(
    worker: WorkerProcess, client: c.AsyncClient
) -> None:
    first = await client.submit("embed", "token one")
    second = await client.submit("embed", "token two")
    minted = await client.stream_token(first.request_id)
    assert minted.events_url == f"/v1/requests/{first.request_id}/events?token={minted.token}"
    async with c.AsyncClient(worker.url, None) as browser_like:
        done = [e async for e in browser_like.events(first.request_id, token=minted.token)]
        assert done[-1].event == "completed"
        with pytest.raises(c.AuthenticationError):
            async for _ in browser_like.events(second.request_id, token=minted.token):
                pass
