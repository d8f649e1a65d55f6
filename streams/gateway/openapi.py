"""``/openapi.json``: generated from the contract's models (``schemas.api``, ``schemas.documents``,
``schemas.batch_api``) and a table of routes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgspec

from schemas.api import SubmissionBody
from schemas.batch_api import (
    BATCH_ID_PATTERN,
    FILE_ID_PATTERN,
    BatchCreateBody,
    BatchList,
    BatchObject,
    BatchQuotaErrorBody,
    FileDeleted,
    FileList,
    FileObject,
    LineErrorBody,
)
from schemas.dashboard import DashboardQuota, DashboardStats
from schemas.documents import (
    REQUEST_ID_PATTERN,
    Accepted,
    CancelAccepted,
    ErrorBody,
    ModelList,
    QuotaDoc,
    QuotaErrorBody,
    RedeliveryAccepted,
    RequestDoc,
    RequestPage,
    StreamToken,
    WebhookAttempts,
)
from schemas.records import Status

_REF = "#/components/schemas/{name}"
_SECONDS = {"type": "string", "pattern": "^[0-9]+$"}
_RATE_LIMIT = {
    "X-RateLimit-Limit-Requests": "Requests per day of the caller's plan.",
    "X-RateLimit-Remaining-Requests": "Requests left today.",
    "X-RateLimit-Limit-Tokens": "Tokens per day of the caller's plan.",
    "X-RateLimit-Remaining-Tokens": "Tokens left today (reservations count as used).",
    "X-RateLimit-Reset": "Seconds until the daily window resets.",
}


@dataclass(frozen=True)
class Answer:
    """One documented response: its body's model (or media type) and the headers it always carries."""

    description: str
    model: type[msgspec.Struct] | None = None
    media: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    also: tuple[str, ...] = ()  # other media types the same answer may come as (same schema)


@dataclass(frozen=True)
class Route:
    path: str
    method: str
    summary: str
    answers: dict[int, Answer]
    parameters: tuple[dict[str, Any], ...] = ()
    body: type[msgspec.Struct] | None = None
    public: bool = False  # no API key needed
    form: dict[str, Any] | None = None  # a multipart/form-data body's schema (an upload)


def _error(description: str, **headers: str) -> Answer:
    return Answer(description, ErrorBody, headers=headers)


_RETRY = {"Retry-After": "Seconds to wait before trying again."}
_UNAUTHORIZED = _error("Missing, unknown or revoked API key")
_UNAVAILABLE = _error("Cannot be decided now (rebalance, recovery, a store down)", **_RETRY)
_NOT_FOUND = _error("Unknown, or another user's")
_ID = {
    "name": "request_id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": REQUEST_ID_PATTERN},
}

_FILE_ID = {
    "name": "file_id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": FILE_ID_PATTERN},
}
_BATCH_ID = {
    "name": "batch_id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": BATCH_ID_PATTERN},
}
_UPLOAD = {
    "type": "object",
    "required": ["file", "purpose"],
    "properties": {
        "file": {
            "type": "string",
            "format": "binary",
            "description": "JSONL: one `{custom_id, method: POST, url, body}` object per line.",
        },
        "purpose": {"type": "string", "enum": ["batch"]},
    },
}


ROUTES: tuple[Route, ...] = (
    Route(
        "/v1/requests",
        "post",
        "Submit work; answered at once with the request's id",
        {
            202: Answer(
                "Admitted and queued",
                Accepted,
                headers={"Location": "The request's URL.", **_RATE_LIMIT},
            ),
            400: _error("Invalid body; `field` names what is wrong"),
            401: _UNAUTHORIZED,
            413: _error("Body larger than INFERSTREAM_MAX_BODY_BYTES"),
            422: _error("Idempotency-Key reused with another body"),
            429: Answer(
                "Quota exceeded, rate limited, or the deadline is shorter than the queue's ETA",
                QuotaErrorBody,
                headers={**_RETRY, **_RATE_LIMIT},
            ),
            503: _UNAVAILABLE,
        },
        parameters=(
            {
                "name": "Idempotency-Key",
                "in": "header",
                "description": "The same key within 24 h returns the first answer and charges nothing again.",
                "schema": {"type": "string", "minLength": 1, "maxLength": 255},
            },
        ),
        body=SubmissionBody,
    ),
    Route(
        "/v1/requests",
        "get",
        "List the caller's requests, newest first",
        {
            200: Answer("A page", RequestPage),
            400: _error("Invalid query"),
            401: _UNAUTHORIZED,
            503: _UNAVAILABLE,
        },
        parameters=(
            {"name": "status", "in": "query", "schema": {"$ref": _REF.format(name="Status")}},
            {
                "name": "limit",
                "in": "query",
                "schema": {"type": "integer", "minimum": 1, "maximum": 100, "default": 20},
            },
            {
                "name": "after",
                "in": "query",
                "description": "The previous page's `next_after`: requests older than this id.",
                "schema": {"type": "string", "pattern": REQUEST_ID_PATTERN},
            },
        ),
    ),
    Route(
        "/v1/requests/{request_id}",
        "get",
        "One request's document",
        {
            200: Answer("The request", RequestDoc),
            401: _UNAUTHORIZED,
            404: _NOT_FOUND,
            503: _UNAVAILABLE,
        },
        parameters=(_ID,),
    ),
    Route(
        "/v1/requests/{request_id}",
        "delete",
        "Cancel a request; what it reserved is refunded if the work has not finished",
        {
            202: Answer("Cancellation requested", CancelAccepted),
            401: _UNAUTHORIZED,
            404: _NOT_FOUND,
            409: _error("Already in a terminal status"),
            503: _UNAVAILABLE,
        },
        parameters=(_ID,),
    ),
    Route(
        "/v1/requests/{request_id}/events",
        "get",
        "Server-Sent Events, one per status change, ending after the terminal one; costs no quota",
        {
            200: Answer(
                "The event stream; each event's data is the request's document",
                media="text/event-stream",
            ),
            401: _error(
                "Missing, unknown or revoked API key; or a stream token that is malformed, "
                "tampered with, expired or for another request"
            ),
            404: _NOT_FOUND,
            503: _UNAVAILABLE,
        },
        parameters=(
            _ID,
            {
                "name": "Last-Event-ID",
                "in": "header",
                "description": "Resume after this event.",
                "schema": {"type": "string"},
            },
            {
                "name": "token",
                "in": "query",
                "description": "A stream token from `POST .../events/token`, instead of an API key "
                "(for `EventSource`, which cannot send headers).",
                "schema": {"type": "string", "minLength": 1, "maxLength": 512},
            },
        ),
    ),
    Route(
        "/v1/requests/{request_id}/events/token",
        "post",
        "Mint a short-lived token that opens this request's event stream without an API key",
        {
            201: Answer(
                "The token (INFERSTREAM_STREAM_TOKEN_TTL_S) and the stream's URL", StreamToken
            ),
            401: _UNAUTHORIZED,
            404: _NOT_FOUND,
            503: _UNAVAILABLE,
        },
        parameters=(_ID,),
    ),
    Route(
        "/v1/requests/{request_id}/webhooks",
        "get",
        "The request's webhook delivery attempts (time, event, state, HTTP status, error), oldest first",
        {
            200: Answer("The attempts (the newest 100)", WebhookAttempts),
            401: _UNAUTHORIZED,
            404: _NOT_FOUND,
            503: _UNAVAILABLE,
        },
        parameters=(_ID,),
    ),
    Route(
        "/v1/requests/{request_id}/webhooks/redeliver",
        "post",
        "Send the request's last webhook event again, with the same webhook-id (output events are not resent)",
        {
            202: Answer(
                "The redelivery is under way; its attempts appear in .../webhooks",
                RedeliveryAccepted,
            ),
            401: _UNAUTHORIZED,
            404: _NOT_FOUND,
            409: _error("The request has no callback_url, or is not recorded yet"),
            503: _UNAVAILABLE,
        },
        parameters=(_ID,),
    ),
    Route(
        "/v1/quota",
        "get",
        "The caller's quota for the current UTC day",
        {200: Answer("Quota", QuotaDoc), 401: _UNAUTHORIZED, 503: _UNAVAILABLE},
    ),
    Route(
        "/v1/models",
        "get",
        "The public routes (task and model) that accept submissions now",
        {200: Answer("The routes", ModelList), 401: _UNAUTHORIZED, 503: _UNAVAILABLE},
    ),
    Route(
        "/v1/files",
        "post",
        "Upload a JSONL file of batch lines (multipart, `purpose` batch); each line is checked before it is stored",
        {
            200: Answer("Stored", FileObject),
            400: Answer(
                "Not a multipart upload, no `file` part, `purpose` not batch, too many lines, or lines at fault "
                "(`errors`: 1-based line and problem; nothing stored)",
                LineErrorBody,
            ),
            401: _UNAUTHORIZED,
            413: _error("File larger than INFERSTREAM_FILE_MAX_BYTES (nothing stored)"),
            503: _UNAVAILABLE,
        },
        form=_UPLOAD,
    ),
    Route(
        "/v1/files",
        "get",
        "List the caller's files, newest first",
        {
            200: Answer("A page", FileList),
            400: _error("Invalid query"),
            401: _UNAUTHORIZED,
            503: _UNAVAILABLE,
        },
        parameters=(
            {
                "name": "purpose",
                "in": "query",
                "schema": {"type": "string", "enum": ["batch", "batch_output"]},
            },
            {
                "name": "limit",
                "in": "query",
                "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100},
            },
            {
                "name": "after",
                "in": "query",
                "description": "The previous page's `last_id`: files older than this one.",
                "schema": {"type": "string", "pattern": FILE_ID_PATTERN},
            },
        ),
    ),
    Route(
        "/v1/files/{file_id}",
        "get",
        "One of the caller's files",
        {
            200: Answer("The file", FileObject),
            401: _UNAUTHORIZED,
            404: _NOT_FOUND,
            503: _UNAVAILABLE,
        },
        parameters=(_FILE_ID,),
    ),
    Route(
        "/v1/files/{file_id}/content",
        "get",
        "The file's bytes (a batch's output and error files: one JSON line per batch line, in line order)",
        {
            200: Answer(
                "The content: `application/jsonl` for a file named `*.jsonl` (batch results are)",
                media="application/jsonl",
                also=("application/octet-stream",),
            ),
            401: _UNAUTHORIZED,
            404: _NOT_FOUND,
            503: _UNAVAILABLE,
        },
        parameters=(_FILE_ID,),
    ),
    Route(
        "/v1/files/{file_id}",
        "delete",
        "Delete a file (the input of a batch still running stays readable to that batch until it ends)",
        {
            200: Answer("Deleted", FileDeleted),
            401: _UNAUTHORIZED,
            404: _NOT_FOUND,
            503: _UNAVAILABLE,
        },
        parameters=(_FILE_ID,),
    ),
    Route(
        "/v1/batches",
        "post",
        "Run every line of an uploaded file as a request at the plan's batch priority; "
        "the whole batch is charged at once, or nothing",
        {
            200: Answer("Created; its lines are being written to the pipeline", BatchObject),
            400: Answer(
                "Invalid body, an input file not of purpose batch or empty, or lines that do not fit the endpoint "
                "(`errors`: 1-based line and problem; nothing charged)",
                LineErrorBody,
            ),
            401: _UNAUTHORIZED,
            404: _error(
                "The input file is unknown, deleted, another user's, or not of purpose batch"
            ),
            413: _error("Body larger than INFERSTREAM_MAX_BODY_BYTES"),
            429: Answer(
                "The batch's lines or estimated tokens exceed what is left of the day's quota "
                "(`missing` says by how much)",
                BatchQuotaErrorBody,
                headers=_RETRY,
            ),
            503: _UNAVAILABLE,
        },
        body=BatchCreateBody,
    ),
    Route(
        "/v1/batches",
        "get",
        "List the caller's batches, newest first",
        {
            200: Answer("A page", BatchList),
            400: _error("Invalid query"),
            401: _UNAUTHORIZED,
            503: _UNAVAILABLE,
        },
        parameters=(
            {
                "name": "after",
                "in": "query",
                "description": "The previous page's `last_id`: batches older than this one.",
                "schema": {"type": "string", "pattern": BATCH_ID_PATTERN},
            },
            {
                "name": "limit",
                "in": "query",
                "schema": {"type": "integer", "minimum": 1, "maximum": 100, "default": 20},
            },
        ),
    ),
    Route(
        "/v1/batches/{batch_id}",
        "get",
        "One batch: status, request_counts (exact, live), output and error files once final",
        {
            200: Answer("The batch", BatchObject),
            401: _UNAUTHORIZED,
            404: _NOT_FOUND,
            503: _UNAVAILABLE,
        },
        parameters=(_BATCH_ID,),
    ),
    Route(
        "/v1/batches/{batch_id}/cancel",
        "post",
        "Cancel a batch: lines not started are answered cancelled and refunded; it ends `cancelled` "
        "with the output of the lines that completed",
        {
            200: Answer("Cancelling", BatchObject),
            401: _UNAUTHORIZED,
            404: _NOT_FOUND,
            409: _error("Already final"),
            503: _UNAVAILABLE,
        },
        parameters=(_BATCH_ID,),
    ),
    Route(
        "/dashboard/api/stats",
        "get",
        "This worker's live numbers for the dashboard; recent failures are the caller's own unless admin",
        {200: Answer("The numbers", DashboardStats), 401: _UNAUTHORIZED, 503: _UNAVAILABLE},
    ),
    Route(
        "/dashboard/api/quota",
        "get",
        "Quota use: every user this worker holds for an admin key, the caller's own otherwise",
        {200: Answer("Quota documents", DashboardQuota), 401: _UNAUTHORIZED, 503: _UNAVAILABLE},
    ),
    *(
        Route(path, "get", summary, {200: Answer(summary, media=media)}, public=True)
        for path, summary, media in (
            ("/dashboard", "The live dashboard page (it asks for an API key)", "text/html"),
            ("/dashboard/app.js", "The dashboard's script", "application/javascript"),
            ("/dashboard/style.css", "The dashboard's style sheet", "text/css"),
        )
    ),
    Route(
        "/healthz", "get", "Alive", {200: Answer("Alive", media="application/json")}, public=True
    ),
    Route(
        "/readyz",
        "get",
        "Ready: tables recovered, bridges connected",
        {
            200: Answer("Ready", media="application/json"),
            503: Answer("Not ready", media="application/json", headers=_RETRY),
        },
        public=True,
    ),
    Route(
        "/metrics",
        "get",
        "Prometheus metrics",
        {200: Answer("Metrics", media="text/plain")},
        public=True,
    ),
    Route(
        "/openapi.json",
        "get",
        "This description",
        {200: Answer("OpenAPI 3.1", media="application/json")},
        public=True,
    ),
)


def _response(answer: Answer) -> dict[str, Any]:
    schema = {"$ref": _REF.format(name=answer.model.__name__)} if answer.model else {}
    out: dict[str, Any] = {
        "description": answer.description,
        "content": {media: {"schema": schema} for media in (answer.media, *answer.also)},
    }
    if answer.headers:
        out["headers"] = {
            name: {
                "description": text,
                "required": True,
                "schema": {"type": "string"} if name == "Location" else _SECONDS,
            }
            for name, text in answer.headers.items()
        }
    return out


def _operation(route: Route) -> dict[str, Any]:
    op: dict[str, Any] = {
        "summary": route.summary,
        "operationId": f"{route.method}_{route.path.strip('/').replace('/', '_').replace('{', '').replace('}', '')}",
        "responses": {
            str(code): _response(answer) for code, answer in sorted(route.answers.items())
        },
    }
    if route.parameters:
        op["parameters"] = list(route.parameters)
    if route.body is not None:
        op["requestBody"] = {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": _REF.format(name=route.body.__name__)}}
            },
        }
    if route.form is not None:
        op["requestBody"] = {
            "required": True,
            "content": {"multipart/form-data": {"schema": route.form}},
        }
    if route.public:
        op["security"] = []
    return op


def openapi_spec() -> dict[str, Any]:
    """The OpenAPI 3.1 document; its schemas are the models' own JSON Schema."""
    models = {r.body for r in ROUTES if r.body} | {
        a.model for r in ROUTES for a in r.answers.values() if a.model
    }
    _, schemas = msgspec.json.schema_components(
        sorted(models | {Status}, key=lambda m: m.__name__), ref_template=_REF
    )
    paths: dict[str, dict[str, Any]] = {}
    for route in ROUTES:
        paths.setdefault(route.path, {})[route.method] = _operation(route)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Inferstream",
            "version": "1.0.0",
            "description": "Asynchronous inference: submit work, get an id at once, read or stream the result.",
        },
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
            },
            "schemas": schemas,
        },
        "security": [{"bearer": []}, {"apiKey": []}],
        "paths": paths,
    }
