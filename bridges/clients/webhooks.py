"""Webhook deliveries: POST a terminal request's document to its ``callback_url``, signed, retried, recorded.

Each delivery carries ``X-Inferstream-Signature: sha256=<hex HMAC-SHA256 of the raw body>``
(key: ``settings.webhook_secret``) and ``X-Inferstream-Timestamp`` (Unix seconds of the
attempt). Connection errors, timeouts, 408, 429 and 5xx are retried
(:data:`inferstream.retrying.WEBHOOK_DELIVERY`: full-jitter backoff, a ``Retry-After`` header
waited for, capped) up to ``settings.webhook_max_attempts``; any other status fails at once. After every attempt the
delivery state goes to the injected ``record`` callback: ``pending`` while a retry is due,
then ``delivered`` or ``failed``.

Targets pass :mod:`inferstream.egress` at connect time (an internal address fails at once);
redirects are not followed; the response body is never read.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Literal

import aiohttp
import orjson
from mode import Service
from tenacity import RetryCallState, RetryError
from yarl import URL

from inferstream import logs
from inferstream.egress import EgressPolicy, EgressRefused, GuardedResolver
from inferstream.retrying import WEBHOOK_DELIVERY, failure, parse_retry_after, retry_after
from inferstream.settings import Settings

log = logging.getLogger(__name__)

DeliveryState = Literal["delivered", "failed", "pending"]
RecordDelivery = Callable[[str, DeliveryState, int, str | None], Awaitable[None]]
"""``record(request_id, state, attempts, last_error)``."""

SIGNATURE_HEADER = "X-Inferstream-Signature"
TIMESTAMP_HEADER = "X-Inferstream-Timestamp"
_RETRY_STATUSES = frozenset({408, 429})


def sign(secret: str, body: bytes) -> str:
    """The signature header value for ``body``."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify_signature(secret: str, body: bytes, header: str | None) -> bool:
    """True if ``header`` is the signature of ``body`` under ``secret`` (constant-time)."""
    if not header:
        return False
    return hmac.compare_digest(sign(secret, body), header.strip())


class _Retry(Exception):
    """One attempt failed in a way worth another (internal control flow)."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


class _Rejected(Exception):
    """The receiver refused the delivery for good (a 4xx other than 408/429, or a bad URL)."""


class WebhookSender(Service):
    """Background webhook deliveries, at most ``concurrency`` at a time; on stop, in-flight ones get 5 s."""

    def __init__(
        self,
        settings: Settings,
        *,
        record: RecordDelivery,
        resolver: aiohttp.abc.AbstractResolver | None = None,
        concurrency: int = 32,
        timeout_s: float = 10.0,
        base_delay_s: float = WEBHOOK_DELIVERY.base_s,
        max_delay_s: float = WEBHOOK_DELIVERY.cap_s,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.settings = settings
        self._record = record
        self._policy = EgressPolicy.parse(settings.webhook_allow)
        self._inner_resolver = resolver
        # The sender owns its session: every connection goes through the guarded resolver.
        self._session: aiohttp.ClientSession | None = None
        self._resolver: GuardedResolver | None = None
        self._semaphore = asyncio.Semaphore(concurrency)
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._retry = WEBHOOK_DELIVERY.tuned(base_delay_s, max_delay_s, settings.webhook_max_attempts)
        self._backoff = self._retry.wait()
        self._deliveries: set[asyncio.Task[DeliveryState]] = set()
        self._lock = asyncio.Lock()

    @property
    def in_flight_count(self) -> int:
        return len(self._deliveries)

    def delivering(self, request_id: str) -> bool:
        """Whether a delivery for ``request_id`` is under way in this process."""
        return any(t.get_name() == f"webhook-{request_id}" for t in self._deliveries)

    async def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            async with self._lock:
                if self._session is None:
                    self._resolver = GuardedResolver(self._policy, self._inner_resolver)
                    connector = aiohttp.TCPConnector(resolver=self._resolver)
                    self._session = aiohttp.ClientSession(
                        timeout=self._timeout, connector=connector, trust_env=False
                    )
        return self._session

    def submit(
        self, request_id: str, callback_url: str, doc: Mapping[str, Any]
    ) -> asyncio.Task[DeliveryState]:
        """Deliver in the background; the task's result is the final state."""
        task = asyncio.get_running_loop().create_task(
            self.deliver(request_id, callback_url, doc), name=f"webhook-{request_id}"
        )
        self._deliveries.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[DeliveryState]) -> None:
        self._deliveries.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            # Most likely the record callback (the database) failed; the delivery state is unknown.
            log.error("webhook delivery %s crashed", task.get_name(), exc_info=exc)

    async def deliver(
        self, request_id: str, callback_url: str, doc: Mapping[str, Any]
    ) -> DeliveryState:
        """Deliver now, retrying as needed, and record the outcome."""
        logs.set_request_id(request_id)  # its own task (streams/delivery.py): one request
        body = orjson.dumps(doc)
        signature = sign(self.settings.webhook_secret, body)

        async def pending(state: RetryCallState) -> None:
            await self._record(request_id, "pending", state.attempt_number, str(failure(state)))

        retrying = self._retry.retrying(_Retry, before_sleep=pending, wait=self._wait)
        try:
            async for attempt in retrying:
                with attempt:
                    async with self._semaphore:
                        await self._attempt(callback_url, body, signature)
        except RetryError as gave_up:
            attempts, reason = gave_up.last_attempt.attempt_number, str(gave_up.last_attempt.exception())
            log.warning("webhook %s to %s failed after %d attempts: %s", request_id, _host(callback_url), attempts, reason)
            await self._record(request_id, "failed", attempts, reason)
            return "failed"
        except _Rejected as exc:
            log.warning("webhook %s to %s rejected: %s", request_id, _host(callback_url), exc)
            await self._record(request_id, "failed", retrying.statistics["attempt_number"], str(exc))
            return "failed"
        await self._record(request_id, "delivered", retrying.statistics["attempt_number"], None)
        return "delivered"

    def _wait(self, state: RetryCallState) -> float:
        """The jittered backoff, or the receiver's ``Retry-After`` (capped) if that is longer."""
        return max(self._backoff(state), min(retry_after(state) or 0.0, self._retry.cap_s))

    async def _attempt(self, url: str, body: bytes, signature: str) -> None:
        session = await self._client()
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "inferstream-webhook/1",
            SIGNATURE_HEADER: signature,
            TIMESTAMP_HEADER: str(int(time.time())),
        }
        try:
            host = URL(url).raw_host or ""
        except ValueError as exc:
            raise _Rejected(f"invalid callback_url: {exc}") from exc
        try:
            # aiohttp skips its resolver for an IP literal: check that here (a name is checked
            # by the resolver, on the address it is about to connect to).
            self._policy.check_literal(host)
            # The body is never read: an unread response closes its connection, so a
            # receiver cannot make us read more than its headers (aiohttp bounds those).
            async with session.post(
                url, data=body, headers=headers, timeout=self._timeout, allow_redirects=False
            ) as resp:
                if resp.status < 300:
                    return
                if resp.status >= 500 or resp.status in _RETRY_STATUSES:
                    raise _Retry(
                        f"HTTP {resp.status}", parse_retry_after(resp.headers.get("Retry-After"))
                    )
                raise _Rejected(f"HTTP {resp.status}")
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, TimeoutError) as exc:
            raise _Retry(f"{type(exc).__name__}: {exc}") from exc
        except aiohttp.InvalidURL as exc:
            raise _Rejected(f"invalid callback_url: {exc}") from exc
        except EgressRefused as exc:
            raise _Rejected(f"callback_url {exc}") from exc

    async def on_stop(self) -> None:
        await self.close()

    async def close(self, timeout_s: float = 5.0) -> None:
        """Let in-flight deliveries finish for up to ``timeout_s``, cancel the rest, close the session.

        A cancelled delivery keeps its last recorded state (``pending`` after a failed attempt).
        """
        tasks = list(self._deliveries)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=timeout_s)
            for task in pending:
                task.cancel()
            for task in pending:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._session is not None:
            await self._session.close()
        if self._resolver is not None:
            await self._resolver.close()  # a connector closes only a resolver it made itself
        self._session = self._resolver = None


def _host(url: str) -> str:
    """What a log line may say of a callback URL: its host (the path and query are often a secret)."""
    return URL(url).host or "?"
