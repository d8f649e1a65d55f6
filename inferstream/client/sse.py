"""An incremental parser of ``text/event-stream`` (the WHATWG rules the API's streams follow).

Bytes go in as they arrive, in chunks of any size; whole events come out. Comment lines
(``: keep-alive``, the heartbeat) and unknown fields are skipped; ``data`` lines join with
``\\n``; ``id`` persists until changed, as ``Last-Event-ID`` does; ``retry`` is the server's
reconnection delay in milliseconds. Lines end with ``\\n`` or ``\\r\\n`` (the API never sends a
lone ``\\r``). A line may be as long as the document it carries: no line-length limit, unlike
aiohttp's ``readline``, whose limit a large embedding document exceeds.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RawEvent:
    """One dispatched event: ``id`` is the last id seen on the stream so far (None before any)."""

    data: str
    event: str = "message"
    id: str | None = None


class SseParser:
    """Feed it chunks with :meth:`feed`; ``last_id`` and ``retry_ms`` follow the stream."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._scanned = 0  # bytes of _buf already known to hold no newline
        self._data: list[str] = []
        self._event = ""
        self.last_id: str | None = None
        self.retry_ms: int | None = None

    def feed(self, chunk: bytes) -> list[RawEvent]:
        """The events that ``chunk`` completes, in order."""
        self._buf += chunk
        out: list[RawEvent] = []
        start = 0
        while True:
            end = self._buf.find(b"\n", max(start, self._scanned))
            if end < 0:
                break
            line = bytes(self._buf[start:end])
            start = end + 1
            if line.endswith(b"\r"):
                line = line[:-1]
            event = self._line(line.decode("utf-8", errors="replace"))
            if event is not None:
                out.append(event)
        del self._buf[:start]
        self._scanned = len(self._buf)
        return out

    def _line(self, line: str) -> RawEvent | None:
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None  # a comment: the heartbeat
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id":
            if "\0" not in value:
                self.last_id = value
        elif name == "retry":
            if value.isdigit():
                self.retry_ms = int(value)
        return None

    def _dispatch(self) -> RawEvent | None:
        data, event = self._data, self._event
        self._data, self._event = [], ""
        if not data:
            return None  # the spec: an event without data is not dispatched
        return RawEvent(data="\n".join(data), event=event or "message", id=self.last_id)
