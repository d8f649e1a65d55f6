"""JSON in and out: request bodies encoded, answers decoded into the typed models, SSE events into :class:`Event`."""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec

from inferstream.client.errors import ProtocolError
from inferstream.client.models import Event, RequestDoc
from inferstream.client.sse import RawEvent

T = TypeVar("T")

_decoders: dict[type[Any], msgspec.json.Decoder[Any]] = {}
encode = msgspec.json.Encoder().encode


class _Marker(msgspec.Struct):
    """The one key of an event's data that is no part of the document."""

    # "snapshot" on an event that stands for states the server could not replay
    replayed: str | None = None


def decode(body: bytes, type_: type[T]) -> T:
    """``body`` as a ``type_``; anything else is a :class:`ProtocolError`."""
    decoder = _decoders.get(type_)
    if decoder is None:
        decoder = _decoders[type_] = msgspec.json.Decoder(type_)
    try:
        result: T = decoder.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ProtocolError(f"answer is not a {type_.__name__}: {exc}") from exc
    return result


def event_of(raw: RawEvent) -> Event:
    """A parsed event as the API sends it: a numeric id, the status as its name, the document as data."""
    try:
        event_id = int(raw.id) if raw.id is not None else 0
    except ValueError:
        raise ProtocolError(f"event id {raw.id!r} is not a number") from None
    body = raw.data.encode()
    return Event(
        id=event_id,
        event=raw.event,
        data=decode(body, RequestDoc),
        snapshot=decode(body, _Marker).replayed == "snapshot",
    )
