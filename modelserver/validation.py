"""Request parsing for the model server: turns bodies into typed requests or a 400 ``ApiError``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from modelserver.config import EMBEDDING_DIM, EMBEDDING_MODEL_ALIASES
from modelserver.generator import DEFAULT_MAX_TOKENS

MAX_TOKENS_LIMIT = 8192
CHAT_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})


class ApiError(Exception):
    """An OpenAI-style error answer: ``{"error": {"message", "type", "code"}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.retry_after = retry_after

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "code": self.code,
                "param": self.param,
            }
        }


def invalid(message: str, param: str | None = None, code: str = "invalid_request") -> ApiError:
    return ApiError(400, message, code=code, param=param)


@dataclass(frozen=True)
class EmbeddingRequest:
    model: str
    texts: list[str]
    encoding_format: str


@dataclass(frozen=True)
class CompletionRequest:
    model: str
    prompts: list[str]
    max_tokens: int
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the usage


@dataclass(frozen=True)
class ChatRequest:
    model: str
    messages: list[tuple[str, str]]
    max_tokens: int
    stream: bool = False
    include_usage: bool = False


def _object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise invalid("The request body must be a JSON object.")
    return body


def _model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise invalid("'model' is required and must be a non-empty string.", "model")
    return model


def _str_or_list(value: Any, param: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return value
    raise invalid(f"'{param}' must be a string or a non-empty list of strings.", param)


def _max_tokens(body: dict[str, Any]) -> int:
    value = body.get("max_completion_tokens", body.get("max_tokens"))
    if value is None:
        return DEFAULT_MAX_TOKENS
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_TOKENS_LIMIT:
        raise invalid(
            f"'max_tokens' must be an integer from 1 to {MAX_TOKENS_LIMIT}.", "max_tokens"
        )
    return value


def _stream(body: dict[str, Any]) -> tuple[bool, bool]:
    """``stream`` and ``stream_options.include_usage``, as OpenAI's completions take them."""
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise invalid("'stream' must be a boolean.", "stream")
    options = body.get("stream_options")
    if options is None:
        return stream, False
    if not stream:
        raise invalid("'stream_options' is only allowed when 'stream' is true.", "stream_options")
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise invalid("'stream_options.include_usage' must be a boolean.", "stream_options")
    return stream, bool(options.get("include_usage", False))


def _common_generation(body: dict[str, Any], *, streams: bool = False) -> None:
    temperature = body.get("temperature")
    if temperature is not None and (
        isinstance(temperature, bool)
        or not isinstance(temperature, int | float)
        or not 0 <= temperature <= 2
    ):
        raise invalid("'temperature' must be a number from 0 to 2.", "temperature")
    if body.get("stream") and not streams:
        raise invalid("Streaming is not supported by this server.", "stream", code="unsupported")


def parse_embedding(raw: Any, batch_max: int) -> EmbeddingRequest:
    body = _object(raw)
    model = _model(body)
    if model not in EMBEDDING_MODEL_ALIASES:
        raise invalid(
            f"The model '{model}' does not exist or is not served here.", "model", "model_not_found"
        )
    if "input" not in body:
        raise invalid("'input' is required.", "input")
    texts = _str_or_list(body["input"], "input")
    if len(texts) > batch_max:
        raise invalid(f"At most {batch_max} inputs per request, got {len(texts)}.", "input")
    encoding_format = body.get("encoding_format") or "float"
    if encoding_format not in ("float", "base64"):
        raise invalid("'encoding_format' must be 'float' or 'base64'.", "encoding_format")
    dimensions = body.get("dimensions")
    if dimensions is not None and dimensions != EMBEDDING_DIM:
        raise invalid(f"'dimensions' must be {EMBEDDING_DIM} for this model.", "dimensions")
    return EmbeddingRequest(model=model, texts=texts, encoding_format=encoding_format)


def parse_completion(raw: Any) -> CompletionRequest:
    body = _object(raw)
    model = _model(body)
    if "prompt" not in body:
        raise invalid("'prompt' is required.", "prompt")
    prompts = _str_or_list(body["prompt"], "prompt")
    _common_generation(body, streams=True)
    stream, include_usage = _stream(body)
    return CompletionRequest(
        model=model,
        prompts=prompts,
        max_tokens=_max_tokens(body),
        stream=stream,
        include_usage=include_usage,
    )


def _content(value: Any, i: int) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    # The content-parts form: [{"type": "text", "text": "..."}, ...]
    if isinstance(value, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
        for p in value
    ):
        return "".join(p["text"] for p in value)
    raise invalid(
        f"messages[{i}].content must be a string or a list of text parts.", f"messages[{i}].content"
    )


def parse_chat(raw: Any) -> ChatRequest:
    body = _object(raw)
    model = _model(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("'messages' must be a non-empty list.", "messages")
    parsed: list[tuple[str, str]] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in CHAT_ROLES:
            raise invalid(f"messages[{i}] must be an object with a valid 'role'.", f"messages[{i}]")
        parsed.append((message["role"], _content(message.get("content"), i)))
    _common_generation(body, streams=True)
    stream, include_usage = _stream(body)
    return ChatRequest(
        model=model,
        messages=parsed,
        max_tokens=_max_tokens(body),
        stream=stream,
        include_usage=include_usage,
    )


FAULT_FIELDS = frozenset(
    {"error_rate", "error_status", "latency_ms", "token_latency_ms", "fail_next", "apply_to_embeddings",
     "record_stream_times"}
)


def _int_field(body: dict[str, Any], name: str, low: int, high: int) -> int:
    value = body[name]
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise invalid(f"'{name}' must be an integer from {low} to {high}.", name)
    return value


def parse_faults(raw: Any) -> dict[str, Any]:
    """Validated changes for :class:`modelserver.config.Faults`; absent fields stay as they are."""
    body = _object(raw)
    unknown = set(body) - FAULT_FIELDS
    if unknown:
        raise invalid(f"Unknown fields: {', '.join(sorted(unknown))}.")
    changes: dict[str, Any] = {}
    if "error_rate" in body:
        rate = body["error_rate"]
        if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0 <= rate <= 1:
            raise invalid("'error_rate' must be a number from 0 to 1.", "error_rate")
        changes["error_rate"] = float(rate)
    if "error_status" in body:
        changes["error_status"] = _int_field(body, "error_status", 400, 599)
    if "latency_ms" in body:
        changes["latency_ms"] = _int_field(body, "latency_ms", 0, 600_000)
    if "token_latency_ms" in body:
        changes["token_latency_ms"] = _int_field(body, "token_latency_ms", 0, 60_000)
    if "fail_next" in body:
        changes["fail_next"] = _int_field(body, "fail_next", 0, 1_000_000)
    if "apply_to_embeddings" in body:
        if not isinstance(body["apply_to_embeddings"], bool):
            raise invalid("'apply_to_embeddings' must be a boolean.", "apply_to_embeddings")
        changes["apply_to_embeddings"] = body["apply_to_embeddings"]
    if "record_stream_times" in body:
        if not isinstance(body["record_stream_times"], bool):
            raise invalid("'record_stream_times' must be a boolean.", "record_stream_times")
        changes["record_stream_times"] = body["record_stream_times"]
    return changes
