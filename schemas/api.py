"""Validation of ``POST /v1/requests`` bodies: bytes in, a :class:`Submission` or ``InvalidRequest`` out."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import orjson
from yarl import URL

from inferstream.egress import EgressPolicy, EgressRefused, Resolve
from inferstream.errors import InvalidRequest
from inferstream.settings import Settings
from schemas.records import PRIORITY_LEVEL

TASKS = ("generate", "embed")
MAX_INPUTS = 2048
MAX_DEADLINE_S = 7 * 86_400
MAX_TOKENS_LIMIT = 1_000_000
MAX_CALLBACK_URL = 2048


@dataclass(frozen=True)
class Submission:
    task: str
    model: str
    input: list[str]
    input_is_list: bool
    params: dict[str, Any]
    priority: str
    deadline_s: int | None
    metadata: dict[str, Any]
    callback_url: str | None

    @property
    def max_tokens(self) -> int | None:
        value = self.params.get("max_tokens")
        return int(value) if value is not None else None


def _fail(message: str, field: str | None = None) -> InvalidRequest:
    return InvalidRequest(message, field=field) if field else InvalidRequest(message)


def parse_submission(body: bytes, model_routes: dict[str, list[str]]) -> Submission:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise _fail(f"body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise _fail("body must be a JSON object")

    task = data.get("task")
    if task not in TASKS:
        raise _fail(f"'task' must be one of {list(TASKS)}", "task")
    models = model_routes.get(task) or []
    model = data.get("model")
    if model is None:
        if not models:
            raise _fail(f"no model serves task {task!r}", "model")
        model = models[0]
    elif not isinstance(model, str) or model not in models:
        raise _fail(f"unknown model {model!r} for task {task!r}; available: {models}", "model")

    raw_input = data.get("input")
    input_is_list = isinstance(raw_input, list)
    if isinstance(raw_input, str):
        texts = [raw_input]
    elif input_is_list and raw_input and all(isinstance(t, str) for t in raw_input):
        texts = list(raw_input)
    else:
        raise _fail("'input' must be a non-empty string or a non-empty list of strings", "input")
    if len(texts) > MAX_INPUTS:
        raise _fail(f"'input' has more than {MAX_INPUTS} items", "input")
    if not any(t.strip() for t in texts):
        raise _fail("'input' is empty", "input")

    params = data.get("params")
    params = {} if params is None else params
    if not isinstance(params, dict):
        raise _fail("'params' must be an object", "params")
    max_tokens = params.get("max_tokens")
    if max_tokens is not None and (
        isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 1 <= max_tokens <= MAX_TOKENS_LIMIT
    ):
        raise _fail(f"'params.max_tokens' must be an integer from 1 to {MAX_TOKENS_LIMIT}", "params.max_tokens")
    temperature = params.get("temperature")
    if temperature is not None and (
        isinstance(temperature, bool)
        or not isinstance(temperature, int | float)
        or not math.isfinite(temperature)
        or not 0 <= temperature <= 2
    ):
        raise _fail("'params.temperature' must be a number from 0 to 2", "params.temperature")

    priority = data.get("priority", "normal")
    if priority not in PRIORITY_LEVEL:
        raise _fail("'priority' must be 'high', 'normal' or 'low'", "priority")

    deadline_s = data.get("deadline_s")
    if deadline_s is not None and (
        isinstance(deadline_s, bool) or not isinstance(deadline_s, int) or not 1 <= deadline_s <= MAX_DEADLINE_S
    ):
        raise _fail(f"'deadline_s' must be an integer from 1 to {MAX_DEADLINE_S}", "deadline_s")

    metadata = data.get("metadata")
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict):
        raise _fail("'metadata' must be an object", "metadata")

    callback_url = data.get("callback_url")
    if callback_url is not None:
        _callback_url(callback_url)

    unknown = set(data) - {"task", "model", "input", "params", "priority", "deadline_s", "metadata", "callback_url"}
    if unknown:
        raise _fail(f"unknown fields: {sorted(unknown)}")

    return Submission(
        task=task,
        model=model,
        input=texts,
        input_is_list=input_is_list,
        params=params,
        priority=priority,
        deadline_s=deadline_s,
        metadata=metadata,
        callback_url=callback_url,
    )


def _callback_url(value: Any) -> URL:
    """The shape of a ``callback_url``, read by the parser the webhook sender uses (yarl, as aiohttp)."""
    if not isinstance(value, str) or len(value) > MAX_CALLBACK_URL:
        raise _fail(
            f"'callback_url' must be an http(s) URL of at most {MAX_CALLBACK_URL} characters",
            "callback_url",
        )
    try:
        url = URL(value)
        port = url.port
    except ValueError as exc:
        raise _fail(f"'callback_url' is not a valid URL: {exc}", "callback_url") from None
    if url.scheme not in ("http", "https") or not url.raw_host:
        raise _fail("'callback_url' must be an http(s) URL", "callback_url")
    if url.raw_user is not None or url.raw_password is not None:
        # Credentials in the URL would be sent to the receiver and logged with the row.
        raise _fail("'callback_url' must not carry credentials", "callback_url")
    if port is None or not 0 < port < 65536:
        raise _fail("'callback_url' has an invalid port", "callback_url")
    return url


async def check_callback_url(url: str, settings: Settings, *, resolve: Resolve | None = None) -> None:
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
