"""The submission body of the v1 HTTP contract as a typed model (msgspec): decoded, validated, normalised."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct
from yarl import URL

from inferstream.egress import EgressPolicy, EgressRefused, Resolve
from inferstream.errors import InvalidRequest
from inferstream.settings import Settings
from schemas.records import Priority, Task

MAX_INPUTS = 2048
MAX_DEADLINE_S = 7 * 86_400
MAX_TOKENS_LIMIT = 1_000_000
MAX_CALLBACK_URL = 2048
# Statuses (and `output`, streamed text) a webhook may be asked to announce; default: the terminal ones.
WebhookEvent = Literal["dispatched", "running", "output", "completed", "failed", "cancelled", "expired"]
WEBHOOK_EVENTS: tuple[str, ...] = ("dispatched", "running", "output", "completed", "failed", "cancelled", "expired")
DeadlinePolicy = Literal["strict", "best_effort"]

_NOT_BLANK = r"\S"
Text = Annotated[str, Meta(pattern=_NOT_BLANK, description="Not blank.")]
Texts = Annotated[
    list[str],
    Meta(
        min_length=1,
        max_length=MAX_INPUTS,
        description="At least one item is not blank.",
        extra_json_schema={"contains": {"type": "string", "pattern": _NOT_BLANK}},
    ),
]
CallbackUrl = Annotated[
    str,
    Meta(
        max_length=MAX_CALLBACK_URL,
        pattern="^[Hh][Tt][Tt][Pp][Ss]?://",
        description="Receives the terminal document; public addresses only.",
        extra_json_schema={"format": "uri"},
    ),
]


MaxTokens = Annotated[int, Meta(ge=1, le=MAX_TOKENS_LIMIT)]
Temperature = Annotated[float, Meta(ge=0, le=2)]


class Params(Struct):
    """Model parameters; fields other than these are passed to the model service as they are."""

    max_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    stream: bool | None = None  # generate: stream the text as it is made (`output` events)


class SubmissionBody(Struct, forbid_unknown_fields=True):
    """The body of ``POST /v1/requests``."""

    task: Task
    input: Text | Texts
    model: (
        Annotated[str, Meta(min_length=1, description="Default: the task's first model.")] | None
    ) = None
    params: Params | None = None
    priority: Priority = Priority.NORMAL
    deadline_s: Annotated[int, Meta(ge=1, le=MAX_DEADLINE_S)] | None = None
    metadata: dict[str, Any] | None = None
    callback_url: CallbackUrl | None = None
    webhook_events: Annotated[list[WebhookEvent], Meta(min_length=1, max_length=len(WEBHOOK_EVENTS))] | None = None
    deadline_policy: DeadlinePolicy = "strict"


# The message for each field when its value breaks the contract (msgspec's reason is appended).
_RULES = {
    "task": f"'task' must be one of {[t.value for t in Task]}",
    "input": f"'input' must be a non-empty string or a list of 1 to {MAX_INPUTS} strings",
    "model": "'model' must be a non-empty string",
    "params": "'params' must be an object",
    "params.max_tokens": f"'params.max_tokens' must be an integer from 1 to {MAX_TOKENS_LIMIT}",
    "params.temperature": "'params.temperature' must be a number from 0 to 2",
    "priority": "'priority' must be 'high', 'normal' or 'low'",
    "deadline_s": f"'deadline_s' must be an integer from 1 to {MAX_DEADLINE_S}",
    "metadata": "'metadata' must be an object",
    "callback_url": f"'callback_url' must be an http(s) URL of at most {MAX_CALLBACK_URL} characters",
    "params.stream": "'params.stream' must be true or false",
    "webhook_events": f"'webhook_events' must be a non-empty list of {list(WEBHOOK_EVENTS)}",
    "deadline_policy": "'deadline_policy' must be 'strict' or 'best_effort'",
}
_AT = re.compile(r" - at `\$\.?(?P<path>[^`]*)`$")
_NAMED = re.compile(r"field `(?P<name>[^`]+)`")


def _invalid(exc: msgspec.ValidationError) -> InvalidRequest:
    """msgspec's error as ours, naming the field: ``$.params.max_tokens`` -> ``params.max_tokens``."""
    text = str(exc)
    at = _AT.search(text)
    if at is not None:
        reason = text[: at.start()]
        field = re.sub(r"\[\d+\]", "", at["path"])
    else:
        reason, named = text, _NAMED.search(text)
        field = named["name"] if named else ""
    if not field:
        return InvalidRequest(f"body must be a JSON object: {reason}")
    if field not in _RULES:
        return InvalidRequest(f"unknown field {field!r}", field=field)
    return InvalidRequest(f"{_RULES[field]}: {reason}", field=field)


class Submission(Struct, frozen=True):
    """A valid submission, normalised: the model chosen, the input a list."""

    task: Task
    model: str
    input: list[str]
    input_is_list: bool
    params: dict[str, Any]
    priority: Priority
    deadline_s: int | None
    metadata: dict[str, Any]
    callback_url: str | None
    webhook_events: list[str] | None = None  # None: the terminal statuses
    deadline_policy: str = "strict"

    @property
    def max_tokens(self) -> int | None:
        value = self.params.get("max_tokens")
        return int(value) if value is not None else None


def parse_submission(body: bytes, model_routes: dict[str, list[str]]) -> Submission:
    """Bytes in, a :class:`Submission` or ``InvalidRequest`` (400, naming the field) out."""
    try:
        data = msgspec.json.decode(body)
    except msgspec.DecodeError as exc:
        raise InvalidRequest(f"body is not valid JSON: {exc}") from None
    # PostgreSQL text and jsonb cannot hold U+0000: accepted, such a request could never be stored
    # (the sink would fail its batch for ever). JSON must escape it, so the bytes tell cheaply.
    if b"\\u0000" in body and (where := _nul_at(data, "")) is not None:
        raise InvalidRequest("strings must not contain the NUL character (U+0000)", field=where or "body")
    try:
        sub = msgspec.convert(data, SubmissionBody)
    except msgspec.ValidationError as exc:
        raise _invalid(exc) from None
    models = model_routes.get(sub.task) or []
    if sub.model is None and not models:
        raise InvalidRequest(f"no model serves task {sub.task.value!r}", field="model")
    if sub.model is not None and sub.model not in models:
        raise InvalidRequest(
            f"unknown model {sub.model!r} for task {sub.task.value!r}; available: {models}",
            field="model",
        )
    texts = [sub.input] if isinstance(sub.input, str) else sub.input
    if not any(t.strip() for t in texts):
        raise InvalidRequest("'input' is empty", field="input")
    if sub.callback_url is not None:
        _callback_url(sub.callback_url)
    return Submission(
        task=sub.task,
        model=sub.model or models[0],
        input=texts,
        input_is_list=not isinstance(sub.input, str),
        params=data.get("params") or {},  # as sent: unknown parameters go to the model service
        priority=sub.priority,
        deadline_s=sub.deadline_s,
        metadata=sub.metadata or {},
        callback_url=sub.callback_url,
        webhook_events=sorted(set(sub.webhook_events), key=WEBHOOK_EVENTS.index) if sub.webhook_events else None,
        deadline_policy=sub.deadline_policy,
    )


def _nul_at(value: object, path: str) -> str | None:
    """The dotted path of the first string (or object key) holding U+0000, or None."""
    if isinstance(value, str):
        return path if "\x00" in value else None
    if isinstance(value, dict):
        for key, item in value.items():
            inner = f"{path}.{key}" if path else str(key)
            if "\x00" in str(key):
                return inner
            if (found := _nul_at(item, inner)) is not None:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            if (found := _nul_at(item, f"{path}[{i}]")) is not None:
                return found
    return None


def _callback_url(value: str) -> URL:
    """The shape of a ``callback_url``, read by the parser the webhook sender uses (yarl, as aiohttp)."""
    try:
        url = URL(value)
        port = url.port
    except ValueError as exc:
        raise InvalidRequest(
            f"'callback_url' is not a valid URL: {exc}", field="callback_url"
        ) from None
    if url.scheme not in ("http", "https") or not url.raw_host:
        raise InvalidRequest("'callback_url' must be an http(s) URL", field="callback_url")
    if url.raw_user is not None or url.raw_password is not None:
        # Credentials in the URL would be sent to the receiver and logged with the row.
        raise InvalidRequest("'callback_url' must not carry credentials", field="callback_url")
    if port is None or not 0 < port < 65536:
        raise InvalidRequest("'callback_url' has an invalid port", field="callback_url")
    return url


async def check_callback_url(
    url: str, settings: Settings, *, resolve: Resolve | None = None
) -> None:
    """Refuse (400, field ``callback_url``) a URL whose host is, or resolves to, an internal address.

    Awaited by the gateway after :func:`parse_submission` (which stays pure): a
    hostname is resolved, within ``settings.webhook_resolve_timeout_s``.
    """
    parsed = _callback_url(url)
    policy = EgressPolicy.parse(settings.webhook_allow)
    try:
        await policy.check_host(
            parsed.raw_host or "",
            parsed.port or 0,
            timeout_s=settings.webhook_resolve_timeout_s,
            resolve=resolve,
        )
    except EgressRefused as exc:
        raise InvalidRequest(
            f"'callback_url' {exc}; webhooks go to public addresses only "
            "(INFERSTREAM_WEBHOOK_ALLOW lists exceptions)",
            field="callback_url",
            host=exc.host,
            address=exc.address,
        ) from None
