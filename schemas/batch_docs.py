"""What the Batch API shows: OpenAI's batch object, and the lines of a batch's output and error files.

Pure functions of a ``batches`` table entry (:mod:`tables.batches`) or of the
PostgreSQL rows of a batch's lines, so the same input always renders the same
bytes: a finalization interrupted by a crash writes the very same files again.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

import orjson

from tables.batches import Entry, request_counts

TIMESTAMPS = (
    "created_at", "in_progress_at", "expires_at", "finalizing_at", "completed_at",
    "failed_at", "expired_at", "cancelling_at", "cancelled_at",
)  # fmt: skip
PRIVATE = ("user_id",)  # stored with the doc in PostgreSQL (whose row it is), never shown


def _seconds(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return int(value.timestamp())
    return int(float(value))


def batch_object(entry: Entry) -> dict[str, Any]:
    """OpenAI's batch object of an entry, plus ``user_id`` (the PostgreSQL doc; :func:`public` drops it)."""
    doc: dict[str, Any] = {
        "id": entry["batch_id"],
        "object": "batch",
        "endpoint": entry["endpoint"],
        "errors": entry.get("errors"),
        "input_file_id": entry["input_file_id"],
        "completion_window": entry.get("completion_window", "24h"),
        "status": entry["status"],
        "output_file_id": entry.get("output_file_id"),
        "error_file_id": entry.get("error_file_id"),
    }
    for name in TIMESTAMPS:
        doc[name] = _seconds(entry.get(name))
    doc["request_counts"] = request_counts(entry)
    doc["metadata"] = entry.get("metadata")
    doc["user_id"] = entry["user_id"]
    return doc


def public(doc: dict[str, Any]) -> dict[str, Any]:
    """A stored doc as the caller sees it."""
    return {k: v for k, v in doc.items() if k not in PRIVATE}


def batch_list(docs: Sequence[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    data = [public(d) for d in docs]
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": has_more,
    }


def output_file_id(batch_id: str, kind: str) -> str:
    """The id of a batch's ``output`` or ``error`` file: derived from the batch id, so a finalization
    done again after a crash replaces the same files instead of leaving strays."""
    digest = hashlib.sha256(f"{batch_id}:{kind}".encode()).hexdigest()[:24]
    return f"file-{digest}"


def _json(value: Any) -> Any:
    if isinstance(value, str | bytes):
        return orjson.loads(value)
    return value


def _usage(row: dict[str, Any], generate: bool) -> dict[str, int]:
    usage = _json(row.get("usage")) or {}
    prompt = int(usage.get("prompt_tokens") or 0)
    total = int(usage.get("total_tokens") or 0)
    if not generate:
        return {"prompt_tokens": prompt, "total_tokens": total or prompt}
    completion = int(usage.get("completion_tokens") or max(0, total - prompt))
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": total or prompt + completion,
    }


def response_body(endpoint: str, row: dict[str, Any]) -> dict[str, Any]:
    """The OpenAI body of ``endpoint`` for a completed line's row."""
    result = _json(row.get("result")) or {}
    request_id, model = row["request_id"], row.get("model") or ""
    created = _seconds(row.get("completed_at") or row.get("created_at")) or 0
    if endpoint == "/v1/embeddings":
        vectors = result.get("embeddings") or []
        return {
            "object": "list",
            "data": [
                {"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)
            ],
            "model": model,
            "usage": _usage(row, generate=False),
        }
    text = result.get("text", "")
    if endpoint == "/v1/chat/completions":
        return {
            "id": f"chatcmpl-{request_id}",
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                }
            ],
            "usage": _usage(row, generate=True),
        }
    return {
        "id": f"cmpl-{request_id}",
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "text": text, "finish_reason": "stop", "logprobs": None}],
        "usage": _usage(row, generate=True),
    }


def output_line(endpoint: str, custom_id: str, row: dict[str, Any]) -> dict[str, Any]:
    request_id = row["request_id"]
    return {
        "id": f"batch_req_{request_id}",
        "custom_id": custom_id,
        "response": {
            "status_code": 200,
            "request_id": request_id,
            "body": response_body(endpoint, row),
        },
        "error": None,
    }


def error_line(custom_id: str, row: dict[str, Any]) -> dict[str, Any]:
    error = _json(row.get("error")) or {}
    status = str(row.get("status") or "failed")
    return {
        "id": f"batch_req_{row['request_id']}",
        "custom_id": custom_id,
        "response": None,
        "error": {
            "code": error.get("type") or status,
            "message": error.get("message") or f"the request {status}",
        },
    }


def render_files(
    endpoint: str, custom_ids: Sequence[str], rows: Iterable[dict[str, Any]]
) -> tuple[bytes, bytes, int, int]:
    """The output file (completed lines) and the error file (the others), JSONL in line order; and their
    line counts. A row whose line is outside the batch is ignored; the first row of a line wins."""
    out: list[bytes] = []
    err: list[bytes] = []
    seen: set[int] = set()
    for row in sorted(rows, key=lambda r: int(r["batch_line"])):
        line = int(row["batch_line"])
        if line in seen or not 0 <= line < len(custom_ids):
            continue
        seen.add(line)
        if row.get("status") == "completed":
            out.append(orjson.dumps(output_line(endpoint, custom_ids[line], row)))
        else:
            err.append(orjson.dumps(error_line(custom_ids[line], row)))
    return (
        b"".join(x + b"\n" for x in out),
        b"".join(x + b"\n" for x in err),
        len(out),
        len(err),
    )
