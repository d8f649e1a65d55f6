"""The asynchronous client of the v1 HTTP API, on aiohttp: one session, typed answers, typed errors."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Mapping, Sequence
from types import TracebackType
from typing import Any
from urllib.parse import quote

import aiohttp
from multidict import CIMultiDictProxy

from inferstream.client.errors import (
    ProtocolError,
    TransportError,
    Unavailable,
    WaitTimeout,
    error_from_response,
)
from inferstream.client.models import (
    Accepted,
    CancelAccepted,
    Event,
    ModelList,
    Priority,
    Quota,
    RateLimits,
    RequestDoc,
    RequestPage,
    Status,
    StreamToken,
    Task,
)
from inferstream.client.sse import SseParser
from inferstream.client.wire import decode, encode, event_of

DEFAULT_BASE_URL = "http://127.0.0.1:6066"
BASE_URL_ENV = "INFERSTREAM_BASE_URL"
API_KEY_ENV = "INFERSTREAM_API_KEY"
USER_AGENT = "inferstream-client/0.1"


def _path_id(request_id: str) -> str:
    return quote(request_id, safe="")


class AsyncClient:
    """A client of one Inferstream API (any worker: each forwards to the owner of the caller's data).

    ``timeout`` bounds each call; an event stream has no total limit, but a read that waits
    longer than ``read_timeout`` (the API's heartbeat comes every 15 s) counts as a dropped
    connection. A dropped stream is resumed with ``Last-Event-ID`` after the server's
    ``retry:`` delay or ``reconnect_delay`` (a 503 waits its ``Retry-After``), at most
    ``max_reconnects`` times in a row without a new event. Nothing else is retried: errors
    carry ``retry_after`` and a submission is safe to repeat with the same ``idempotency_key``.

    Use it as ``async with AsyncClient(url, key) as client:``, or call :meth:`close`. A
    ``session`` passed in is used as it is and left open.
    """

    def __init__(
        self,
        base_url: str = DEFAULT_BASE_URL,
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        read_timeout: float = 45.0,
        reconnect_delay: float = 0.5,
        max_reconnects: int = 10,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout
        self.read_timeout = read_timeout
        self.reconnect_delay = reconnect_delay
        self.max_reconnects = max_reconnects
        self._session = session
        self._own_session = session is None

    @classmethod
    def from_env(cls, environ: Mapping[str, str], **kwargs: Any) -> AsyncClient:
        """A client for ``INFERSTREAM_BASE_URL`` and ``INFERSTREAM_API_KEY`` of ``environ`` (pass ``os.environ``)."""
        return cls(
            environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL, environ.get(API_KEY_ENV), **kwargs
        )

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._own_session and self._session is not None:
            await self._session.close()
        self._session = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession()
            self._own_session = True
        return self._session

    def _headers(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        headers = {"User-Agent": USER_AGENT, "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return {**headers, **(extra or {})}

    async def _call(
        self,
        method: str,
        path: str,
        *,
        body: bytes | None = None,
        params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> tuple[bytes, CIMultiDictProxy[str]]:
        """The answer's body and headers; an error status raises its :class:`ApiError`."""
        extra = dict(headers or {})
        if body is not None:
            extra["Content-Type"] = "application/json"
        try:
            async with self._http().request(
                method,
                self.base_url + path,
                data=body,
                params=params,
                headers=self._headers(extra),
                timeout=aiohttp.ClientTimeout(total=self.timeout),
            ) as resp:
                data = await resp.read()
                if resp.status >= 400:
                    raise error_from_response(resp.status, data, resp.headers)
                return data, resp.headers
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise TransportError(f"{method} {path}: {exc!r}") from exc

    async def submit(
        self,
        task: Task,
        input: str | Sequence[str],
        *,
        model: str | None = None,
        params: Mapping[str, Any] | None = None,
        priority: Priority | None = None,
        deadline_s: int | None = None,
        metadata: Mapping[str, Any] | None = None,
        callback_url: str | None = None,
        idempotency_key: str | None = None,
    ) -> Accepted:
        """``POST /v1/requests``: queued at once; follow it with :meth:`wait` or :meth:`events`."""
        doc: dict[str, Any] = {
            "task": task,
            "input": input if isinstance(input, str) else list(input),
        }
        optional = {
            "model": model,
            "params": dict(params) if params is not None else None,
            "priority": priority,
            "deadline_s": deadline_s,
            "metadata": dict(metadata) if metadata is not None else None,
            "callback_url": callback_url,
        }
        doc.update({k: v for k, v in optional.items() if v is not None})
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        data, resp_headers = await self._call(
            "POST", "/v1/requests", body=encode(doc), headers=headers
        )
        accepted = decode(data, Accepted)
        accepted.replayed = resp_headers.get("Idempotent-Replayed", "").lower() == "true"
        accepted.rate_limits = RateLimits.from_headers(resp_headers)
        return accepted

    async def get(self, request_id: str) -> RequestDoc:
        data, _ = await self._call("GET", f"/v1/requests/{_path_id(request_id)}")
        return decode(data, RequestDoc)

    async def list_requests(
        self, *, status: Status | None = None, limit: int | None = None, after: str | None = None
    ) -> RequestPage:
        """One page of the caller's requests, newest first; pass ``page.next_after`` as ``after``."""
        query = {
            "status": status,
            "limit": str(limit) if limit is not None else None,
            "after": after,
        }
        params = {k: v for k, v in query.items() if v is not None}
        data, _ = await self._call("GET", "/v1/requests", params=params)
        return decode(data, RequestPage)

    async def cancel(self, request_id: str) -> CancelAccepted:
        """``DELETE``: raises :class:`Conflict` if the request is already terminal."""
        data, _ = await self._call("DELETE", f"/v1/requests/{_path_id(request_id)}")
        return decode(data, CancelAccepted)

    async def quota(self) -> Quota:
        data, _ = await self._call("GET", "/v1/quota")
        return decode(data, Quota)

    async def models(self) -> ModelList:
        data, _ = await self._call("GET", "/v1/models")
        return decode(data, ModelList)

    async def stream_token(self, request_id: str) -> StreamToken:
        """A short-lived token that opens this request's event stream without the API key (for a browser)."""
        data, _ = await self._call("POST", f"/v1/requests/{_path_id(request_id)}/events/token")
        return decode(data, StreamToken)

    async def wait(self, request_id: str, *, timeout: float | None = None) -> RequestDoc:
        """The request's terminal document, followed on its event stream (which costs no quota).

        Raises :class:`WaitTimeout` (carrying the last state seen) after ``timeout`` seconds.
        """
        last: RequestDoc | None = None
        try:
            async with asyncio.timeout(timeout):
                async with contextlib.aclosing(self.events(request_id)) as events:
                    async for event in events:
                        last = event.data
                        if event.terminal:
                            return event.data
        except TimeoutError as exc:
            raise WaitTimeout(request_id, timeout or 0.0, last) from exc
        raise ProtocolError(f"the event stream of {request_id} ended before a terminal status")

    async def events(
        self, request_id: str, *, last_event_id: int | None = None, token: str | None = None
    ) -> AsyncGenerator[Event, None]:
        """The request's events until its terminal one, resumed with ``Last-Event-ID`` after a drop.

        A new stream starts at the current state; ``last_event_id`` resumes after that event.
        ``token`` (from :meth:`stream_token`) opens it instead of the API key. Close it early with
        ``contextlib.aclosing`` (or ``break`` and let it be collected).
        """
        last = last_event_id
        failures = 0
        delay = self.reconnect_delay
        while True:
            parser = SseParser()
            try:
                # Closed with this generator: a consumer that stops early releases the connection at once.
                async with contextlib.aclosing(
                    self._stream(request_id, last, token, parser)
                ) as stream:
                    async for event in stream:
                        last, failures = event.id, 0
                        yield event
                        if event.terminal:
                            return
                cause: TransportError | Unavailable = TransportError(
                    f"the event stream of {request_id} ended before a terminal status"
                )
            except (TransportError, Unavailable) as exc:
                cause = exc
            if parser.retry_ms is not None:
                delay = parser.retry_ms / 1000
            failures += 1
            if failures > self.max_reconnects:
                raise cause
            wait = cause.retry_after if isinstance(cause, Unavailable) else None
            await asyncio.sleep(wait if wait is not None else delay)

    async def _stream(
        self, request_id: str, last: int | None, token: str | None, parser: SseParser
    ) -> AsyncGenerator[Event, None]:
        """One connection's events; a broken connection raises :class:`TransportError`."""
        headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
        if last is not None:
            headers["Last-Event-ID"] = str(last)
        path = f"/v1/requests/{_path_id(request_id)}/events"
        timeout = aiohttp.ClientTimeout(
            total=None, connect=self.timeout, sock_read=self.read_timeout
        )
        try:
            async with self._http().get(
                self.base_url + path,
                headers=self._headers(headers),
                params={"token": token} if token is not None else None,
                timeout=timeout,
            ) as resp:
                if resp.status >= 400:
                    raise error_from_response(resp.status, await resp.read(), resp.headers)
                if not resp.headers.get("Content-Type", "").startswith("text/event-stream"):
                    raise ProtocolError(f"{path} answered {resp.headers.get('Content-Type')!r}")
                async for chunk in resp.content.iter_any():
                    for raw in parser.feed(chunk):
                        yield event_of(raw)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise TransportError(f"GET {path}: {exc!r}") from exc
