"""``/v1/files``: OpenAI's Files API for batch input (uploads) and batch results (downloads), on any worker.

Files live in PostgreSQL (:class:`bridges.clients.store.files.Files`), so every
worker answers every route; a file is its owner's only (another user's is
404). An upload is a ``multipart/form-data`` body read as a stream, never
whole: the ``file`` field is cut into parts of ``PART_BYTES`` stored as they
arrive, and each of its lines is checked on the way
(:func:`schemas.batch_lines.check_upload_line`; a line may span reads). Any
problem (too large: 413; a bad line, too many lines, a wrong ``purpose``:
400 listing the lines) removes what was stored: a file is kept whole and
valid, or not at all.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import faust
from aiohttp import BodyPartReader, MultipartReader, web
from aiohttp.http_exceptions import HttpProcessingError
from faust.web import View

from bridges.clients.store.files import PART_BYTES, Files
from inferstream.errors import InvalidRequest, NotFound, PayloadTooLarge, StoreUnavailable
from inferstream.ids import is_file_id, new_file_id
from schemas.batch_lines import LineSplitter, Problems, check_upload_line
from streams.gateway.context import Gateway
from streams.gateway.cors import preflight
from streams.gateway.http import api_key, json_response, query_int
from streams.gateway.views import endpoint
from tables.keys import Principal

log = logging.getLogger(__name__)

PURPOSES = ("batch", "batch_output")
UPLOAD_PURPOSE = "batch"
MAX_FILENAME = 255
READ_CHUNK = 256 * 1024
FIELD_BYTES = 16 * 1024
# Multipart framing around the file (boundaries, part headers, the purpose field): a body whose
# Content-Length passes the limit by more than this cannot hold a file within it.
FRAMING_SLACK = 64 * 1024

Authenticate = Callable[[str | None], Awaitable[Principal]]


def file_object(row: dict[str, Any]) -> dict[str, Any]:
    """A ``files`` row as OpenAI's file object."""
    return {
        "id": row["file_id"],
        "object": "file",
        "bytes": int(row["bytes"]),
        "created_at": int(row["created_at"].timestamp()),
        "filename": row["filename"],
        "purpose": row["purpose"],
        "status": "processed",
        "status_details": None,
    }


def content_type_of(filename: str) -> str:
    return (
        "application/jsonl" if filename.lower().endswith(".jsonl") else "application/octet-stream"
    )


class _Upload:
    """One upload: its ``purpose`` field, and its ``file`` field streaming into the store (parts written
    as they fill, lines checked as they end)."""

    def __init__(self, files: Files, file_id: str, max_bytes: int, max_lines: int) -> None:
        self.files = files
        self.file_id = file_id
        self.max_bytes = max_bytes
        self.max_lines = max_lines
        self.purpose: str | None = None
        self.field_bytes = 0  # of the fields other than `file`, all together
        self.created = False  # the files row exists: remove it if the upload fails
        self.size = 0
        self.lines = 0
        self.parts = 0
        self.problems = Problems()
        self._buffer = bytearray()
        self._splitter = LineSplitter()
        self._seen: set[str] = set()

    async def read_fields(self, reader: MultipartReader, user_id: str) -> None:
        try:
            while (part := await reader.next()) is not None:
                if not isinstance(part, BodyPartReader):
                    raise InvalidRequest("nested multipart bodies are not accepted")
                if part.name == "file":
                    await self._start(user_id, part.filename)
                    await self.read(part)
                    continue
                value = await self._small_field(part)  # unknown fields are read and ignored
                if part.name == "purpose":
                    self.purpose = value.decode("utf-8", "replace").strip()
        except (ValueError, HttpProcessingError) as exc:
            # aiohttp's multipart parser: a broken boundary (ValueError) or part header (InvalidHeader)
            raise InvalidRequest(f"malformed multipart body: {exc}") from None

    async def _small_field(self, part: BodyPartReader) -> bytes:
        """A field other than ``file``, bounded: they are names, not data."""
        value = bytearray()
        while chunk := await part.read_chunk(FIELD_BYTES):
            value += chunk
            self.field_bytes += len(chunk)
            if self.field_bytes > FIELD_BYTES:
                raise InvalidRequest(
                    f"the fields beside 'file' hold more than {FIELD_BYTES} bytes", field=part.name
                )
        return bytes(value)

    async def _start(self, user_id: str, filename: str | None) -> None:
        if self.created:
            raise InvalidRequest("send one 'file' field", field="file")
        name = filename or "file.jsonl"
        if len(name) > MAX_FILENAME:
            raise InvalidRequest(
                f"the filename is longer than {MAX_FILENAME} characters", field="file"
            )
        self.created = True  # before the insert: a failure around it must still clean up
        await self.files.create(self.file_id, user_id, UPLOAD_PURPOSE, name)

    async def read(self, part: BodyPartReader) -> None:
        while chunk := await part.read_chunk(READ_CHUNK):
            self.size += len(chunk)
            if self.size > self.max_bytes:
                raise PayloadTooLarge(
                    f"the file is larger than {self.max_bytes} bytes", limit=self.max_bytes
                )
            self._check(self._splitter.feed(chunk))
            if self.problems:
                continue  # nothing will be kept: read on for the other lines' problems only
            self._buffer += chunk
            while len(self._buffer) >= PART_BYTES:
                await self._flush(PART_BYTES)
        self._check(self._splitter.end())
        if not self.problems and self._buffer:
            await self._flush(len(self._buffer))

    def _check(self, lines: list[bytes]) -> None:
        for raw in lines:
            self.lines += 1
            if self.lines > self.max_lines:
                raise InvalidRequest(
                    f"the file has more than {self.max_lines} lines (one request each)",
                    field="file",
                    limit=self.max_lines,
                )
            problem = check_upload_line(raw, self.lines, self._seen)
            if problem is not None:
                self.problems.add(self.lines, problem)

    async def _flush(self, n: int) -> None:
        data = bytes(self._buffer[:n])
        del self._buffer[:n]
        await self.files.put_part(self.file_id, self.parts, data)
        self.parts += 1


class FileViews:
    """The routes' work, independent of the web framework mounting them (Faust here, plain aiohttp in tests)."""

    def __init__(
        self, files: Files, authenticate: Authenticate, *, max_bytes: int, max_lines: int
    ) -> None:
        self.files = files
        self.authenticate = authenticate
        self.max_bytes = max_bytes
        self.max_lines = max_lines
        self._discards: set[asyncio.Task[None]] = set()

    async def upload(self, request: web.Request) -> web.StreamResponse:
        """``POST /v1/files``: ``purpose=batch`` and ``file`` (JSONL), stored only if every line is valid."""
        principal = await self.authenticate(api_key(request))
        if request.content_type != "multipart/form-data":
            raise InvalidRequest(
                "the body must be multipart/form-data with fields 'purpose' and 'file'"
            )
        limit = self.max_bytes + FRAMING_SLACK
        if request.content_length is not None and request.content_length > limit:
            raise PayloadTooLarge(
                f"the file is larger than {self.max_bytes} bytes", limit=self.max_bytes
            )
        try:
            reader = await request.multipart()
        except (ValueError, AssertionError) as exc:
            raise InvalidRequest(f"malformed multipart body: {exc}") from None
        upload = _Upload(self.files, new_file_id(), self.max_bytes, self.max_lines)
        try:
            await upload.read_fields(reader, principal.user_id)
            if not upload.created:
                raise InvalidRequest("the 'file' field is missing", field="file")
            if upload.purpose is None:
                raise InvalidRequest("the 'purpose' field is missing", field="purpose")
            if upload.purpose != UPLOAD_PURPOSE:
                raise InvalidRequest(
                    f"'purpose' must be {UPLOAD_PURPOSE!r} (the only upload this API takes),"
                    f" not {upload.purpose!r}",
                    field="purpose",
                )
            upload.problems.raise_if_any()
            if upload.lines == 0:
                raise InvalidRequest("the file is empty", field="file")
            row = await self.files.finish(upload.file_id, upload.size, upload.lines)
        except BaseException:
            if upload.created:
                self._discard(upload.file_id)
            raise
        return json_response(file_object(row))

    def _discard(self, file_id: str) -> None:
        """Remove a failed upload in the background: it must finish even if the request was cancelled
        (the client went away); if PostgreSQL is down, a later upload purges it (STALE_UPLOAD_S)."""

        async def discard() -> None:
            try:
                await self.files.discard(file_id)
            except StoreUnavailable as exc:
                log.warning("could not remove the failed upload %s: %s", file_id, exc)

        task = asyncio.ensure_future(discard())
        self._discards.add(task)
        task.add_done_callback(self._discards.discard)

    async def settle(self) -> None:
        """Wait for background removals of failed uploads (tests; shutdown)."""
        while self._discards:
            await asyncio.gather(*self._discards, return_exceptions=True)

    async def list_mine(self, request: web.Request) -> web.StreamResponse:
        """``GET /v1/files``: the caller's files newest first (``?purpose=&limit=&after=``)."""
        principal = await self.authenticate(api_key(request))
        purpose = request.query.get("purpose")
        if purpose is not None and purpose not in PURPOSES:
            raise InvalidRequest(f"'purpose' must be one of {list(PURPOSES)}", field="purpose")
        limit = query_int(request, "limit", 100, 1, 1000)
        after = request.query.get("after")
        if after is not None and not is_file_id(after):
            raise InvalidRequest("'after' must be a file id", field="after")
        rows = await self.files.list(
            principal.user_id, purpose=purpose, limit=limit + 1, after=after
        )
        data = [file_object(r) for r in rows[:limit]]
        return json_response(
            {
                "object": "list",
                "data": data,
                "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None,
                "has_more": len(rows) > limit,
            }
        )

    async def _owned(self, request: web.Request, file_id: str) -> tuple[Principal, dict[str, Any]]:
        principal = await self.authenticate(api_key(request))
        row = await self.files.get(principal.user_id, file_id) if is_file_id(file_id) else None
        if row is None:
            raise NotFound(f"no file {file_id!r}")
        return principal, row

    async def get_one(self, request: web.Request, file_id: str) -> web.StreamResponse:
        """``GET /v1/files/{id}``."""
        _, row = await self._owned(request, file_id)
        return json_response(file_object(row))

    async def content(self, request: web.Request, file_id: str) -> web.StreamResponse:
        """``GET /v1/files/{id}/content``: the bytes as stored, streamed part by part."""
        principal, row = await self._owned(request, file_id)
        response = web.StreamResponse(
            headers={
                "Content-Type": content_type_of(row["filename"]),
                "Content-Disposition": f'attachment; filename="{_quoted(row["filename"])}"',
            }
        )
        response.content_length = int(row["bytes"])
        await response.prepare(request)
        sent = 0
        async for chunk in self.files.content(principal.user_id, file_id):
            await response.write(chunk)
            sent += len(chunk)
        if sent != row["bytes"]:
            # Deleted while it was read: the promised length cannot be met; end the connection so
            # the client sees a truncated body rather than waiting for the rest.
            log.warning("file %s ended after %d of %d bytes", file_id, sent, row["bytes"])
            if request.transport is not None:
                request.transport.close()
            return response
        await response.write_eof()
        return response

    async def delete(self, request: web.Request, file_id: str) -> web.StreamResponse:
        """``DELETE /v1/files/{id}``: gone at once, or hidden until the batch reading it finalizes."""
        principal = await self.authenticate(api_key(request))
        if not is_file_id(file_id) or not await self.files.delete(principal.user_id, file_id):
            raise NotFound(f"no file {file_id!r}")
        return json_response({"id": file_id, "object": "file", "deleted": True})

    def add_routes(self, web_app: web.Application, wrap: Callable[[Any], Any]) -> None:
        """The routes on a plain aiohttp application, each handler passed through ``wrap`` (``guarded``)."""
        web_app.router.add_post("/v1/files", wrap(self.upload))
        web_app.router.add_get("/v1/files", wrap(self.list_mine))
        web_app.router.add_get("/v1/files/{file_id}", _with_id(wrap(self.get_one)))
        web_app.router.add_delete("/v1/files/{file_id}", _with_id(wrap(self.delete)))
        web_app.router.add_get("/v1/files/{file_id}/content", _with_id(wrap(self.content)))


def _with_id(
    handler: Callable[..., Awaitable[web.StreamResponse]],
) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def routed(request: web.Request) -> web.StreamResponse:
        return await handler(request, request.match_info["file_id"])

    return routed


def _quoted(filename: str) -> str:
    return filename.replace("\\", "_").replace('"', "_").encode("ascii", "replace").decode()


def register_files(app: faust.App, gw: Gateway, files: Files) -> FileViews:
    """Mount ``/v1/files`` (upload, list) and ``/v1/files/{id}`` (get, delete, ``/content``)."""
    views = FileViews(
        files,
        gw.keys.authenticate,
        max_bytes=gw.settings.file_max_bytes,
        max_lines=gw.settings.batch_max_lines,
    )

    def bound(
        route: str, fun: Callable[..., Awaitable[web.StreamResponse]]
    ) -> Callable[..., Awaitable[web.StreamResponse]]:
        async def call(_: Gateway, request: web.Request, *args: str) -> web.StreamResponse:
            return await fun(request, *args)

        return endpoint(gw, route, call)

    upload = bound("/v1/files", views.upload)
    list_mine = bound("/v1/files", views.list_mine)
    get_one = bound("/v1/files/{id}", views.get_one)
    delete = bound("/v1/files/{id}", views.delete)
    content = bound("/v1/files/{id}/content", views.content)

    @app.page("/v1/files")
    class FilesView(View):
        async def options(self, request: web.Request) -> web.StreamResponse:
            return preflight(request)

        async def post(self, request: web.Request) -> web.StreamResponse:
            return await upload(request)

        async def get(self, request: web.Request) -> web.StreamResponse:
            return await list_mine(request)

    @app.page("/v1/files/{file_id}")
    class FileView(View):
        async def options(self, request: web.Request, file_id: str) -> web.StreamResponse:
            return preflight(request)

        async def get(self, request: web.Request, file_id: str) -> web.StreamResponse:
            return await get_one(request, file_id)

        async def delete(self, request: web.Request, file_id: str) -> web.StreamResponse:
            return await delete(request, file_id)

    @app.page("/v1/files/{file_id}/content")
    class FileContentView(View):
        async def options(self, request: web.Request, file_id: str) -> web.StreamResponse:
            return preflight(request)

        async def get(self, request: web.Request, file_id: str) -> web.StreamResponse:
            return await content(request, file_id)

    return views
