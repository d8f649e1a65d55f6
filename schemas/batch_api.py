"""The Batch API's bodies and answers as typed models (msgspec), for the OpenAPI spec: OpenAI's shapes.

The file and batch objects are OpenAI's (``openai.types.FileObject``,
``openai.types.Batch``), so the official client reads them; the errors are
Inferstream's (``{"error": {"type", "message", ...}}``) with the lines or the
missing quota a client needs to fix its request. Fields that OpenAI leaves
out or sets to ``null`` until they apply (timestamps, output files) are
optional and nullable here. No model forbids unknown fields: newer OpenAI
clients send more than these, and answers may grow.
"""

from __future__ import annotations

from typing import Annotated, Literal

from msgspec import UNSET, Meta, Struct, UnsetType

from schemas.documents import ErrorDetail

FILE_ID_PATTERN = "^file-[0-9a-fA-F]{24}$"
BATCH_ID_PATTERN = "^batch_[0-9a-fA-F]{24}$"
FileId = Annotated[str, Meta(pattern=FILE_ID_PATTERN)]
BatchId = Annotated[str, Meta(pattern=BATCH_ID_PATTERN, description="Sorts by creation time.")]
Seconds = Annotated[int, Meta(description="Unix seconds.")]
BatchEndpoint = Literal["/v1/embeddings", "/v1/completions", "/v1/chat/completions"]
BatchStatus = Literal[
    "validating",
    "failed",
    "in_progress",
    "finalizing",
    "completed",
    "expired",
    "cancelling",
    "cancelled",
]
Metadata = Annotated[
    dict[str, Annotated[str, Meta(max_length=512)]],
    Meta(max_length=16, description="Up to 16 pairs, kept with the batch and shown as given."),
]


class FileObject(Struct):
    """A stored file: an upload (``batch``) or a batch's output or error file (``batch_output``)."""

    id: FileId
    object: Literal["file"]
    bytes: int
    created_at: Seconds
    filename: str
    purpose: Literal["batch", "batch_output"]
    status: Literal["uploaded", "processed", "error"]
    status_details: str | None = None


class FileList(Struct):
    """``GET /v1/files``: newest first; pass ``last_id`` as ``after`` for the next page."""

    object: Literal["list"]
    data: list[FileObject]
    first_id: FileId | None
    last_id: FileId | None
    has_more: bool


class FileDeleted(Struct):
    """``DELETE /v1/files/{id}``."""

    id: FileId
    object: Literal["file"]
    deleted: bool


class BatchCreateBody(Struct):
    """The body of ``POST /v1/batches``: each line of the input file becomes one request of the pipeline."""

    input_file_id: FileId
    endpoint: BatchEndpoint
    completion_window: Annotated[
        Literal["24h"], Meta(description="Lines still waiting when it ends expire (refunded).")
    ]
    metadata: Metadata | None = None


class BatchRequestCounts(Struct):
    """``failed`` counts the lines that failed or expired; cancelled lines are in neither count."""

    total: int
    completed: int
    failed: int


class BatchError(Struct):
    code: str
    message: str
    param: str | None = None
    line: int | None = None


class BatchErrors(Struct):
    object: Literal["list"]
    data: list[BatchError]


class BatchObject(Struct):
    """OpenAI's batch object: live progress while it runs, the output and error files once final."""

    id: BatchId
    object: Literal["batch"]
    endpoint: BatchEndpoint
    input_file_id: FileId
    completion_window: str
    status: BatchStatus
    created_at: Seconds
    request_counts: BatchRequestCounts
    errors: BatchErrors | None = None
    output_file_id: Annotated[
        FileId | None,
        Meta(description="The completed lines, in line order; null when none completed."),
    ] = None
    error_file_id: Annotated[
        FileId | None,
        Meta(description="The other lines (failed, expired, cancelled); null when none."),
    ] = None
    in_progress_at: Seconds | None = None
    expires_at: Seconds | None = None
    finalizing_at: Seconds | None = None
    completed_at: Seconds | None = None
    failed_at: Seconds | None = None
    expired_at: Seconds | None = None
    cancelling_at: Seconds | None = None
    cancelled_at: Seconds | None = None
    metadata: dict[str, str] | None = None


class BatchList(Struct):
    """``GET /v1/batches``: newest first; pass ``last_id`` as ``after`` for the next page."""

    object: Literal["list"]
    data: list[BatchObject]
    first_id: BatchId | None
    last_id: BatchId | None
    has_more: bool


class LineError(Struct):
    line: Annotated[int, Meta(ge=1, description="1-based line of the file.")]
    message: str


class LineErrorDetail(ErrorDetail):
    errors: (
        Annotated[
            list[LineError],
            Meta(
                max_length=100, description="The first 100 problems; the message counts them all."
            ),
        ]
        | UnsetType
    ) = UNSET


class LineErrorBody(Struct):
    """400 ``invalid_request``; with ``errors`` when lines of the file are at fault (nothing stored or charged)."""

    error: LineErrorDetail


class BatchRequestsCharged(Struct):
    used: int
    limit: int
    needed: Annotated[int, Meta(description="The batch's lines.")]
    missing: int


class BatchTokensCharged(Struct):
    used: int
    reserved: int
    limit: int
    estimated: Annotated[int, Meta(description="The batch's estimated tokens, all lines together.")]
    missing: int


class BatchQuotaErrorDetail(ErrorDetail):
    requests: BatchRequestsCharged | UnsetType = UNSET
    tokens: BatchTokensCharged | UnsetType = UNSET


class BatchQuotaErrorBody(Struct):
    """429 ``request_quota_exceeded`` or ``token_quota_exceeded``: the whole batch is charged or none of it."""

    error: BatchQuotaErrorDetail
