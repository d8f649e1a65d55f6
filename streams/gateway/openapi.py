"""The OpenAPI 3.1 description of the v1 HTTP contract (served at ``/openapi.json``)."""

from __future__ import annotations

from typing import Any

_STATUS = ["queued", "dispatched", "running", "completed", "failed", "cancelled", "expired"]


def _error(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }


def _ok(description: str, ref: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": {"$ref": ref}}}}


_ID = {"name": "request_id", "in": "path", "required": True, "schema": {"type": "string"}}
_COMMON_ERRORS = {"401": _error("Missing or invalid API key"), "503": _error("Not decidable now; see Retry-After")}


def openapi_spec() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {"title": "Inferstream", "version": "1.0.0"},
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
            },
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["error"],
                    "properties": {
                        "error": {
                            "type": "object",
                            "required": ["type", "message"],
                            "properties": {"type": {"type": "string"}, "message": {"type": "string"}},
                        }
                    },
                },
                "Submission": {
                    "type": "object",
                    "required": ["task", "input"],
                    "additionalProperties": False,
                    "properties": {
                        "task": {"enum": ["generate", "embed"]},
                        "model": {"type": "string"},
                        "input": {
                            "oneOf": [
                                {"type": "string", "minLength": 1},
                                {"type": "array", "items": {"type": "string"}, "minItems": 1},
                            ]
                        },
                        "params": {
                            "type": "object",
                            "properties": {
                                "max_tokens": {"type": "integer", "minimum": 1},
                                "temperature": {"type": "number", "minimum": 0, "maximum": 2},
                            },
                        },
                        "priority": {"enum": ["high", "normal", "low"]},
                        "deadline_s": {"type": "integer", "minimum": 1},
                        "metadata": {"type": "object"},
                        "callback_url": {"type": "string", "format": "uri"},
                    },
                },
                "Accepted": {
                    "type": "object",
                    "properties": {
                        "request_id": {"type": "string"},
                        "status": {"const": "queued"},
                        "estimated_tokens": {"type": "integer"},
                        "created_at": {"type": "string", "format": "date-time"},
                        "links": {"type": "object"},
                    },
                },
                "Request": {
                    "type": "object",
                    "properties": {
                        "request_id": {"type": "string"},
                        "status": {"enum": _STATUS},
                        "task": {"type": "string"},
                        "model": {"type": "string"},
                        "priority": {"type": "string"},
                        "created_at": {"type": "string", "format": "date-time"},
                        "updated_at": {"type": "string", "format": "date-time"},
                        "completed_at": {"type": "string", "format": "date-time"},
                        "result": {"type": "object"},
                        "error": {"type": "object"},
                        "usage": {"type": "object"},
                        "estimated_tokens": {"type": "integer"},
                        "attempts": {"type": "integer"},
                    },
                },
                "RequestList": {
                    "type": "object",
                    "properties": {
                        "data": {"type": "array", "items": {"$ref": "#/components/schemas/Request"}},
                        "has_more": {"type": "boolean"},
                        "next_after": {"type": ["string", "null"]},
                    },
                },
                "Quota": {"type": "object"},
            },
        },
        "security": [{"bearer": []}, {"apiKey": []}],
        "paths": {
            "/v1/requests": {
                "post": {
                    "summary": "Submit work",
                    "parameters": [
                        {"name": "Idempotency-Key", "in": "header", "required": False, "schema": {"type": "string"}}
                    ],
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Submission"}}},
                    },
                    "responses": {
                        "202": _ok("Admitted and queued", "#/components/schemas/Accepted"),
                        "400": _error("Invalid request"),
                        "413": _error("Body too large"),
                        "422": _error("Idempotency-Key reused with another body"),
                        "429": _error("Quota exceeded or rate limited; see Retry-After"),
                        **_COMMON_ERRORS,
                    },
                },
                "get": {
                    "summary": "List the caller's requests, newest first",
                    "parameters": [
                        {"name": "status", "in": "query", "schema": {"enum": _STATUS}},
                        {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 100}},
                        {"name": "after", "in": "query", "schema": {"type": "string"}},
                    ],
                    "responses": {"200": _ok("A page", "#/components/schemas/RequestList"), **_COMMON_ERRORS},
                },
            },
            "/v1/requests/{request_id}": {
                "get": {
                    "parameters": [_ID],
                    "responses": {
                        "200": _ok("The request", "#/components/schemas/Request"),
                        "404": _error("Unknown, or another user's"),
                        **_COMMON_ERRORS,
                    },
                },
                "delete": {
                    "parameters": [_ID],
                    "responses": {
                        "202": _ok("Cancellation accepted", "#/components/schemas/Request"),
                        "404": _error("Unknown, or another user's"),
                        "409": _error("Already terminal"),
                        **_COMMON_ERRORS,
                    },
                },
            },
            "/v1/requests/{request_id}/events": {
                "get": {
                    "parameters": [_ID, {"name": "Last-Event-ID", "in": "header", "schema": {"type": "string"}}],
                    "responses": {
                        "200": {"description": "Server-Sent Events", "content": {"text/event-stream": {}}},
                        "404": _error("Unknown, or another user's"),
                        **_COMMON_ERRORS,
                    },
                }
            },
            "/v1/quota": {"get": {"responses": {"200": _ok("Quota", "#/components/schemas/Quota"), **_COMMON_ERRORS}}},
            "/healthz": {"get": {"security": [], "responses": {"200": {"description": "Alive"}}}},
            "/readyz": {"get": {"security": [], "responses": {"200": {"description": "Ready"}, "503": {"description": "Not ready"}}}},
            "/metrics": {"get": {"security": [], "responses": {"200": {"description": "Prometheus metrics"}}}},
        },
    }
