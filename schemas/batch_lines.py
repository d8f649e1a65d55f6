"""The lines of a Batch API input file: structural checks at upload, and the parse for a batch's endpoint.

An input file is JSONL: one request per line, ``{"custom_id", "method":
"POST", "url", "body"}``. Every physical line counts (its 0-based index is
the line of its request, ``batch_line``), so numbers in errors are the
file's own, 1-based; a final newline ends the last line, and an empty line
anywhere else is a problem of that line. :func:`check_upload_line` is what
``POST /v1/files`` checks while the upload streams in (the shape of each
line, ``custom_id`` unique); :func:`parse_batch_lines` is what ``POST
/v1/batches`` checks before anything is charged: each body against the
endpoint's contract (msgspec models below), the model a route of the task,
and each line's token estimate, as admission computes it for one request.
The parse is deterministic, so a worker that restarts parses the stored file
again into the same lines.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

from inferstream.errors import InvalidRequest
from inferstream.tokens import estimate_tokens
from schemas.api import MAX_INPUTS, MAX_TOKENS_LIMIT, MaxTokens, Temperature, Text, _nul_at
from schemas.records import Task

ENDPOINTS = ("/v1/embeddings", "/v1/completions", "/v1/chat/completions")
TASK_OF: dict[str, str] = {
    "/v1/embeddings": Task.EMBED.value,
    "/v1/completions": Task.GENERATE.value,
    "/v1/chat/completions": Task.GENERATE.value,
}
MAX_LISTED = 100  # problems listed in a 400; the message gives the count of all of them
MAX_STOP = 4

Model = Annotated[str, Meta(min_length=1)]
TopP = Annotated[float, Meta(ge=0, le=1)]
Stop = Annotated[str, Meta(min_length=1)] | Annotated[list[str], Meta(max_length=MAX_STOP)]
One = Literal[1]


@dataclass(frozen=True)
class BatchLine:
    """One line of an input file, parsed for its endpoint: what its InferenceRequest carries."""

    line: int  # 0-based index in the file
    custom_id: str
    task: str  # "embed" | "generate"
    model: str
    input: list[str]
    input_is_list: bool
    params: dict[str, Any] | None  # generate: max_tokens, temperature, ... ; chat: + "messages"
    estimated_tokens: int


class LineProblems(InvalidRequest):
    """400: lines of a file that cannot be used, each with its 1-based number (at most 100 listed)."""

    def __init__(self, errors: list[dict[str, Any]], count: int | None = None) -> None:
        total = len(errors) if count is None else count
        first = errors[0] if errors else None
        what = f"{total} invalid line{'s' if total != 1 else ''} in the file"
        if first is not None:
            what += f"; line {first['line']}: {first['message']}"
        super().__init__(what, errors=errors[:MAX_LISTED])
        self.errors = errors[:MAX_LISTED]
        self.count = total


class Problems:
    """Collects line problems: every one counted, the first :data:`MAX_LISTED` kept."""

    def __init__(self) -> None:
        self.listed: list[dict[str, Any]] = []
        self.count = 0

    def add(self, line_no: int, message: str) -> None:
        self.count += 1
        if len(self.listed) < MAX_LISTED:
            self.listed.append({"line": line_no, "message": message})

    def __bool__(self) -> bool:
        return self.count > 0

    def error(self) -> LineProblems:
        return LineProblems(self.listed, self.count)

    def raise_if_any(self) -> None:
        if self.count:
            raise self.error()


# ---- the line (upload) ------------------------------------------------------------------------


class _Line(Struct):
    custom_id: Annotated[str, Meta(min_length=1)]
    method: str
    url: str
    body: dict[str, Any]


_LINE_RULES = {
    "custom_id": "'custom_id' must be a non-empty string",
    "method": "'method' must be \"POST\"",
    "url": f"'url' must be one of {list(ENDPOINTS)}",
    "body": "'body' must be an object",
}
_AT = re.compile(r" - at `\$\.?(?P<path>[^`]*)`$")
_MISSING = re.compile(r"missing required field `(?P<name>[^`]+)`")
_line_decoder = msgspec.json.Decoder(_Line)


def _reason(exc: msgspec.ValidationError, rules: dict[str, str], prefix: str = "") -> str:
    """msgspec's error as a line's problem, naming the field (``body.messages[0].role``)."""
    text = str(exc)
    missing = _MISSING.search(text)
    at = _AT.search(text)
    path = at["path"] if at is not None else ""
    if missing is not None:
        field = f"{path}.{missing['name']}" if path else missing["name"]
        return f"missing '{prefix}{field}'"
    if text.startswith("Object contains unknown field"):
        named = re.search(r"`([^`]+)`", text)
        field = f"{path}.{named[1]}" if path and named else (named[1] if named else path)
        return f"unknown field '{prefix}{field}'"
    reason = text[: at.start()] if at is not None else text
    rule = rules.get(re.sub(r"\[\d+\]", "", path))
    if rule is not None:
        return f"{rule.replace('{path}', prefix + path)}: {reason}"
    return f"'{prefix}{path}': {reason}" if path else f"{prefix.rstrip('.') or 'line'} {reason}"


def _decode_line(raw: bytes) -> _Line | str:
    """The line's shape, or its problem."""
    if not raw.strip():
        return "empty line"
    try:
        line = _line_decoder.decode(raw)
    except msgspec.ValidationError as exc:
        if _AT.search(str(exc)) is None and str(exc).startswith("Expected `object`"):
            return "not a JSON object"
        return _reason(exc, _LINE_RULES)
    except msgspec.DecodeError as exc:
        return f"not valid JSON: {exc}"
    if line.method != "POST":
        return "'method' must be \"POST\""
    if line.url not in ENDPOINTS:
        return f"'url' must be one of {list(ENDPOINTS)}, not {line.url!r}"
    return line


def check_upload_line(raw: bytes, line_no: int, seen: set[str]) -> str | None:
    """The structural problem of line ``line_no`` (1-based), or None; adds its custom_id to ``seen``.

    ``raw`` is the line without its newline (a trailing ``\\r`` is allowed).
    """
    line = _decode_line(raw)
    if isinstance(line, str):
        return line
    if line.custom_id in seen:
        return f"'custom_id' {line.custom_id!r} is not unique in the file"
    seen.add(line.custom_id)
    return None


def split_lines(content: bytes) -> Iterator[bytes]:
    """The file's lines without their newlines (``\\n``; a ``\\r`` before it is stripped by the decoder
    as JSON whitespace); the empty text after a final newline is no line."""
    if not content:
        return
    lines = content.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    yield from lines


class LineSplitter:
    """Lines of a file arriving in chunks (an upload streamed part by part); a line may span chunks."""

    def __init__(self) -> None:
        self._rest = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        """The lines ``chunk`` completes."""
        data = self._rest + chunk if self._rest else chunk
        lines = data.split(b"\n")
        self._rest = lines.pop()
        return lines

    def end(self) -> list[bytes]:
        """The last line, if the file does not end with a newline."""
        rest, self._rest = self._rest, b""
        return [rest] if rest else []


class _CustomId(Struct):
    custom_id: str


_custom_id_decoder = msgspec.json.Decoder(_CustomId)


def custom_ids(content: bytes) -> list[str]:
    """Each line's ``custom_id``, by line (for the output and error files of a batch)."""
    return [_custom_id_decoder.decode(raw).custom_id for raw in split_lines(content)]


# ---- the bodies (batch creation) --------------------------------------------------------------


class EmbeddingsBody(Struct, forbid_unknown_fields=True):
    """``POST /v1/embeddings`` as a batch line's body."""

    input: Text | Annotated[list[Text], Meta(min_length=1, max_length=MAX_INPUTS)]
    model: Model | None = None
    encoding_format: str | None = None  # "float" only: checked below, for a clear message
    dimensions: int | None = None  # refused unless absent: the models have one size
    user: str | None = None  # OpenAI's end-user tag; accepted, not used


class CompletionsBody(Struct, forbid_unknown_fields=True):
    """``POST /v1/completions`` as a batch line's body."""

    prompt: Text
    model: Model | None = None
    max_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    stop: Stop | None = None
    seed: int | None = None
    n: One | None = None
    user: str | None = None


class Message(Struct, forbid_unknown_fields=True):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatBody(Struct, forbid_unknown_fields=True):
    """``POST /v1/chat/completions`` as a batch line's body."""

    messages: Annotated[list[Message], Meta(min_length=1)]
    model: Model | None = None
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    stop: Stop | None = None
    seed: int | None = None
    n: One | None = None
    user: str | None = None


_BODY_RULES = {
    "input": f"'body.input' must be a non-blank string or a list of 1 to {MAX_INPUTS} non-blank strings",
    "prompt": "'body.prompt' must be a non-blank string",
    "model": "'body.model' must be a non-empty string",
    "messages": "'body.messages' must be a non-empty list of {role, content} objects",
    "messages.role": "'{path}' must be 'system', 'user' or 'assistant'",
    "messages.content": "'{path}' must be a string",
    "max_tokens": f"'body.max_tokens' must be an integer from 1 to {MAX_TOKENS_LIMIT}",
    "max_completion_tokens": f"'body.max_completion_tokens' must be an integer from 1 to {MAX_TOKENS_LIMIT}",
    "temperature": "'body.temperature' must be a number from 0 to 2",
    "top_p": "'body.top_p' must be a number from 0 to 1",
    "stop": f"'body.stop' must be a non-empty string or a list of at most {MAX_STOP} strings",
    "seed": "'body.seed' must be an integer",
    "n": "'body.n' must be 1 (one completion per line)",
    "encoding_format": "'body.encoding_format' must be \"float\"",
    "dimensions": "'body.dimensions' is not supported",
    "user": "'body.user' must be a string",
}
_SAMPLING = ("temperature", "top_p", "stop", "seed")


@dataclass(frozen=True)
class _Parsed:
    task: str
    model: str | None
    input: list[str]
    input_is_list: bool
    params: dict[str, Any] | None
    max_tokens: int | None


def _embeddings(body: dict[str, Any]) -> _Parsed | str:
    b = msgspec.convert(body, EmbeddingsBody)
    if b.encoding_format == "base64":
        return '\'body.encoding_format\' "base64" is not supported; use "float" (or leave it out)'
    if b.encoding_format not in (None, "float"):
        return f"'body.encoding_format' must be \"float\", not {b.encoding_format!r}"
    if b.dimensions is not None:
        return "'body.dimensions' is not supported: each model answers in its own dimensions"
    texts = [b.input] if isinstance(b.input, str) else list(b.input)
    return _Parsed(Task.EMBED.value, b.model, texts, not isinstance(b.input, str), None, None)


def _sampling(b: CompletionsBody | ChatBody, max_tokens: int | None) -> dict[str, Any]:
    params: dict[str, Any] = {} if max_tokens is None else {"max_tokens": max_tokens}
    for name in _SAMPLING:
        value = getattr(b, name)
        if value is not None:
            params[name] = value
    return params


def _completions(body: dict[str, Any]) -> _Parsed | str:
    b = msgspec.convert(body, CompletionsBody)
    params = _sampling(b, b.max_tokens)
    return _Parsed(Task.GENERATE.value, b.model, [b.prompt], False, params, b.max_tokens)


def render_messages(messages: list[dict[str, str]]) -> str:
    """A chat as one text, one ``role: content`` line per message (what the token estimate counts)."""
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


def _chat(body: dict[str, Any]) -> _Parsed | str:
    b = msgspec.convert(body, ChatBody)
    if (
        b.max_tokens is not None
        and b.max_completion_tokens is not None
        and b.max_tokens != b.max_completion_tokens
    ):
        return "'body.max_tokens' and 'body.max_completion_tokens' differ; give one of them"
    max_tokens = b.max_completion_tokens if b.max_completion_tokens is not None else b.max_tokens
    messages = [{"role": m.role, "content": m.content} for m in b.messages]
    if not any(m["content"].strip() for m in messages):
        return "'body.messages' are all empty"
    params = {"messages": messages, **_sampling(b, max_tokens)}
    return _Parsed(
        Task.GENERATE.value, b.model, [render_messages(messages)], False, params, max_tokens
    )


_PARSERS = {
    "/v1/embeddings": _embeddings,
    "/v1/completions": _completions,
    "/v1/chat/completions": _chat,
}


def _body_problem(body: dict[str, Any]) -> str | None:
    where = _nul_at(body, "")
    if where is not None:
        return f"'body.{where}' must not contain the NUL character (U+0000)"
    return None


def parse_line(
    raw: bytes,
    index: int,
    endpoint: str,
    model_routes: dict[str, list[str]],
    default_max_tokens: int,
) -> BatchLine | str:
    """Line ``index`` (0-based) parsed for ``endpoint``, or its problem (without its custom_id check)."""
    line = _decode_line(raw)
    if isinstance(line, str):
        return line
    return _parse_body(line, raw, index, endpoint, model_routes, default_max_tokens)


def _parse_body(
    line: _Line,
    raw: bytes,
    index: int,
    endpoint: str,
    model_routes: dict[str, list[str]],
    default_max_tokens: int,
) -> BatchLine | str:
    if line.url != endpoint:
        return f"'url' is {line.url!r} but the batch's endpoint is {endpoint!r}"
    if b"\\u0000" in raw and (problem := _body_problem(line.body)) is not None:
        return problem
    try:
        parsed = _PARSERS[endpoint](line.body)
    except msgspec.ValidationError as exc:
        return _reason(exc, _BODY_RULES, prefix="body.")
    if isinstance(parsed, str):
        return parsed
    models = model_routes.get(parsed.task) or []
    if parsed.model is None and not models:
        return f"no model serves {endpoint} (task {parsed.task!r})"
    if parsed.model is not None and parsed.model not in models:
        return f"unknown model {parsed.model!r} for {endpoint}; available: {models}"
    return BatchLine(
        line=index,
        custom_id=line.custom_id,
        task=parsed.task,
        model=parsed.model or models[0],
        input=parsed.input,
        input_is_list=parsed.input_is_list,
        params=parsed.params,
        estimated_tokens=estimate_tokens(
            parsed.task, parsed.input, parsed.max_tokens, default_max_tokens
        ),
    )


def parse_batch_lines(
    content: bytes, endpoint: str, model_routes: dict[str, list[str]], default_max_tokens: int
) -> list[BatchLine]:
    """Every line of ``content`` as a :class:`BatchLine` for ``endpoint``; :class:`LineProblems` (400) if
    any line cannot be (the file is empty, a body breaks the endpoint's contract, a model is unknown).

    CPU-bound, mostly the tokenizer (about 1 s for 50,000 short lines on one core): call it off
    the event loop (``asyncio.to_thread``) where other work shares the loop.
    """
    if endpoint not in ENDPOINTS:
        raise InvalidRequest(f"'endpoint' must be one of {list(ENDPOINTS)}", field="endpoint")
    problems = Problems()
    lines: list[BatchLine] = []
    seen: set[str] = set()
    for index, raw in enumerate(split_lines(content)):
        line = _decode_line(raw)
        if isinstance(line, str):
            problems.add(index + 1, line)
            continue
        if line.custom_id in seen:
            problems.add(index + 1, f"'custom_id' {line.custom_id!r} is not unique in the file")
            continue
        seen.add(line.custom_id)
        parsed = _parse_body(line, raw, index, endpoint, model_routes, default_max_tokens)
        if isinstance(parsed, str):
            problems.add(index + 1, parsed)
        else:
            lines.append(parsed)
    if not lines and not problems:
        raise InvalidRequest("the input file has no lines", field="input_file_id")
    problems.raise_if_any()
    return lines
