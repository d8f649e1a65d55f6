"""The client and CLI against an in-process server that answers with the gateway's own code.

The fake API (a thread with its own loop) builds its bodies with the server's functions:
``error_response`` over the error tree, ``tables.quota.decide`` for 429s, ``request_doc`` for
documents, ``format_event`` and ``KEEP_ALIVE`` for the event stream. Each events connection
follows a script (drop after N events, heartbeats, silence, 503, snapshot), and the fake
records the ``Last-Event-ID`` each connection sent.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import msgspec
import orjson
import pytest
from aiohttp import web
from click.testing import CliRunner

import schemas.documents as server
from inferstream import client as c
from inferstream.client.cli import main
from inferstream.client.sse import SseParser
from inferstream.errors import (
    Conflict,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    PublicError,
    QuotaExceeded,
    Unauthorized,
    Unavailable,
)
from inferstream.ids import is_request_id, new_request_id
from inferstream.routes import routes_from_settings
from inferstream.settings import Settings
from schemas.documents import event_id, request_doc
from schemas.plans import Plan
from streams.gateway.http import api_key, error_response
from streams.gateway.sse import KEEP_ALIVE, format_event, parse_last_event_id
from tables.quota import admission_of, current, decide, quota_doc

PLAN = Plan("test", requests_per_day=100, tokens_per_day=1_000, requests_per_minute=5)
BIG = "big " * 2_000  # more tokens than the plan allows


@dataclass
class Play:
    """How one events connection behaves."""

    send: int | None = None  # events to send, then cut the connection (None: all, then end)
    beats: int = 0  # heartbeat comments before the first event, beat_s apart
    beat_s: float = 0.05
    silence_s: float = 0.0  # say nothing this long first (the client's read timeout fires)
    unavailable: bool = False  # answer 503 with Retry-After instead
    snapshot: bool = False  # answer with the current state marked as a snapshot
    end_early: bool = False  # end the stream cleanly without its terminal event
    retry_ms: int | None = None


@dataclass
class Fake:
    url: str = ""
    states: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    scripts: dict[str, list[Play]] = field(default_factory=dict)
    seen_ids: dict[str, list[str | None]] = field(default_factory=dict)
    quota: dict[str, Any] = field(default_factory=dict)
    idempotent: dict[tuple[str, str], web.Response] = field(default_factory=dict)
    now: float = field(default_factory=lambda: time.time() // 60 * 60 + 1)  # early in a minute

    def add(self, statuses: list[str], *scripts: Play, **extra: Any) -> str:
        rid = new_request_id()
        self.states[rid] = [doc_of(rid, s, **extra) for s in statuses]
        self.scripts[rid] = list(scripts)
        self.seen_ids[rid] = []
        return rid

    def user(self, request: web.Request) -> str:
        key = api_key(request)
        if key is None or not key.startswith("key-"):
            raise Unauthorized("missing or unknown API key")
        return key

    def states_of(self, request_id: str) -> list[dict[str, Any]]:
        if not is_request_id(request_id) or request_id not in self.states:
            raise NotFound(f"no request {request_id!r}")
        return self.states[request_id]

    async def submit(self, request: web.Request) -> web.StreamResponse:
        user = self.user(request)
        body = await request.read()
        if len(body) > 64_000:
            raise PayloadTooLarge("body is larger than 64000 bytes", limit=64_000)
        sub = orjson.loads(body)
        if sub.get("task") not in ("generate", "embed"):
            raise InvalidRequest("'task' must be one of ['generate', 'embed']", field="task")
        if sub.get("input") == "busy":
            raise Unavailable("the request log is unavailable", retry_after=2)
        idem = (user, request.headers.get("Idempotency-Key", ""))
        if idem[1] and idem in self.idempotent:
            first = self.idempotent[idem]
            return web.Response(
                body=first.body,
                status=202,
                headers={**first.headers, "Idempotent-Replayed": "true"},
            )
        rid = new_request_id()
        estimated = len(str(sub["input"]).split()) + 5
        try:
            self.quota[user], admission = decide(
                self.quota.get(user), PLAN, rid, estimated, self.now
            )
        except QuotaExceeded as exc:
            limits = admission_of(current(self.quota.get(user), self.now), PLAN, self.now).headers()
            return error_response(exc, headers=limits)  # as admission's Refused answers
        self.states[rid] = [
            doc_of(rid, s, input=sub["input"]) for s in ("queued", "dispatched", "completed")
        ]
        self.scripts[rid], self.seen_ids[rid] = [], []
        accepted = server.Accepted(
            request_id=rid,
            status="queued",
            estimated_tokens=estimated,
            created_at=server.iso_ts(self.now) or "",
            links=server.Links(self_=f"/v1/requests/{rid}", events=f"/v1/requests/{rid}/events"),
        )
        answer = web.Response(
            body=msgspec.json.encode(accepted),
            status=202,
            headers={**admission.headers(), "Location": f"/v1/requests/{rid}"},
            content_type="application/json",
        )
        if idem[1]:
            self.idempotent[idem] = answer
        return answer

    async def list_mine(self, request: web.Request) -> web.StreamResponse:
        self.user(request)
        limit = int(request.query.get("limit", "20"))
        docs = sorted(
            (s[-1] for s in self.states.values()), key=lambda d: d["request_id"], reverse=True
        )
        if "status" in request.query:
            docs = [d for d in docs if d["status"] == request.query["status"]]
        if "after" in request.query:
            docs = [d for d in docs if d["request_id"] < request.query["after"]]
        page = docs[:limit]
        more = len(docs) > limit
        return web.json_response(
            {"data": page, "has_more": more, "next_after": page[-1]["request_id"] if more else None}
        )

    async def get_one(self, request: web.Request) -> web.StreamResponse:
        self.user(request)
        return web.json_response(self.states_of(request.match_info["rid"])[-1])

    async def cancel(self, request: web.Request) -> web.StreamResponse:
        self.user(request)
        doc = self.states_of(request.match_info["rid"])[-1]
        if doc["status"] in c.TERMINAL:
            raise Conflict(f"request already {doc['status']}", status=doc["status"])
        return web.json_response({**doc, "cancel_requested": True}, status=202)

    async def quota_doc(self, request: web.Request) -> web.StreamResponse:
        user = self.user(request)
        return web.json_response(quota_doc(user, PLAN, self.quota.get(user), self.now))

    async def models(self, request: web.Request) -> web.StreamResponse:
        self.user(request)
        table = routes_from_settings(Settings.from_env({}))
        return web.json_response(
            {"object": "list", "data": [{**r.public(), "created": 1} for r in table]}
        )

    async def events_token(self, request: web.Request) -> web.StreamResponse:
        self.user(request)
        rid = request.match_info["rid"]
        self.states_of(rid)
        token = server.StreamToken(
            f"tok-{rid}", self.now + 300, 300.0, f"/v1/requests/{rid}/events?token=tok-{rid}"
        )
        return web.Response(
            body=msgspec.json.encode(token), status=201, content_type="application/json"
        )

    async def events(self, request: web.Request) -> web.StreamResponse:
        rid = request.match_info["rid"]
        token = request.query.get("token")
        if token is None:
            self.user(request)
        elif token != f"tok-{rid}":
            raise Unauthorized("the stream token is malformed, expired or for another request")
        states = self.states_of(rid)
        self.seen_ids[rid].append(request.headers.get("Last-Event-ID"))
        play = self.scripts[rid].pop(0) if self.scripts[rid] else Play()
        if play.unavailable:
            raise Unavailable(
                "partitions are moving", retry_after=0.2
            )  # answered as Retry-After: 1
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        try:
            if play.retry_ms is not None:
                await resp.write(b"retry: %d\n\n" % play.retry_ms)
            await asyncio.sleep(play.silence_s)
            for _ in range(play.beats):
                await resp.write(KEEP_ALIVE)
                await asyncio.sleep(play.beat_s)
            last = parse_last_event_id(request.headers.get("Last-Event-ID"))
            if play.snapshot or last is None:
                await resp.write(format_event({**states[-1], "replayed": "snapshot"}))
                return resp
            todo = [d for d in states if event_id(d["status"]) > last]
            for n, doc in enumerate(todo):
                if play.send is not None and n == play.send:
                    assert request.transport is not None
                    request.transport.close()  # cut mid-stream: no end of the chunked body
                    return resp
                if play.end_early and n == len(todo) - 1:
                    break
                await resp.write(format_event(doc))
            await resp.write_eof()
        except ConnectionResetError:
            pass  # the client gave up on this connection: its next one is what the test checks
        return resp

    def app(self) -> web.Application:
        @web.middleware
        async def errors(request: web.Request, handler: Any) -> web.StreamResponse:
            try:
                return await handler(request)  # type: ignore[no-any-return]
            except PublicError as exc:
                return error_response(exc)

        app = web.Application(middlewares=[errors])
        app.router.add_post("/v1/requests", self.submit)
        app.router.add_get("/v1/requests", self.list_mine)
        app.router.add_get("/v1/requests/{rid}", self.get_one)
        app.router.add_delete("/v1/requests/{rid}", self.cancel)
        app.router.add_get("/v1/requests/{rid}/events", self.events)
        app.router.add_post("/v1/requests/{rid}/events/token", self.events_token)
        app.router.add_get("/v1/quota", self.quota_doc)
        app.router.add_get("/v1/models", self.models)
        return app


def doc_of(rid: str, status: str, *, input: Any = "hello", huge: int = 0) -> dict[str, Any]:
    t0 = time.time()
    row: dict[str, Any] = {
        "request_id": rid, "status": status, "task": "generate", "model": "sim-gpt",
        "priority": "normal", "created_at": t0, "updated_at": t0 + 1, "estimated_tokens": 7,
        "attempts": 1 if status in c.TERMINAL else 0, "backend": "primary",
    }  # fmt: skip
    if status == "completed":
        row.update(completed_at=t0 + 1, result={"text": f"echo: {input}" + "x" * huge},
                   usage={"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5})  # fmt: skip
    if status == "failed":
        row.update(completed_at=t0 + 1, error={"type": "model_http_503", "message": "down", "reason": "budget",
                   "attempts": 3, "elapsed_s": 1.5, "history": [{"attempt": 1, "error": "model_http_503"}]})  # fmt: skip
    return request_doc(row)


@pytest.fixture(scope="module")
def fake() -> Iterator[Fake]:
    api = Fake()
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(api.app())
    started = threading.Event()

    def serve() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0)
        loop.run_until_complete(site.start())
        host, port = runner.addresses[0][:2]
        api.url = f"http://{host}:{port}"
        started.set()
        loop.run_forever()
        loop.run_until_complete(runner.cleanup())

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert started.wait(10)
    yield api
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


@pytest.fixture
async def client(fake: Fake) -> AsyncIterator[c.AsyncClient]:
    async with c.AsyncClient(fake.url, "key-alice", reconnect_delay=0.01, read_timeout=0.3) as cl:
        yield cl


async def collect(client: c.AsyncClient, rid: str, **kw: Any) -> list[c.Event]:
    return [event async for event in client.events(rid, **kw)]


# ---- answers and errors ---------------------------------------------------------------


async def test_submit_get_cancel_quota_models_are_typed(client: c.AsyncClient, fake: Fake) -> None:
    accepted = await client.submit(
        "generate", "hi there", params={"max_tokens": 8}, priority="high"
    )
    assert accepted.status == "queued" and accepted.created_at.tzinfo is not None
    assert accepted.links.events == f"/v1/requests/{accepted.request_id}/events"
    assert (
        accepted.rate_limits is not None
        and accepted.rate_limits.limit_tokens == PLAN.tokens_per_day
    )
    assert not accepted.replayed
    doc = await client.get(accepted.request_id)
    assert isinstance(doc, c.RequestDoc) and doc.status == "completed" and doc.terminal
    assert doc.result is not None and doc.result.text == "echo: hi there"
    assert doc.usage == c.Usage(2, 3, 5) and doc.backend == "primary"
    queued = fake.add(["queued"])
    cancelled = await client.cancel(queued)
    assert cancelled.cancel_requested and cancelled.status == "queued"
    quota = await client.quota()
    assert quota.user_id == "key-alice" and quota.tokens.limit == PLAN.tokens_per_day
    assert quota.requests.used >= 1 and quota.window.reset_at > quota.window.start
    models = await client.models()
    assert {(m.task, m.id, m.default) for m in models.data} >= {("generate", "sim-gpt", True)}


async def test_list_pages_newest_first(client: c.AsyncClient, fake: Fake) -> None:
    for _ in range(3):
        fake.add(["queued"])
    newest = sorted(
        (s[-1]["request_id"] for s in fake.states.values() if s[-1]["status"] == "queued"),
        reverse=True,
    )
    first = await client.list_requests(status="queued", limit=2)
    assert first.has_more and [d.request_id for d in first.data] == newest[:2]
    rest = await client.list_requests(status="queued", limit=100, after=first.next_after)
    assert [d.request_id for d in rest.data] == newest[2:] and not rest.has_more


def test_cli_lists(fake: Fake) -> None:
    fake.add(["queued"])
    newest = max(rid for rid, s in fake.states.items() if s[-1]["status"] == "queued")
    out = cli(fake, "list", "--status", "queued", "--limit", "1")
    assert out.exit_code == 0 and orjson.loads(out.stdout)["data"][0]["request_id"] == newest


async def test_an_idempotent_replay_is_marked(client: c.AsyncClient) -> None:
    first = await client.submit("embed", ["a", "b"], idempotency_key="k1")
    again = await client.submit("embed", ["a", "b"], idempotency_key="k1")
    assert again.replayed and not first.replayed and again.request_id == first.request_id


async def test_error_bodies_map_to_types(client: c.AsyncClient, fake: Fake) -> None:
    with pytest.raises(c.BadRequest) as bad:
        await client.submit("nope", "x")  # type: ignore[arg-type]
    assert bad.value.status == 400 and bad.value.field == "task" and "task" in bad.value.message
    with pytest.raises(c.NotFound):
        await client.get(new_request_id())
    with pytest.raises(c.NotFound):
        await client.get("../quota")  # quoted into the path: never another route
    with pytest.raises(c.Conflict) as conflict:
        await client.cancel(fake.add(["queued", "completed"]))
    assert conflict.value.status == 409 and conflict.value.current_status == "completed"
    with pytest.raises(c.Unavailable) as busy:
        await client.submit("generate", "busy")
    assert busy.value.retry_after == 2 and busy.value.type == "unavailable"
    with pytest.raises(c.PayloadTooLarge) as large:
        await client.submit("generate", "x" * 70_000)
    assert large.value.limit == 64_000
    async with c.AsyncClient(fake.url, "wrong") as stranger:
        with pytest.raises(c.AuthenticationError) as unauthorized:
            await stranger.quota()
    assert unauthorized.value.status == 401 and isinstance(unauthorized.value, c.ApiError)


async def test_quota_refusals_carry_retry_after_and_what_was_charged(fake: Fake) -> None:
    async with c.AsyncClient(fake.url, "key-bob") as bob:
        with pytest.raises(c.TokenQuotaExceeded) as tokens:
            await bob.submit("generate", BIG)
        err = tokens.value
        assert err.status == 429 and err.type == "token_quota_exceeded"
        assert err.retry_after is not None and err.retry_after > 60  # the UTC day's reset
        assert err.tokens is not None and err.tokens.limit == PLAN.tokens_per_day
        assert err.tokens.estimated > PLAN.tokens_per_day
        assert err.requests is not None and err.requests.limit == PLAN.requests_per_day
        assert err.rate_limits is not None and err.rate_limits.remaining_requests == 100
        for _ in range(PLAN.requests_per_minute):
            await bob.submit("generate", "ok")
        with pytest.raises(c.RateLimited) as limited:
            await bob.submit("generate", "one too many")
    assert isinstance(limited.value, c.QuotaExceeded) and 0 < (limited.value.retry_after or 0) <= 60


async def test_transport_and_protocol_failures_are_apart_from_api_errors() -> None:
    async with c.AsyncClient("http://127.0.0.1:9", "key-x", timeout=2) as nowhere:
        with pytest.raises(c.TransportError):
            await nowhere.quota()
    assert not issubclass(c.TransportError, c.ApiError)
    err = c.errors.error_from_response(502, b"<html>bad gateway</html>", {})
    assert isinstance(err, c.ServerError) and err.status == 502 and "bad gateway" in err.message
    teapot = c.errors.error_from_response(
        418, b'{"error": {"type": "teapot", "message": "no"}}', {}
    )
    assert type(teapot) is c.ApiError and teapot.type == "teapot"


@pytest.mark.parametrize(
    "exc",
    [
        InvalidRequest("bad", field="input"),
        Unauthorized("who"),
        NotFound("none"),
        Conflict("done", status="failed"),
        PayloadTooLarge("big", limit=10),
        Unavailable("later", retry_after=3),
        QuotaExceeded(
            "request_quota_exceeded", "day", retry_after=5, requests={"used": 1, "limit": 1}
        ),
        QuotaExceeded("rate_limited", "minute", retry_after=7),
    ],
)
def test_every_server_error_maps_to_the_client_class_of_its_type(exc: PublicError) -> None:
    resp = error_response(exc)
    assert resp.body is not None
    mapped = c.errors.error_from_response(resp.status, bytes(resp.body), resp.headers)  # type: ignore[arg-type]
    assert (
        mapped.type == exc.type and mapped.status == resp.status and mapped.message == exc.message
    )
    assert type(mapped).default_type == exc.type
    assert mapped.details == exc.details
    if exc.retry_after is not None:
        assert mapped.retry_after == exc.retry_after


# ---- event streams ----------------------------------------------------------------------


async def test_a_stream_dropped_mid_way_resumes_after_the_last_event(
    client: c.AsyncClient, fake: Fake
) -> None:
    rid = fake.add(["queued", "dispatched", "running", "completed"], Play(send=1), Play(send=2))
    events = await collect(client, rid)
    assert [e.id for e in events] == [1, 2, 3, 4]
    assert [e.event for e in events] == ["queued", "dispatched", "running", "completed"]
    assert fake.seen_ids[rid] == [None, "1", "3"]
    assert events[-1].terminal and events[-1].data.result is not None and not events[-1].snapshot


async def test_a_stream_that_ends_without_a_terminal_event_is_resumed(
    client: c.AsyncClient, fake: Fake
) -> None:
    rid = fake.add(["queued", "completed"], Play(end_early=True))
    assert [e.id for e in await collect(client, rid)] == [1, 4]
    assert fake.seen_ids[rid] == [None, "1"]


async def test_heartbeats_keep_a_quiet_stream_open(fake: Fake) -> None:
    # 1.5 s without an event against a 1 s read timeout; a beat every 0.1 s leaves a loaded machine room.
    rid = fake.add(["queued", "completed"], Play(beats=15, beat_s=0.1))
    async with c.AsyncClient(fake.url, "key-alice", read_timeout=1.0) as cl:
        assert [e.id for e in await collect(cl, rid)] == [1, 4]
    assert fake.seen_ids[rid] == [None]


async def test_a_silent_connection_counts_as_dropped(client: c.AsyncClient, fake: Fake) -> None:
    rid = fake.add(["queued", "completed"], Play(send=1), Play(silence_s=1.0))
    assert [e.id for e in await collect(client, rid)] == [1, 4]
    assert fake.seen_ids[rid] == [None, "1", "1"]


async def test_a_503_on_reconnect_waits_its_retry_after(client: c.AsyncClient, fake: Fake) -> None:
    rid = fake.add(["queued", "completed"], Play(send=1), Play(unavailable=True))
    started = time.monotonic()
    assert [e.id for e in await collect(client, rid)] == [1, 4]
    assert time.monotonic() - started >= 0.9  # Retry-After: 1
    assert fake.seen_ids[rid] == [None, "1", "1"]


async def test_a_snapshot_is_flagged_and_ends_the_stream(client: c.AsyncClient, fake: Fake) -> None:
    rid = fake.add(["queued", "completed"], Play(snapshot=True))
    [event] = await collect(client, rid, last_event_id=1)
    assert event.snapshot and event.id == 4 and event.data.status == "completed"
    assert fake.seen_ids[rid] == ["1"]


async def test_reconnects_give_up_after_max_reconnects(fake: Fake) -> None:
    rid = fake.add(["queued", "completed"], *[Play(send=0, retry_ms=10)] * 3)
    async with c.AsyncClient(fake.url, "key-alice", max_reconnects=2) as cl:
        with pytest.raises(c.TransportError):
            await collect(cl, rid)
    assert len(fake.seen_ids[rid]) == 3


async def test_a_stream_token_opens_the_stream_without_the_key(
    client: c.AsyncClient, fake: Fake
) -> None:
    rid = fake.add(["queued", "completed"], Play(send=1))
    minted = await client.stream_token(rid)
    assert minted.ttl_s == 300 and minted.events_url.endswith(f"?token={minted.token}")
    async with c.AsyncClient(fake.url, None, reconnect_delay=0.01) as keyless:
        assert [e.id for e in await collect(keyless, rid, token=minted.token)] == [1, 4]
        with pytest.raises(c.AuthenticationError):
            await collect(keyless, fake.add(["queued"]), token=minted.token)  # another request's
        with pytest.raises(c.AuthenticationError):
            await collect(keyless, rid)  # no token, no key
    assert fake.seen_ids[rid] == [None, "1"]  # resumed with the token too


async def test_errors_before_the_stream_are_raised_not_retried(
    client: c.AsyncClient, fake: Fake
) -> None:
    with pytest.raises(c.NotFound):
        await collect(client, new_request_id())


async def test_a_document_larger_than_aiohttps_line_limit_arrives(
    client: c.AsyncClient, fake: Fake
) -> None:
    rid = fake.add(["completed"], huge=400_000)
    [event] = await collect(client, rid)
    assert event.data.result is not None and len(event.data.result.text or "") > 400_000


async def test_wait_returns_the_terminal_document_or_times_out_with_the_last_state(
    client: c.AsyncClient, fake: Fake
) -> None:
    rid = fake.add(["queued", "running", "failed"], Play(send=1))
    failed = await client.wait(rid, timeout=10)
    assert failed.status == "failed" and failed.error is not None
    assert failed.error.reason == "budget" and failed.error.attempts == 3 and failed.error.history
    slow = fake.add(["queued", "completed"], Play(send=1), *[Play(silence_s=3)] * 3)
    with pytest.raises(c.WaitTimeout) as timeout:
        await client.wait(slow, timeout=0.5)
    assert isinstance(timeout.value, TimeoutError)
    assert timeout.value.last is not None and timeout.value.last.status == "queued"


def test_the_parser_joins_data_lines_skips_comments_and_keeps_the_id() -> None:
    parser = SseParser()
    wire = b": hi\r\nretry: 250\nid: 7\nevent: x\ndata: a\ndata:b\n\n\ndata: c\n\n"
    events = [
        e for i in range(len(wire)) for e in parser.feed(wire[i : i + 1])
    ]  # one byte at a time
    assert [(e.id, e.event, e.data) for e in events] == [("7", "x", "a\nb"), ("7", "message", "c")]
    assert parser.retry_ms == 250


# ---- the blocking client and the CLI ----------------------------------------------------


def test_the_sync_client_does_the_same(fake: Fake) -> None:
    rid = fake.add(["queued", "dispatched", "completed"], Play(send=1))
    with c.Client(fake.url, "key-carol", reconnect_delay=0.01) as cl:
        accepted = cl.submit("generate", "sync")
        assert cl.wait(accepted.request_id, timeout=10).status == "completed"
        assert [e.id for e in cl.events(rid)] == [1, 2, 4]
        assert cl.get(rid).status == "completed" and cl.quota().user_id == "key-carol"
        with pytest.raises(c.NotFound):
            cl.get(new_request_id())
        first = next(iter(cl.events(fake.add(["queued", "completed"]))))  # left early: closed
        assert first.id == 1
        assert cl.models().data


def cli(fake: Fake, *args: str, key: str = "key-dave") -> Any:
    env = {c.BASE_URL_ENV: fake.url, c.API_KEY_ENV: key}
    return CliRunner(env=env).invoke(main, list(args), catch_exceptions=False)


def test_cli_submit_wait_events_get_cancel(fake: Fake) -> None:
    done = cli(
        fake,
        "submit",
        "--task",
        "generate",
        "--input",
        "from the cli",
        "--max-tokens",
        "5",
        "--wait",
    )
    assert done.exit_code == 0, done.stderr
    doc = orjson.loads(done.stdout)
    assert doc["status"] == "completed" and doc["result"]["text"] == "echo: from the cli"
    accepted = orjson.loads(
        cli(fake, "submit", "--task", "embed", "--input", "a", "--input", "b").stdout
    )
    assert accepted["status"] == "queued" and "replayed" not in accepted
    rid = fake.add(["queued", "running", "failed"], Play(send=2))
    streamed = cli(fake, "events", rid)
    assert streamed.exit_code == 5  # ended, but not completed
    lines = [orjson.loads(line) for line in streamed.stdout.splitlines()]
    assert [(e["id"], e["event"]) for e in lines] == [(1, "queued"), (3, "running"), (4, "failed")]
    assert orjson.loads(cli(fake, "get", rid).stdout)["error"]["type"] == "model_http_503"
    cancelled = cli(fake, "cancel", fake.add(["queued"]))
    assert cancelled.exit_code == 0 and orjson.loads(cancelled.stdout)["cancel_requested"] is True
    assert orjson.loads(cli(fake, "quota").stdout)["user_id"] == "key-dave"
    minted = orjson.loads(cli(fake, "token", rid).stdout)
    keyless = cli(fake, "events", rid, "--last-event-id", "3", "--token", minted["token"], key="")
    assert [orjson.loads(line)["id"] for line in keyless.stdout.splitlines()] == [4]
    assert any(
        m["task"] == "embed" for m in orjson.loads(cli(fake, "--pretty", "models").stdout)["data"]
    )


def test_cli_errors_say_what_and_exit_by_kind(fake: Fake) -> None:
    conflict = cli(fake, "cancel", fake.add(["completed"]))
    assert (
        conflict.exit_code == 1
        and "409 conflict" in conflict.stderr
        and "status=completed" in conflict.stderr
    )
    missing = cli(fake, "get", new_request_id())
    assert missing.exit_code == 1 and "404 not_found" in missing.stderr
    refused = cli(fake, "submit", "--task", "generate", "--input", BIG, key="key-erin")
    assert (
        refused.exit_code == 1
        and "token_quota_exceeded" in refused.stderr
        and "retry_after=" in refused.stderr
    )
    anonymous = cli(fake, "quota", key="")
    assert anonymous.exit_code == 1 and c.API_KEY_ENV in anonymous.stderr
    gone = CliRunner().invoke(main, ["--url", "http://127.0.0.1:9", "--key", "key-x", "quota"])
    assert gone.exit_code == 3
    slow = fake.add(["queued", "completed"], Play(silence_s=3))
    assert cli(fake, "wait", slow, "--timeout", "0.3").exit_code == 4
    bad = cli(fake, "submit", "--task", "generate", "--input", "x", "--metadata", "[1]")
    assert bad.exit_code == 2


# ---- in step with the server ------------------------------------------------------------

PAIRS = [
    (c.Accepted, server.Accepted),
    (c.RequestDoc, server.RequestDoc),
    (c.CancelAccepted, server.CancelAccepted),
    (c.RequestPage, server.RequestPage),
    (c.Quota, server.QuotaDoc),
    (c.models.Window, server.Window),
    (c.models.RequestCounts, server.RequestCounts),
    (c.models.TokenCounts, server.TokenCounts),
    (c.Result, server.Result),
    (c.Failure, server.Failure),
    (c.Usage, server.Usage),
    (c.Model, server.ModelEntry),
    (c.ModelList, server.ModelList),
    (c.models.RequestsCharge, server.RequestsCharged),
    (c.models.TokensCharge, server.TokensCharged),
    (c.models.Links, server.Links),
    (c.StreamToken, server.StreamToken),
]
CLIENT_ONLY = {"replayed", "rate_limits", "reason", "attempts", "elapsed_s", "history"}


@pytest.mark.parametrize(("ours", "theirs"), PAIRS, ids=[p[0].__name__ for p in PAIRS])
def test_the_client_models_follow_the_server_documents(ours: type, theirs: type) -> None:
    mine = {f.encode_name: f for f in msgspec.structs.fields(ours)}
    served = {f.encode_name: f for f in msgspec.structs.fields(theirs)}
    assert set(served) <= set(mine), f"{ours.__name__} misses {set(served) - set(mine)}"
    assert set(mine) - set(served) <= CLIENT_ONLY
    for name, f in served.items():
        # What the server may leave out must be optional here; what it always sends may be either.
        assert mine[name].required <= f.required, f"{ours.__name__}.{name}"


def test_importing_the_client_pulls_in_no_server_modules() -> None:
    code = (
        "import sys, inferstream.client, inferstream.client.cli\n"
        "heavy = ('faust', 'aiokafka', 'mode', 'schemas', 'streams', 'bridges', 'tables', 'asyncpg',"
        " 'aio_pika', 'redis', 'tokenizers', 'opentelemetry', 'prometheus_client')\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & set(heavy)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
