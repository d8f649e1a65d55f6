"""Client of an OpenAI-compatible model service (ours, vLLM, Ollama, TGI, OpenAI): embeddings, completions, chat.

Only the documented OpenAI wire format is used (``POST {base}/embeddings``,
``POST {base}/completions``, and ``POST {base}/chat/completions`` for a
generation whose params carry ``messages``: :func:`generation_call`), so
swapping the service is a change of a
backend's ``url`` and key in the routes file (or of ``INFERSTREAM_MODEL_URL``
and ``INFERSTREAM_MODEL_API_KEY``, the one-backend shorthand). One client per
backend (``workers/backends.py``).

Failures map onto the error tree: timeouts, connection errors, 408, 409,
425, 429 and 5xx raise :class:`RetryableModelError` (with the ``Retry-After``
seconds, if sent: :func:`inferstream.retrying.parse_retry_after`); other 4xx (400, 401, 403, 404, 422, ...) and answers that
do not parse raise :class:`FatalModelError`: the same request would fail again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import aiohttp
import orjson
from mode import Service

from inferstream.errors import FatalModelError, RetryableModelError
from inferstream.retrying import parse_retry_after
from inferstream.settings import Settings

__all__ = ["ModelClient", "OnDelta", "generation_call", "is_chat", "is_retryable_status"]

log = logging.getLogger(__name__)

Usage = dict[str, int]
OnDelta = Callable[[str], Awaitable[None]]
"""Called with each piece of streamed text, in order, before the next chunk is read."""


# 4xx that say "not now" rather than "not this": timeout, conflict, too early, too many requests.
RETRYABLE_4XX = frozenset({408, 409, 425, 429})


def is_retryable_status(status: int) -> bool:
    """Whether an HTTP error status from the model is worth another attempt."""
    return status >= 500 or status in RETRYABLE_4XX


CHAT_PATH = "/chat/completions"


def is_chat(params: Mapping[str, Any] | None) -> bool:
    """Whether a generation is a chat: its params carry the ``messages`` (the Batch API's chat lines)."""
    return params is not None and "messages" in params


def generation_call(model: str, prompt: str, params: Mapping[str, Any] | None) -> tuple[str, dict[str, Any]]:
    """The path and payload of one generation: ``/chat/completions`` with the messages (the prompt,
    their rendering, is not sent) when ``params`` carry them, else ``/completions`` with the prompt.
    The other params (max_tokens, temperature, ...) are passed through either way."""
    if is_chat(params):
        return CHAT_PATH, {**(params or {}), "model": model}
    return "/completions", {**(params or {}), "model": model, "prompt": prompt}


def _usage(body: dict[str, Any]) -> Usage:
    """The contract's three figures, whatever subset the server sent (embeddings omit completions)."""
    raw = body.get("usage") or {}
    if not isinstance(raw, dict):
        raw = {}
    figures = {k: int(v) for k, v in raw.items() if k.endswith("_tokens") and isinstance(v, int | float)}
    prompt = figures.get("prompt_tokens", 0)
    completion = figures.get("completion_tokens", 0)
    return {
        **figures,
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": figures.get("total_tokens", prompt + completion),
    }


def _error_text(body: bytes) -> str:
    try:
        data = orjson.loads(body)
        message = data["error"]["message"]
        return str(message)
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return body[:300].decode("utf-8", "replace")


class ModelClient(Service):
    """One aiohttp session to the model service; opened lazily, closed on stop."""

    def __init__(
        self,
        settings: Settings,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout_s: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.settings = settings
        self.base_url = (base_url or settings.model_url).rstrip("/")
        self._api_key = settings.model_api_key if api_key is None else api_key
        self.timeout_s = settings.ml_call_timeout_s if timeout_s is None else timeout_s
        self._session: aiohttp.ClientSession | None = None
        self._lock = asyncio.Lock()

    async def on_stop(self) -> None:
        await self.close()

    async def _ensure(self) -> aiohttp.ClientSession:
        async with self._lock:
            if self._session is None or self._session.closed:
                headers = {"Content-Type": "application/json"}
                if self._api_key:
                    headers["Authorization"] = f"Bearer {self._api_key}"
                self._session = aiohttp.ClientSession(
                    headers=headers,
                    timeout=aiohttp.ClientTimeout(total=self.timeout_s),
                    connector=aiohttp.TCPConnector(limit=0),
                )
            return self._session

    async def close(self) -> None:
        async with self._lock:
            session, self._session = self._session, None
            if session is not None:
                await session.close()

    async def _post(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        session = await self._ensure()
        url = f"{self.base_url}{path}"
        try:
            async with session.post(url, data=orjson.dumps(payload)) as resp:
                body = await resp.read()
                status = resp.status
                retry_after = parse_retry_after(resp.headers.get("Retry-After"))
        except TimeoutError as exc:
            raise RetryableModelError(f"model call timed out after {self.timeout_s}s") from exc
        except aiohttp.ClientError as exc:
            raise RetryableModelError(f"model service unreachable: {exc!r}") from exc
        if status >= 400 and is_retryable_status(status):
            raise RetryableModelError(_error_text(body), status=status, retry_after=retry_after)
        if status >= 400:
            raise FatalModelError(_error_text(body), status=status)
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise FatalModelError(f"model answered {status} with a body that is not JSON", status=status) from exc
        if not isinstance(data, dict):
            raise FatalModelError("model answer is not a JSON object", status=status)
        return data

    async def embed(self, model: str, texts: list[str]) -> tuple[list[list[float]], Usage]:
        """One ``/embeddings`` call for all ``texts``; vectors in input order."""
        data = await self._post("/embeddings", {"model": model, "input": texts})
        try:
            items = sorted(data["data"], key=lambda item: item["index"])
            vectors = [list(item["embedding"]) for item in items]
        except (KeyError, TypeError) as exc:
            raise FatalModelError(f"malformed embeddings answer: {exc!r}") from exc
        if len(vectors) != len(texts):
            raise FatalModelError(f"asked for {len(texts)} embeddings, got {len(vectors)}")
        return vectors, _usage(data)

    async def generate(self, model: str, prompt: str, params: dict[str, Any] | None = None) -> tuple[str, Usage]:
        """One ``/completions`` call, or ``/chat/completions`` when ``params`` carry ``messages``;
        ``params`` (max_tokens, temperature, ...) are passed through. The text and the usage."""
        path, payload = generation_call(model, prompt, params)
        data = await self._post(path, payload)
        chat = path == CHAT_PATH
        try:
            choice = data["choices"][0]
            text = (choice["message"]["content"] or "") if chat else choice["text"]
        except (KeyError, IndexError, TypeError) as exc:
            raise FatalModelError(f"malformed {'chat ' if chat else ''}completions answer: {exc!r}") from exc
        if not isinstance(text, str):
            raise FatalModelError(f"{'chat reply' if chat else 'completion text'} is not a string")
        return text, _usage(data)

    async def generate_stream(
        self, model: str, prompt: str, params: dict[str, Any] | None, on_delta: OnDelta
    ) -> tuple[str, Usage]:
        """One ``/completions`` (with ``messages``: ``/chat/completions``) call with ``stream: true``:
        each chunk's text (``choices[0].text``; a chat's ``choices[0].delta.content``) to ``on_delta``,
        then the whole text and the usage of the last chunk (``stream_options.include_usage``).

        A stream that breaks off before ``data: [DONE]`` is retryable, like a dropped call;
        cancelling the caller closes the connection, which stops the generation upstream.
        """
        path, payload = generation_call(model, prompt, params)
        payload.update(stream=True, stream_options={"include_usage": True})
        chat = path == CHAT_PATH
        session = await self._ensure()
        url = f"{self.base_url}{path}"
        parts: list[str] = []
        usage: dict[str, Any] = {}
        try:
            async with session.post(url, data=orjson.dumps(payload)) as resp:
                if resp.status >= 400:
                    body = await resp.read()
                    if is_retryable_status(resp.status):
                        retry_after = parse_retry_after(resp.headers.get("Retry-After"))
                        raise RetryableModelError(_error_text(body), status=resp.status, retry_after=retry_after)
                    raise FatalModelError(_error_text(body), status=resp.status)
                done = False
                async for line in resp.content:
                    if not line.startswith(b"data:"):
                        continue  # blank separators, comments, other SSE fields
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        done = True
                        break
                    text, chunk_usage = _chunk(data, chat)
                    if chunk_usage:
                        usage = chunk_usage
                    if text:
                        parts.append(text)
                        await on_delta(text)
                if not done:
                    raise RetryableModelError("model stream ended before [DONE]")
        except TimeoutError as exc:
            raise RetryableModelError(f"model call timed out after {self.timeout_s}s") from exc
        except aiohttp.ClientError as exc:
            raise RetryableModelError(f"model stream broke off: {exc!r}") from exc
        return "".join(parts), _usage({"usage": usage})


def _chunk(data: bytes, chat: bool = False) -> tuple[str, dict[str, Any] | None]:
    """The first choice's text (a chat's ``delta.content``) and the usage (if any) of one streamed chunk."""
    try:
        chunk = orjson.loads(data)
        choices = chunk.get("choices") or []
        first = next((c for c in choices if c.get("index", 0) == 0), None)
        if first is None:
            text = ""
        elif chat:
            text = (first.get("delta") or {}).get("content") or ""  # the role-only and last chunks have none
        else:
            text = first.get("text") or ""
        usage = chunk.get("usage")
    except (orjson.JSONDecodeError, AttributeError, TypeError) as exc:
        raise FatalModelError(f"malformed {'chat ' if chat else ''}completions chunk: {exc!r}") from exc
    if not isinstance(text, str):
        raise FatalModelError("streamed completion text is not a string")
    return text, usage if isinstance(usage, dict) else None
