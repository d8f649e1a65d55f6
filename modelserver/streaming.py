"""Streamed completions and chat completions in OpenAI's server-sent-events format: ``data: {chunk}``
lines, then ``data: [DONE]``.

Each chunk carries one word of one choice (the first word bare, later ones with their leading
space, so the pieces concatenate to the non-streamed text exactly); the last chunk of a choice
carries its ``finish_reason``. A completion chunk (``text_completion``) has the word in
``choices[i].text``; a chat chunk (``chat.completion.chunk``) in ``choices[i].delta.content``,
the first one with ``delta.role: "assistant"`` too. With ``stream_options.include_usage`` a final chunk with empty
``choices`` carries the usage, as OpenAI and vLLM send it. ``token_latency_ms`` paces the chunks
after the first. A client that goes away mid-stream stops the generation at the next chunk
(``streams_aborted``): nothing is generated for nobody.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import web

from modelserver.config import Faults, Stats
from modelserver.generator import Completion
from modelserver.validation import ChatRequest, CompletionRequest

__all__ = ["StreamTimes", "pieces", "stream_chat", "stream_completions"]

DONE = b"data: [DONE]\n\n"
MAX_RECORDED = 10_000


class StreamTimes:
    """With ``record_stream_times`` on: the wall-clock time each chunk of a prompt's stream was
    written, for ``bench.streaming`` (chunk sent -> SSE event received). Bounded; read and cleared
    by ``GET /admin/stream-times``."""

    def __init__(self) -> None:
        self.by_prompt: dict[str, list[float]] = {}

    def start(self, prompt: str) -> list[float]:
        if len(self.by_prompt) >= MAX_RECORDED:
            self.by_prompt.pop(next(iter(self.by_prompt)))
        times = self.by_prompt[prompt] = []
        return times

    def take(self) -> dict[str, list[float]]:
        taken, self.by_prompt = self.by_prompt, {}
        return taken


def pieces(text: str) -> list[str]:
    """The chunks ``text`` streams as: words, every one after the first with its leading space."""
    words = text.split(" ") if text else []
    return [w if i == 0 else f" {w}" for i, w in enumerate(words)]


def _frame(body: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(body) + b"\n\n"


async def stream_completions(
    request: web.Request,
    req: CompletionRequest,
    results: list[Completion],
    faults: Faults,
    stats: Stats,
    completion_id: str,
    times: StreamTimes | None = None,
) -> web.StreamResponse:
    """Write the completions of ``results`` as a stream of chunks; see the module docstring."""

    def choice(index: int, part: str, first: bool, finish: str | None) -> dict[str, Any]:
        return {"index": index, "text": part, "logprobs": None, "finish_reason": finish}

    return await _stream(
        request, "text_completion", req.model, req.prompts, results, choice, req.include_usage,
        faults, stats, completion_id, times,
    )  # fmt: skip


async def stream_chat(
    request: web.Request,
    req: ChatRequest,
    prompt: str,
    result: Completion,
    faults: Faults,
    stats: Stats,
    completion_id: str,
    times: StreamTimes | None = None,
) -> web.StreamResponse:
    """Write a chat reply as a stream of ``chat.completion.chunk`` chunks (``prompt``: the chat rendered,
    the key of its recorded times); see the module docstring."""

    def choice(index: int, part: str, first: bool, finish: str | None) -> dict[str, Any]:
        delta = {"role": "assistant", "content": part} if first else {"content": part}
        return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}

    return await _stream(
        request, "chat.completion.chunk", req.model, [prompt], [result], choice, req.include_usage,
        faults, stats, completion_id, times,
    )  # fmt: skip


async def _stream(
    request: web.Request,
    obj: str,
    model: str,
    prompts: list[str],
    results: list[Completion],
    choice: Callable[[int, str, bool, str | None], dict[str, Any]],
    include_usage: bool,
    faults: Faults,
    stats: Stats,
    completion_id: str,
    times: StreamTimes | None,
) -> web.StreamResponse:
    resp = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await resp.prepare(request)
    stats.streams_started += 1
    created = int(time.time())

    def chunk(choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> bytes:
        body: dict[str, Any] = {
            "id": completion_id,
            "object": obj,
            "created": created,
            "model": model,
            "choices": choices,
        }
        if usage is not None:
            body["usage"] = usage
        return _frame(body)

    try:
        first = True
        for index, result in enumerate(results):
            sent = times.start(prompts[index]) if times is not None else None
            parts = pieces(result.text) or [""]
            for n, part in enumerate(parts):
                if not first and faults.token_latency_ms:
                    await asyncio.sleep(faults.token_latency_ms / 1000)
                first = False
                finish = result.finish_reason if n == len(parts) - 1 else None
                await resp.write(chunk([choice(index, part, n == 0, finish)]))
                if sent is not None:
                    sent.append(time.time())
                stats.stream_chunks += 1
        if include_usage:
            prompt = sum(r.prompt_tokens for r in results)
            completion = sum(r.completion_tokens for r in results)
            usage = {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
            }
            await resp.write(chunk([], usage))
        await resp.write(DONE)
        await resp.write_eof()
    except ConnectionResetError:
        # The client closed the stream (a cancelled request): stop generating here.
        stats.streams_aborted += 1
        return resp
    except asyncio.CancelledError:
        stats.streams_aborted += 1
        raise
    stats.streams_completed += 1
    return resp
