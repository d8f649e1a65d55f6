"""A page on another loopback origin follows a request with ``EventSource`` and a stream token (CORS, token scope)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Iterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from selenium import webdriver

from streams.gateway.stream_tokens import StreamTokens
from tests.support.browser import chromium
from tests.support.modelserver import model_faults
from tests.support.pipeline import Api, Pipeline, WorkerProcess
from tests.support.wait import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="session")]

# The page mints a token with the key (a preflighted POST), then follows the request with
# EventSource and the token alone. Everything it sees lands in window.seen for the test to read.
PAGE = """<!doctype html><meta charset="utf-8"><title>follow</title><pre id="log"></pre>
<script>
window.seen = {events: [], errors: [], done: false, token: null};
const params = new URLSearchParams(location.hash.slice(1));
const api = params.get("api"), rid = params.get("rid");
function follow(url) {
  const es = new EventSource(url);
  for (const status of ["queued", "dispatched", "running", "completed", "failed", "cancelled", "expired"]) {
    es.addEventListener(status, (e) => {
      window.seen.events.push({status: status, id: e.lastEventId, data: JSON.parse(e.data)});
      document.getElementById("log").textContent += status + "\\n";
      if (["completed", "failed", "cancelled", "expired"].includes(status)) { es.close(); window.seen.done = true; }
    });
  }
  es.onerror = () => window.seen.errors.push(es.readyState);
}
if (params.get("token")) {
  follow(api + "/v1/requests/" + rid + "/events?token=" + encodeURIComponent(params.get("token")));
} else {
  fetch(api + "/v1/requests/" + rid + "/events/token",
        {method: "POST", headers: {Authorization: "Bearer " + params.get("key")}})
    .then((r) => r.json())
    .then((body) => { window.seen.token = body; follow(api + body.events_url); })
    .catch((err) => window.seen.errors.push("fetch: " + err));
}
</script>"""


async def _page(request: web.Request) -> web.Response:
    return web.Response(text=PAGE, content_type="text/html")


async def _serve_page() -> web.AppRunner:
    app = web.Application()
    app.router.add_get("/", _page)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner


@pytest.fixture(scope="module")
async def origins() -> AsyncIterator[tuple[str, str]]:
    """Two page origins on loopback: the first listed in INFERSTREAM_CORS_ORIGINS, the second not."""
    listed, unlisted = await _serve_page(), await _serve_page()
    try:
        yield (
            f"http://127.0.0.1:{listed.addresses[0][1]}",
            f"http://127.0.0.1:{unlisted.addresses[0][1]}",
        )
    finally:
        await listed.cleanup()
        await unlisted.cleanup()


@pytest.fixture(scope="module")
async def pipeline(
    broker_url: str, model_base_url: str, origins: tuple[str, str]
) -> AsyncIterator[Pipeline]:
    async with Pipeline.session(
        broker_url, model_base_url + "/v1", cors_origins=origins[0], stream_token_ttl_s="60"
    ) as p:
        yield p


@pytest.fixture(scope="module")
async def worker(pipeline: Pipeline) -> WorkerProcess:
    return await pipeline.start_worker()


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    with chromium() as driver:
        yield driver


# The page server runs on the test's event loop: every blocking WebDriver call goes to a thread.
async def seen(driver: webdriver.Chrome) -> dict[str, Any]:
    found: dict[str, Any] = await asyncio.to_thread(driver.execute_script, "return window.seen || null") or {}
    return found


async def open_page(driver: webdriver.Chrome, url: str) -> None:
    # A fresh query string: a URL that differs only in its fragment would not reload the page.
    base, _, fragment = url.partition("#")
    await asyncio.to_thread(driver.get, f"{base}?load={uuid.uuid4().hex}#{fragment}")


async def _get(state: Awaitable[dict[str, Any]], key: str) -> Any:
    return (await state).get(key)


async def _closed(state: Awaitable[dict[str, Any]]) -> bool:
    return 2 in (await state).get("errors", [])  # EventSource.CLOSED: failed, no reconnection


async def submit(api: Api) -> str:
    status, body, _ = await api.submit({"task": "generate", "input": "follow me", "params": {"max_tokens": 4}})
    assert status == 202, body
    request_id: str = body["request_id"]
    return request_id


async def mint(api: Api, request_id: str) -> dict[str, Any]:
    status, body, headers = await api.call("POST", f"/v1/requests/{request_id}/events/token")
    assert status == 201, body
    assert headers.get("Cache-Control") == "no-store"
    return dict(body)


async def test_a_page_follows_a_request_to_completed(
    pipeline: Pipeline, worker: WorkerProcess, http: aiohttp.ClientSession, browser: webdriver.Chrome,
    origins: tuple[str, str], model_base_url: str,
) -> None:  # fmt: skip
    alice = await Api(http, worker.url, await pipeline.create_key("alice")).wait_key_active()
    # Slow enough that the page connects before the work ends and hears it move.
    async with model_faults(http, model_base_url, latency_ms=1500):
        rid = await submit(alice)
        await open_page(browser, f"{origins[0]}/#api={worker.url}&rid={rid}&key={alice.key}")
        await wait_for(lambda: _get(seen(browser), "done"), timeout=30, interval=0.2, what="the page to hear completed")
    state = await seen(browser)
    statuses = [e["status"] for e in state["events"]]
    assert statuses[-1] == "completed" and len(statuses) >= 2, state
    assert [int(e["id"]) for e in state["events"]] == sorted({int(e["id"]) for e in state["events"]})
    assert state["events"][-1]["data"]["request_id"] == rid and state["events"][-1]["data"]["result"]["text"]
    assert state["token"]["ttl_s"] == 60 and state["token"]["events_url"].startswith(f"/v1/requests/{rid}/events?token=")
    assert not [e for e in state["errors"] if isinstance(e, str)], state["errors"]


async def _refused(http: aiohttp.ClientSession, url: str, origin: str) -> tuple[int, dict[str, Any], Any]:
    async with http.get(url, headers={"Origin": origin}) as r:
        return r.status, await r.json(), r.headers


async def test_expired_foreign_and_tampered_tokens_are_refused(
    pipeline: Pipeline, worker: WorkerProcess, http: aiohttp.ClientSession, browser: webdriver.Chrome,
    origins: tuple[str, str],
) -> None:  # fmt: skip
    alice = await Api(http, worker.url, await pipeline.create_key("alice-2")).wait_key_active()
    bob = await Api(http, worker.url, await pipeline.create_key("bob")).wait_key_active()
    mine, also_mine, bobs = await submit(alice), await submit(alice), await submit(bob)
    token = (await mint(alice, mine))["token"]
    # Signed with the server's own secret, expired a while ago: only the expiry refuses it.
    expired, _ = StreamTokens(pipeline.settings.key_secret, 60, now=lambda: time.time() - 600).mint(mine, "alice-2")
    body, sig = token.split(".")
    tampered = f"{body[:-2]}{'AA' if body[-2:] != 'AA' else 'BB'}.{sig}"
    cases = {
        "expired": (mine, expired, "expired"),
        "another request of the same user": (also_mine, token, "another request"),
        "another user's request": (bobs, token, "another request"),
        "tampered": (mine, tampered, "signature"),
        "garbage": (mine, "not-a-token", "malformed"),
    }
    for name, (rid, tok, why) in cases.items():
        status, answer, headers = await _refused(
            http, f"{worker.url}/v1/requests/{rid}/events?token={tok}", origins[0]
        )
        assert status == 401 and answer["error"]["type"] == "unauthorized", (name, answer)
        assert why in answer["error"]["message"], (name, answer)
        # The listed page may read the refusal (CORS applies to errors too).
        assert headers.get("Access-Control-Allow-Origin") == origins[0], name
    # Bob cannot mint a token for Alice's request: it is not his (404, as for GET).
    status, answer, _ = await bob.call("POST", f"/v1/requests/{mine}/events/token")
    assert status == 404, answer
    status, answer, _ = await Api(http, worker.url, None).call("POST", f"/v1/requests/{mine}/events/token")
    assert status == 401, answer

    # In the browser: EventSource with an expired token fails and does not retry (readyState CLOSED = 2).
    await open_page(browser, f"{origins[0]}/#api={worker.url}&rid={mine}&token={expired}")
    await wait_for(lambda: _closed(seen(browser)), timeout=15, interval=0.2, what="EventSource to fail")
    assert (await seen(browser))["events"] == []


async def test_an_unlisted_origin_gets_no_cors_allowance(
    pipeline: Pipeline, worker: WorkerProcess, http: aiohttp.ClientSession, browser: webdriver.Chrome,
    origins: tuple[str, str],
) -> None:  # fmt: skip
    listed, unlisted = origins
    alice = await Api(http, worker.url, await pipeline.create_key("alice-3")).wait_key_active()
    rid = await submit(alice)
    await alice.wait_status(rid, {"completed"})
    token = (await mint(alice, rid))["token"]
    events = f"{worker.url}/v1/requests/{rid}/events?token={token}"
    for origin, allowed in ((listed, True), (unlisted, False)):
        async with http.get(events, headers={"Origin": origin}) as r:
            assert r.status == 200 and "Origin" in r.headers.get("Vary", "")
            assert r.headers.get("Access-Control-Allow-Origin") == (origin if allowed else None)
            assert "Access-Control-Allow-Credentials" not in r.headers
            await r.read()
        preflight = {"Origin": origin, "Access-Control-Request-Method": "POST",
                     "Access-Control-Request-Headers": "authorization"}  # fmt: skip
        async with http.options(f"{worker.url}/v1/requests/{rid}/events/token", headers=preflight) as r:
            assert r.status == 204
            assert r.headers.get("Access-Control-Allow-Origin") == (origin if allowed else None)
            if allowed:
                assert "POST" in r.headers["Access-Control-Allow-Methods"]
                assert "Authorization" in r.headers["Access-Control-Allow-Headers"]
    # The unlisted page's EventSource is blocked by the browser, though the token is valid.
    await open_page(browser, f"{unlisted}/#api={worker.url}&rid={rid}&token={token}")
    await wait_for(lambda: _closed(seen(browser)), timeout=15, interval=0.2, what="EventSource to be blocked")
    assert (await seen(browser))["events"] == []
    logs = json.dumps(await asyncio.to_thread(browser.get_log, "browser"))
    assert "CORS" in logs or "Access-Control-Allow-Origin" in logs, logs
