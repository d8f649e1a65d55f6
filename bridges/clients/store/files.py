"""Files of the Batch API: uploads (``purpose = batch``) and batch results (``batch_output``), stored in parts.

A file is a ``files`` row and its bytes split into ``file_parts`` (4 MiB each
by the gateway), so an upload is stored as it streams in and a download is
streamed back part by part without holding the file in memory. An upload
being written has ``complete = false``: no one can read or list it until
:meth:`Files.finish`; one left behind by a crashed worker is purged by a
later :meth:`Files.create`. A file that is the input of a batch not yet
final is only marked deleted by its owner (``deleted_at``: absent to them
from then on) and purged when that batch finalizes, so the batch can still
read its lines.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from bridges.clients.store.pool import Aggregate, limit_of

PART_BYTES = 4 * 1024 * 1024
# An upload still incomplete after this long was abandoned (its worker died mid-stream).
STALE_UPLOAD_S = 6 * 3600
# Batch statuses after which a batch reads its input file no more.
FINAL_BATCH_STATUSES: tuple[str, ...] = ("completed", "failed", "expired", "cancelled")
_FINAL = ", ".join(f"'{s}'" for s in FINAL_BATCH_STATUSES)
Row = dict[str, Any]
Rows = list[Row]  # module level: the aggregate's own `list` method shadows the builtin in its body
_ROW = "file_id, user_id, purpose, filename, bytes, lines, created_at"


class Files(Aggregate):
    async def create(self, file_id: str, user_id: str, purpose: str, filename: str) -> None:
        """Start an upload (invisible until :meth:`finish`); purges uploads abandoned long ago."""
        await self.pool.execute(
            "WITH stale AS (DELETE FROM files WHERE NOT complete"
            " AND created_at < now() - make_interval(secs => $5))"
            " INSERT INTO files (file_id, user_id, purpose, filename, bytes) VALUES ($1, $2, $3, $4, 0)",
            file_id,
            user_id,
            purpose,
            filename,
            float(STALE_UPLOAD_S),
        )

    async def put_part(self, file_id: str, part: int, data: bytes) -> None:
        """Part ``part`` (0-based) of an upload; writing a part again replaces it."""
        await self.pool.execute(
            "INSERT INTO file_parts (file_id, part, data) VALUES ($1, $2, $3)"
            " ON CONFLICT (file_id, part) DO UPDATE SET data = EXCLUDED.data",
            file_id,
            part,
            data,
        )

    async def finish(self, file_id: str, bytes_: int, lines: int) -> dict[str, Any]:
        """Make the upload visible with its size and line count; returns the file row."""
        rows = await self.pool.write(
            f"UPDATE files SET bytes = $2, lines = $3, complete = true WHERE file_id = $1 RETURNING {_ROW}",
            file_id,
            bytes_,
            lines,
        )
        if not rows:
            raise LookupError(f"no upload {file_id!r} to finish")
        return rows[0]

    async def put(
        self, file_id: str, user_id: str, purpose: str, filename: str, content: bytes, lines: int
    ) -> dict[str, Any]:
        """A whole file in one transaction; replaces an earlier file of that id (a finalizer's retry)."""
        parts = [
            (file_id, i, content[at : at + PART_BYTES])
            for i, at in enumerate(range(0, len(content), PART_BYTES))
        ]
        async with self.pool.transaction() as conn:
            row = await conn.fetchrow(
                "INSERT INTO files (file_id, user_id, purpose, filename, bytes, lines, complete)"
                " VALUES ($1, $2, $3, $4, $5, $6, true)"
                " ON CONFLICT (file_id) DO UPDATE SET user_id = EXCLUDED.user_id,"
                " purpose = EXCLUDED.purpose, filename = EXCLUDED.filename, bytes = EXCLUDED.bytes,"
                f" lines = EXCLUDED.lines, complete = true, deleted_at = NULL RETURNING {_ROW}",
                file_id,
                user_id,
                purpose,
                filename,
                len(content),
                lines,
            )
            await conn.execute("DELETE FROM file_parts WHERE file_id = $1", file_id)
            if parts:
                await conn.copy_records_to_table(
                    "file_parts", records=parts, columns=("file_id", "part", "data")
                )
        return dict(row)

    async def get(self, user_id: str, file_id: str) -> dict[str, Any] | None:
        """The file row; None when absent, still uploading, deleted, or someone else's."""
        return await self.pool.read_one(
            f"SELECT {_ROW} FROM files WHERE file_id = $1 AND user_id = $2"
            " AND complete AND deleted_at IS NULL",
            file_id,
            user_id,
        )

    async def list(
        self, user_id: str, *, purpose: str | None = None, limit: int = 20, after: str | None = None
    ) -> Rows:
        """The user's readable files newest first; ``after`` is the last file id of the previous page."""
        return await self.pool.read(
            f"SELECT {_ROW} FROM files WHERE user_id = $1 AND complete AND deleted_at IS NULL"
            " AND ($2::text IS NULL OR purpose = $2) AND ($3::text IS NULL OR file_id < $3)"
            f" ORDER BY file_id DESC LIMIT {limit_of(limit)}",
            user_id,
            purpose,
            after,
        )

    async def content(self, user_id: str, file_id: str) -> AsyncIterator[bytes]:
        """The file's bytes, part by part in order (nothing when :meth:`get` would be None).

        One query per part, so no connection is held while the caller sends a part on.
        """
        rows = await self.pool.read(
            "SELECT p.part FROM file_parts p JOIN files f USING (file_id)"
            " WHERE f.file_id = $1 AND f.user_id = $2 AND f.complete AND f.deleted_at IS NULL"
            " ORDER BY p.part",
            file_id,
            user_id,
        )
        for row in rows:
            part = await self.pool.read_one(
                "SELECT data FROM file_parts WHERE file_id = $1 AND part = $2", file_id, row["part"]
            )
            if part is None:  # deleted while it was being read
                return
            yield bytes(part["data"])

    async def read_all(self, file_id: str) -> bytes:
        """The whole file, whoever owns it and even if marked deleted (a batch reading its input)."""
        rows = await self.pool.read(
            "SELECT data FROM file_parts WHERE file_id = $1 ORDER BY part", file_id
        )
        return b"".join(bytes(r["data"]) for r in rows)

    async def delete(self, user_id: str, file_id: str) -> bool:
        """Delete the caller's file; False when :meth:`get` would be None.

        The input of a batch not yet final is only marked deleted (purged when
        the batch finalizes, :meth:`purge_if_deleted`); anything else goes at once.
        """
        rows = await self.pool.write(
            "WITH f AS (SELECT file_id FROM files WHERE file_id = $1 AND user_id = $2"
            " AND complete AND deleted_at IS NULL),"
            " busy AS (SELECT 1 FROM batches WHERE user_id = $2 AND input_file_id = $1"
            f" AND status NOT IN ({_FINAL}) LIMIT 1),"
            " soft AS (UPDATE files SET deleted_at = now() WHERE file_id IN (SELECT file_id FROM f)"
            " AND EXISTS (SELECT 1 FROM busy) RETURNING file_id),"
            " hard AS (DELETE FROM files WHERE file_id IN (SELECT file_id FROM f)"
            " AND NOT EXISTS (SELECT 1 FROM busy) RETURNING file_id)"
            " SELECT file_id FROM soft UNION ALL SELECT file_id FROM hard",
            file_id,
            user_id,
        )
        return bool(rows)

    async def purge_if_deleted(self, file_id: str) -> None:
        """Remove a file its owner deleted while a batch read it (the batch has finalized)."""
        await self.pool.execute(
            "DELETE FROM files WHERE file_id = $1 AND deleted_at IS NOT NULL", file_id
        )

    async def discard(self, file_id: str) -> None:
        """Remove an upload that failed (too large, invalid lines, the client went away), parts and all."""
        await self.pool.execute("DELETE FROM files WHERE file_id = $1", file_id)
