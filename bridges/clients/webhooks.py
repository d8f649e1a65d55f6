"""Webhook deliveries: POST a request's document (one per event) to its ``callback_url``, signed, retried, recorded.

Each delivery is signed twice. The Standard Webhooks headers (https://www.standardwebhooks.com):
``webhook-id`` (``msg_<request id>_<event>``, the same on every retry and redelivery of one
event, so receivers can dedupe), ``webhook-timestamp`` (Unix seconds of the attempt) and
``webhook-signature: v1,<base64 HMAC-SHA256 of "id.timestamp.body">`` keyed by
:func:`standard_key` of ``settings.webhook_secret`` (a ``whsec_<base64>`` secret is used as
given; any other string is the key's raw bytes, whose ``whsec_`` form :func:`standard_secret`
prints). For backwards compatibility the old headers stay: ``X-Inferstream-Signature:
sha256=<hex HMAC-SHA256 of the raw body>`` (key: the setting's string) and
``X-Inferstream-Timestamp`` (the same seconds). Connection errors, timeouts, 408, 429 and 5xx are retried
(:data:`inferstream.retrying.WEBHOOK_DELIVERY`: full-jitter backoff, a ``Retry-After`` header
waited for, capped) up to ``settings.webhook_max_attempts`` (an ``output`` event is tried once: the next one
supersedes it); any other status fails at once. After every attempt an :class:`Attempt` goes
to the injected ``record`` callback: ``pending`` while a retry is due, then ``delivered`` or
``failed``.

Targets pass :mod:`inferstream.egress` at connect time (an internal address fails at once);
redirects are not followed; the response body is never read.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
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


@dataclass(frozen=True, slots=True)
class Attempt:
    """One delivery attempt's outcome, as the ``record`` callback gets it."""

    request_id: str
    event: str
    webhook_id: str
    state: DeliveryState
    attempt: int
    http_status: int | None
    error: str | None


RecordDelivery = Callable[[Attempt], Awaitable[None]]

SIGNATURE_HEADER = "X-Inferstream-Signature"
TIMESTAMP_HEADER = "X-Inferstream-Timestamp"
ID_HEADER = "webhook-id"
STANDARD_TIMESTAMP_HEADER = "webhook-timestamp"
STANDARD_SIGNATURE_HEADER = "webhook-signature"
_RETRY_STATUSES = frozenset({408, 429})
_WHSEC = "whsec_"


def message_id(request_id: str, event: str, seq: int | None = None) -> str:
    """The ``webhook-id`` of one event of one request; ``seq`` tells ``output`` events apart."""
    return f"msg_{request_id}_{event}" if seq is None else f"msg_{request_id}_{event}_{seq}"


def standard_key(secret: str) -> bytes:
    """The HMAC key of the Standard Webhooks signature: a ``whsec_`` secret decoded, else the string's bytes."""
    if secret.startswith(_WHSEC):
        try:
            return base64.b64decode(secret[len(_WHSEC):], validate=True)
        except binascii.Error:
            pass  # not base64 after all: the string itself is the key, as for any other secret
    return secret.encode()


def standard_secret(secret: str) -> str:
    """The ``whsec_<base64>`` form of ``secret`` that a Standard Webhooks receiver is configured with."""
    return _WHSEC + base64.b64encode(standard_key(secret)).decode()


def standard_signature(key: bytes, webhook_id: str, timestamp: int, body: bytes) -> str:
    """``v1,<base64 HMAC-SHA256 of "id.timestamp.body">``."""
    signed = f"{webhook_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


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

    def __init__(self, reason: str, retry_after: float | None = None, http_status: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after
        self.http_status = http_status


class _Rejected(Exception):
    """The receiver refused the delivery for good (a 4xx other than 408/429, or a bad URL)."""

    def __init__(self, reason: str, http_status: int | None = None) -> None:
        super().__init__(reason)
        self.http_status = http_status


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
        self._once = WEBHOOK_DELIVERY.tuned(base_delay_s, max_delay_s, 1)
        self._key = standard_key(settings.webhook_secret)
        self._backoff = self._retry.wait()
        self._deliveries: set[asyncio.Task[DeliveryState]] = set()
        self._lock = asyncio.Lock()

    @property
    def in_flight_count(self) -> int:
        return len(self._deliveries)

    def delivering(self, request_id: str, event: str | None = None) -> bool:
        """Whether a delivery for ``request_id`` (of ``event``, if given) is under way in this process."""
        names = {f"webhook-{request_id}-{event}"} if event else None
        prefix = f"webhook-{request_id}-"
        return any(
            (t.get_name() in names) if names else t.get_name().startswith(prefix) for t in self._deliveries
        )

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
        self,
        request_id: str,
        callback_url: str,
        doc: Mapping[str, Any],
        *,
        event: str | None = None,
        webhook_id: str | None = None,
        retry: bool = True,
    ) -> asyncio.Task[DeliveryState]:
        """Deliver in the background; the task's result is the final state.

        ``event`` defaults to the document's status, ``webhook_id`` to :func:`message_id` of the two.
        """
        event = event or str(doc["status"])
        task = asyncio.get_running_loop().create_task(
            self.deliver(request_id, callback_url, doc, event=event, webhook_id=webhook_id, retry=retry),
            name=f"webhook-{request_id}-{event}",
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
        self,
        request_id: str,
        callback_url: str,
        doc: Mapping[str, Any],
        *,
        event: str | None = None,
        webhook_id: str | None = None,
        retry: bool = True,
    ) -> DeliveryState:
        """Deliver now, retrying as needed, and record the outcome."""
        logs.set_request_id(request_id)  # its own task (streams/delivery.py): one request
        event = event or str(doc["status"])
        msg_id = webhook_id or message_id(request_id, event)
        body = orjson.dumps(doc)
        signature = sign(self.settings.webhook_secret, body)

        def outcome(state: DeliveryState, attempt: int, exc: BaseException | None) -> Attempt:
            status = exc.http_status if isinstance(exc, _Retry | _Rejected) else None
            error = None if state == "delivered" else str(exc)
            return Attempt(request_id, event, msg_id, state, attempt, status, error)

        async def pending(state: RetryCallState) -> None:
            await self._record(outcome("pending", state.attempt_number, failure(state)))

        retrying = (self._retry if retry else self._once).retrying(_Retry, before_sleep=pending, wait=self._wait)
        try:
            async for attempt in retrying:
                with attempt:
                    async with self._semaphore:
                        await self._attempt(callback_url, body, signature, msg_id)
        except RetryError as gave_up:
            attempts, last = gave_up.last_attempt.attempt_number, gave_up.last_attempt.exception()
            log.warning("webhook %s to %s failed after %d attempts: %s", msg_id, _host(callback_url), attempts, last)
            await self._record(outcome("failed", attempts, last))
            return "failed"
        except _Rejected as exc:
            log.warning("webhook %s to %s rejected: %s", msg_id, _host(callback_url), exc)
            await self._record(outcome("failed", retrying.statistics["attempt_number"], exc))
            return "failed"
        await self._record(outcome("delivered", retrying.statistics["attempt_number"], None))
        return "delivered"

    def _wait(self, state: RetryCallState) -> float:
        """The jittered backoff, or the receiver's ``Retry-After`` (capped) if that is longer."""
        return max(self._backoff(state), min(retry_after(state) or 0.0, self._retry.cap_s))

    async def _attempt(self, url: str, body: bytes, signature: str, msg_id: str) -> None:
        session = await self._client()
        now = int(time.time())  # per attempt: receivers reject old timestamps (replay protection)
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "inferstream-webhook/1",
            SIGNATURE_HEADER: signature,
            TIMESTAMP_HEADER: str(now),
            ID_HEADER: msg_id,
            STANDARD_TIMESTAMP_HEADER: str(now),
            STANDARD_SIGNATURE_HEADER: standard_signature(self._key, msg_id, now, body),
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
                        f"HTTP {resp.status}", parse_retry_after(resp.headers.get("Retry-After")), resp.status
                    )
                raise _Rejected(f"HTTP {resp.status}", resp.status)
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
