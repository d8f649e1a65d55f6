"""The OpenAI-compatible HTTP service: embeddings, completions, chat, and admin knobs for tests."""

from __future__ import annotations

import asyncio
import base64
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from inferstream.tokens import count_tokens
from modelserver.config import (
    EMBEDDING_MODEL,
    GENERATION_MODEL,
    RETRY_AFTER_STATUSES,
    Faults,
    ServerConfig,
    Stats,
)
from modelserver.embeddings import Embedder
from modelserver.generator import Completion, complete, complete_chat, render_chat
from modelserver.streaming import StreamTimes, stream_chat, stream_completions
from modelserver.validation import (
    ApiError,
    invalid,
    parse_chat,
    parse_completion,
    parse_embedding,
    parse_faults,
)

log = logging.getLogger(__name__)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
SERVER_KEY: web.AppKey[ModelServer] = web.AppKey("modelserver")


def json_response(
    body: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    # orjson serializes the numpy embedding rows directly, far faster than json + tolist().
    return web.Response(
        body=orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY),
        status=status,
        content_type="application/json",
        headers=headers,
    )


def error_response(err: ApiError) -> web.Response:
    headers = {"Retry-After": str(int(err.retry_after))} if err.retry_after is not None else None
    return json_response(err.body(), status=err.status, headers=headers)


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error leaves as OpenAI-style JSON, including aiohttp's own 404/405/413."""
    try:
        return await handler(request)
    except ApiError as err:
        return error_response(err)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        kind = "invalid_request_error" if exc.status < 500 else "server_error"
        response = error_response(
            ApiError(exc.status, exc.reason, type=kind, code=exc.reason.lower().replace(" ", "_"))
        )
        if "Allow" in exc.headers:
            response.headers["Allow"] = exc.headers["Allow"]
        return response


async def read_json(request: web.Request) -> Any:
    raw = await request.read()
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise invalid(f"The request body is not valid JSON: {exc}") from exc


def _usage(prompt_tokens: int, completion_tokens: int | None = None) -> dict[str, int]:
    if completion_tokens is None:
        return {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


class ModelServer:
    """The service's state (config, faults, counters, model) and its request handlers."""

    def __init__(self, config: ServerConfig, embedder: Embedder | None = None) -> None:
        self.config = config
        self.faults = Faults(
            latency_ms=config.latency_ms,
            token_latency_ms=config.token_latency_ms,
            error_rate=config.error_rate,
            error_status=config.error_status,
        )
        if config.seed is not None:
            self.faults.rng.seed(config.seed)
        self.stats = Stats()
        self.stream_times = StreamTimes()
        self.embedder = (
            embedder
            if embedder is not None
            else (Embedder(config.torch_threads) if config.embeddings else None)
        )

    async def _inject(self, what: str) -> None:
        """Apply injected latency and failure to one model call."""
        fail = self.faults.should_fail()
        status = self.faults.error_status
        if self.faults.latency_ms:
            await asyncio.sleep(self.faults.latency_ms / 1000)
        if not fail:
            return
        if what == "embeddings":
            self.stats.embedding_failures += 1
        else:
            self.stats.generate_failures += 1
        if status == 429:
            kind, code = "rate_limit_error", "rate_limit_exceeded"
        elif status >= 500:
            kind, code = "server_error", "injected_failure"
        else:
            kind, code = "invalid_request_error", "injected_failure"
        retry_after = 1.0 if status in RETRY_AFTER_STATUSES else None
        raise ApiError(
            status,
            f"Injected {what} failure (simulated).",
            type=kind,
            code=code,
            retry_after=retry_after,
        )

    # ---- OpenAI endpoints ----------------------------------------------
    async def embeddings(self, request: web.Request) -> web.Response:
        req = parse_embedding(await read_json(request), self.config.embed_batch_max)
        if self.embedder is None or not self.embedder.loaded:
            raise ApiError(
                503,
                "Embeddings are disabled on this server.",
                type="server_error",
                code="embeddings_disabled",
            )
        self.stats.embedding_calls += 1
        self.stats.embedding_inputs += len(req.texts)
        self.stats.batch_sizes[len(req.texts)] += 1
        if self.faults.apply_to_embeddings:
            await self._inject("embeddings")
        vectors = await self.embedder.embed(req.texts)
        data = [
            {
                "object": "embedding",
                "index": i,
                "embedding": base64.b64encode(row.tobytes()).decode()
                if req.encoding_format == "base64"
                else row,
            }
            for i, row in enumerate(vectors)
        ]
        tokens = count_tokens(req.texts)
        return json_response(
            {"object": "list", "data": data, "model": req.model, "usage": _usage(tokens)}
        )

    def _count_generate(self, inputs: int) -> None:
        self.stats.generate_calls += 1
        self.stats.generate_inputs += inputs
        self.stats.generate_batch_sizes[inputs] += 1

    async def completions(self, request: web.Request) -> web.StreamResponse:
        req = parse_completion(await read_json(request))
        self._count_generate(len(req.prompts))
        await self._inject("generate")
        results = [complete(p, req.max_tokens) for p in req.prompts]
        if req.stream:
            return await stream_completions(
                request, req, results, self.faults, self.stats, f"cmpl-{uuid.uuid4().hex}",
                self.stream_times if self.faults.record_stream_times else None,
            )  # fmt: skip
        choices = [
            {"index": i, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason}
            for i, c in enumerate(results)
        ]
        return json_response(self._envelope("cmpl", "text_completion", req.model, choices, results))

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        req = parse_chat(await read_json(request))
        self._count_generate(1)
        await self._inject("generate")
        result = complete_chat(req.messages, req.max_tokens)
        if req.stream:
            return await stream_chat(
                request, req, render_chat(req.messages), result, self.faults, self.stats,
                f"chatcmpl-{uuid.uuid4().hex}", self.stream_times if self.faults.record_stream_times else None,
            )  # fmt: skip
        choices = [
            {
                "index": 0,
                "message": {"role": "assistant", "content": result.text},
                "logprobs": None,
                "finish_reason": result.finish_reason,
            }
        ]
        return json_response(
            self._envelope("chatcmpl", "chat.completion", req.model, choices, [result])
        )

    @staticmethod
    def _envelope(
        prefix: str, obj: str, model: str, choices: list[dict[str, Any]], results: list[Completion]
    ) -> dict[str, Any]:
        return {
            "id": f"{prefix}-{uuid.uuid4().hex}",
            "object": obj,
            "created": int(time.time()),
            "model": model,
            "choices": choices,
            "usage": _usage(
                sum(r.prompt_tokens for r in results), sum(r.completion_tokens for r in results)
            ),
        }

    async def models(self, request: web.Request) -> web.Response:
        names = [GENERATION_MODEL] + ([EMBEDDING_MODEL] if self.config.embeddings else [])
        data = [
            {"id": n, "object": "model", "created": 0, "owned_by": "inferstream"} for n in names
        ]
        return json_response({"object": "list", "data": data})

    async def healthz(self, request: web.Request) -> web.Response:
        loaded = self.embedder is not None and self.embedder.loaded
        return json_response({"status": "ok", "embeddings_loaded": loaded})

    # ---- admin, for tests ------------------------------------------------
    async def get_faults(self, request: web.Request) -> web.Response:
        return json_response(self.faults.as_dict())

    async def set_faults(self, request: web.Request) -> web.Response:
        self.faults.update(parse_faults(await read_json(request)))
        log.info("faults now %s", self.faults.as_dict())
        return json_response(self.faults.as_dict())

    async def get_stats(self, request: web.Request) -> web.Response:
        return json_response(self.stats.as_dict())

    async def take_stream_times(self, request: web.Request) -> web.Response:
        return json_response(self.stream_times.take())

    async def reset_stats(self, request: web.Request) -> web.Response:
        self.stats.reset()
        return json_response(self.stats.as_dict())

    async def lifecycle(self, app: web.Application) -> AsyncIterator[None]:
        """Load the model before the site accepts connections; release it on shutdown."""
        if self.embedder is not None:
            await self.embedder.start()
        try:
            yield
        finally:
            if self.embedder is not None:
                await self.embedder.close()


def build_app(config: ServerConfig, embedder: Embedder | None = None) -> web.Application:
    """The aiohttp application; the model loads in its startup (``AppRunner.setup()``)."""
    server = ModelServer(config, embedder)
    app = web.Application(middlewares=[errors_middleware], client_max_size=config.max_body_bytes)
    app[SERVER_KEY] = server
    app.cleanup_ctx.append(server.lifecycle)
    app.router.add_post("/v1/embeddings", server.embeddings)
    app.router.add_post("/v1/completions", server.completions)
    app.router.add_post("/v1/chat/completions", server.chat_completions)
    app.router.add_get("/v1/models", server.models)
    app.router.add_get("/healthz", server.healthz)
    app.router.add_get("/admin/faults", server.get_faults)
    app.router.add_post("/admin/faults", server.set_faults)
    app.router.add_get("/admin/stats", server.get_stats)
    app.router.add_post("/admin/stats/reset", server.reset_stats)
    app.router.add_get("/admin/stream-times", server.take_stream_times)
    return app
