"""``/dashboard`` in headless Chromium against a running worker: the numbers move under load, scoped by key."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest
from selenium import webdriver
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
from selenium.webdriver.common.by import By

from tests.support.browser import chromium
from tests.support.modelserver import model_faults
from tests.support.pipeline import LOG_DIR, Api, Pipeline, WorkerProcess
from tests.support.wait import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="session")]

LOAD = 30
# A user id that is markup: the page must show it as text (an admin sees every user's id).
HOSTILE_USER = '<img id="pwned" src="x">'


@pytest.fixture(scope="module")
async def pipeline(broker_url: str, model_base_url: str) -> AsyncIterator[Pipeline]:
    async with Pipeline.session(broker_url, model_base_url + "/v1") as p:
        assert (await p.store.keys.set_plan("ops", 10, 10, 10, "high", admin=True)).admin
        # A change that does not mention the flag keeps it (as `plans set` without --admin would).
        assert (await p.store.keys.set_plan("ops", 10_000, 10**8, 100_000, "high")).admin
        assert not (await p.store.keys.load_plans())["default"].admin  # migration 0004's default
        await p.set_plan("roomy", requests_per_day=10_000, tokens_per_day=10**8)
        yield p


@pytest.fixture(scope="module")
async def worker(pipeline: Pipeline) -> WorkerProcess:
    return await pipeline.start_worker()  # every role: one registry holds admission and model numbers


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    with chromium() as driver:
        yield driver


def cell(driver: webdriver.Chrome, row_id: str, cls: str) -> float | None:
    """The number in ``tr#row_id td.cls``, None while the row is absent or shows no number."""
    try:
        text = driver.find_element(By.CSS_SELECTOR, f"#{row_id} td.{cls}").text
    except (NoSuchElementException, StaleElementReferenceException):
        return None
    try:
        return float(text)
    except ValueError:
        return None


async def test_dashboard_numbers_move_under_load(
    pipeline: Pipeline, worker: WorkerProcess, http: aiohttp.ClientSession, browser: webdriver.Chrome,
    model_base_url: str,
) -> None:  # fmt: skip
    admin = await Api(http, worker.url, await pipeline.create_key("operator", "ops")).wait_key_active()
    user = await Api(http, worker.url, await pipeline.create_key("dash-user", "roomy")).wait_key_active()
    hostile = await Api(http, worker.url, await pipeline.create_key(HOSTILE_USER)).wait_key_active()

    async with http.get(worker.url + "/dashboard") as r:
        assert r.status == 200 and r.content_type == "text/html"
        csp = r.headers["Content-Security-Policy"]
        assert "script-src 'self'" in csp and "default-src 'none'" in csp
    async with http.get(worker.url + "/dashboard/api/stats") as r:
        assert r.status == 401 and (await r.json())["error"]["type"] == "unauthorized"

    browser.get(worker.url + "/dashboard")
    browser.find_element(By.ID, "key").send_keys(admin.key or "")
    browser.find_element(By.CSS_SELECTOR, "#login button[type=submit]").click()
    await wait_for(lambda: browser.find_element(By.ID, "status").text == "live", timeout=15, what="the page live")
    assert browser.execute_script("return sessionStorage.length") == 1
    before = cell(browser, "rate-admitted", "total") or 0.0

    # Load: the roomy user's work, one request of the hostile user, one that fails (dead-lettered).
    async with model_faults(http, model_base_url, fail_next=1, error_status=400):
        status, body, _ = await user.submit({"task": "generate", "input": "fails", "params": {"max_tokens": 4}})
        assert status == 202, body
        await user.wait_status(body["request_id"], {"failed"})
    submitted = await asyncio.gather(
        *(user.submit({"task": "generate", "input": f"load {i}", "params": {"max_tokens": 4}}) for i in range(LOAD))
    )
    assert all(s == 202 for s, _, _ in submitted), [b for s, b, _ in submitted if s != 202]
    status, body, _ = await hostile.submit({"task": "generate", "input": "hi", "params": {"max_tokens": 4}})
    assert status == 202, body
    await hostile.wait_status(body["request_id"], {"completed"})
    for _, body, _ in submitted:
        await user.wait_status(body["request_id"], {"completed"})

    def moved() -> bool:
        admitted = cell(browser, "rate-admitted", "total") or 0.0
        completed = cell(browser, "rate-completed", "total") or 0.0
        used = cell(browser, "quota-dash-user", "requests-used") or 0.0
        model_p50 = cell(browser, "latency-model-call", "p50")
        return admitted >= before + LOAD + 2 and completed >= LOAD and used >= LOAD + 1 and model_p50 is not None

    try:
        await wait_for(moved, timeout=30, interval=0.5, what="the dashboard to show the load")
    except AssertionError as exc:
        browser.save_screenshot(str(LOG_DIR / "dashboard-failed.png"))
        raise AssertionError(f"{exc}\npage:\n{browser.find_element(By.TAG_NAME, 'body').text}") from None
    assert (cell(browser, "rate-admitted", "rate") or 0.0) > 0  # the rate over the window moved too
    page = browser.find_element(By.ID, "board").text
    assert "closed" in page  # the route's breaker, one row per backend
    failures = browser.find_element(By.ID, "failures").text
    assert "dash-user" in failures, failures  # the admin sees the dead letter
    # The hostile user id is shown as text and never became an element.
    assert HOSTILE_USER in browser.find_element(By.ID, "quota").text
    assert browser.execute_script("return document.getElementById('pwned')") is None

    LOG_DIR.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(LOG_DIR / "dashboard.png"))

    # An ordinary key sees its own quota and its own failures, nobody else's.
    status, mine, _ = await hostile.call("GET", "/dashboard/api/quota")
    assert status == 200 and mine["scope"] == "self" and [u["user_id"] for u in mine["users"]] == [HOSTILE_USER]
    status, stats, _ = await hostile.call("GET", "/dashboard/api/stats")
    assert status == 200 and stats["admin"] is False and stats["recent_failures"] == []
    status, everyone, _ = await admin.call("GET", "/dashboard/api/quota")
    assert status == 200 and everyone["scope"] == "all"
    assert {"dash-user", HOSTILE_USER} <= {u["user_id"] for u in everyone["users"]}

    # Forgetting the key signs the page out and clears the tab's storage.
    browser.find_element(By.ID, "forget").click()
    assert browser.execute_script("return sessionStorage.length") == 0
    assert browser.find_element(By.ID, "login").is_displayed()
