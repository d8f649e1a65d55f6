"""The blocking client: :class:`AsyncClient` run on a private event loop, for scripts and notebooks without asyncio."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar

from inferstream.client._async import API_KEY_ENV, BASE_URL_ENV, DEFAULT_BASE_URL, AsyncClient
from inferstream.client.models import (
    Accepted,
    CancelAccepted,
    Event,
    ModelList,
    Priority,
    Quota,
    RequestDoc,
    RequestPage,
    Status,
    StreamToken,
    Task,
)

T = TypeVar("T")


class Client:
    """The same calls as :class:`AsyncClient`, blocking; one event loop and one connection pool per client.

    Not for use inside a running event loop (use :class:`AsyncClient` there) nor from several
    threads at once.
    """

    def __init__(
        self, base_url: str = DEFAULT_BASE_URL, api_key: str | None = None, **kwargs: Any
    ) -> None:
        self._runner = asyncio.Runner()
        self._client = AsyncClient(base_url, api_key, **kwargs)
        self._closed = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str], **kwargs: Any) -> Client:
        """A client for ``INFERSTREAM_BASE_URL`` and ``INFERSTREAM_API_KEY`` of ``environ`` (pass ``os.environ``)."""
        return cls(
            environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL, environ.get(API_KEY_ENV), **kwargs
        )

    @property
    def base_url(self) -> str:
        return self._client.base_url

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._runner.run(self._client.close())
        finally:
            self._runner.close()

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self._runner.run(coro)

    def submit(
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
        return self._run(
            self._client.submit(
                task,
                input,
                model=model,
                params=params,
                priority=priority,
                deadline_s=deadline_s,
                metadata=metadata,
                callback_url=callback_url,
                idempotency_key=idempotency_key,
            )
        )

    def get(self, request_id: str) -> RequestDoc:
        return self._run(self._client.get(request_id))

    def list_requests(
        self, *, status: Status | None = None, limit: int | None = None, after: str | None = None
    ) -> RequestPage:
        return self._run(self._client.list_requests(status=status, limit=limit, after=after))

    def cancel(self, request_id: str) -> CancelAccepted:
        return self._run(self._client.cancel(request_id))

    def quota(self) -> Quota:
        return self._run(self._client.quota())

    def models(self) -> ModelList:
        return self._run(self._client.models())

    def stream_token(self, request_id: str) -> StreamToken:
        return self._run(self._client.stream_token(request_id))

    def wait(self, request_id: str, *, timeout: float | None = None) -> RequestDoc:
        return self._run(self._client.wait(request_id, timeout=timeout))

    def events(
        self, request_id: str, *, last_event_id: int | None = None, token: str | None = None
    ) -> Iterator[Event]:
        """The request's events until its terminal one; leaving the loop early closes the stream."""
        stream = self._client.events(request_id, last_event_id=last_event_id, token=token)

        async def step() -> Event:
            return await anext(stream)

        try:
            while True:
                try:
                    yield self._run(step())
                except StopAsyncIteration:
                    return
        finally:
            self._run(stream.aclose())
