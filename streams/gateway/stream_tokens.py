"""Event-stream tokens: short-lived, signed, one request of one user, for a browser's ``EventSource``.

``EventSource`` cannot send an ``Authorization`` header, so the owner of a request mints a token
(``POST /v1/requests/{id}/events/token``, authenticated with the API key) and the page opens
``GET /v1/requests/{id}/events?token=...``. A token is
``<payload>.<signature>``, both base64url without padding: the payload is the JSON array
``[version, request_id, user_id, expires_at]`` (Unix seconds), the signature HMAC-SHA256 of the
payload's text under a key derived from ``INFERSTREAM_KEY_SECRET`` with its own label, so a token
can never stand for an API-key digest or a webhook signature (and changing the secret voids every
token). Nothing is stored: a token cannot be revoked, which is why it lives only
``INFERSTREAM_STREAM_TOKEN_TTL_S`` (300 s) and opens only the event stream of its one request,
which costs no quota. A token whose stream is open keeps it open past its expiry: it is checked
when the stream starts, as a key is.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from dataclasses import dataclass

import orjson

from inferstream import clock
from inferstream.errors import Unauthorized

VERSION = 1
_LABEL = b"inferstream/stream-token/v1"
# A token longer than this is not one of ours: refused before any decoding work.
MAX_TOKEN_CHARS = 512


class TokenRefused(Unauthorized):
    """The token is malformed, tampered with, expired or for another request (answered 401)."""


@dataclass(frozen=True)
class StreamGrant:
    """What a valid token lets its bearer do: follow ``request_id`` of ``user_id`` until ``expires_at``."""

    request_id: str
    user_id: str
    expires_at: float


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def derive_key(key_secret: str) -> bytes:
    """The signing key: the secret under the label's HMAC, so it equals no key digest.

    Key digests are HMACs keyed by the secret itself (``inferstream.apikeys``): keying by the
    label instead means no API key, whatever its text, has a digest that is this key.
    """
    return hmac.new(_LABEL, key_secret.encode(), hashlib.sha256).digest()


class StreamTokens:
    """Mints and checks stream tokens under one server secret; the clock is injectable for tests."""

    def __init__(self, key_secret: str, ttl_s: float, now: clock.Clock = clock.now) -> None:
        self._key = derive_key(key_secret)
        self.ttl_s = ttl_s
        self._now = now

    def _sign(self, payload: str) -> str:
        return _b64(hmac.new(self._key, payload.encode("ascii"), hashlib.sha256).digest())

    def mint(self, request_id: str, user_id: str) -> tuple[str, float]:
        """A token for ``user_id``'s ``request_id`` (ownership checked by the caller) and when it expires."""
        expires_at = round(self._now() + self.ttl_s, 3)
        payload = _b64(orjson.dumps([VERSION, request_id, user_id, expires_at]))
        return f"{payload}.{self._sign(payload)}", expires_at

    def check(self, token: str, request_id: str) -> StreamGrant:
        """The grant of a valid token for ``request_id``; :class:`TokenRefused` saying why otherwise."""
        if not token or len(token) > MAX_TOKEN_CHARS or token.count(".") != 1:
            raise TokenRefused("malformed stream token")
        payload, signature = token.split(".")
        try:
            expected = self._sign(payload)
        except UnicodeEncodeError:
            raise TokenRefused("malformed stream token") from None
        # Constant time: the signature is the secret-derived part a guesser would steer towards.
        if not hmac.compare_digest(expected.encode("ascii"), signature.encode("utf-8", "replace")):
            raise TokenRefused("invalid stream token signature")
        try:
            version, rid, uid, expires_at = orjson.loads(_unb64(payload))
        except (binascii.Error, ValueError, TypeError):
            raise TokenRefused("malformed stream token") from None
        if (
            version != VERSION
            or not isinstance(rid, str)
            or not isinstance(uid, str)
            or not isinstance(expires_at, int | float)
        ):
            raise TokenRefused("malformed stream token")
        if rid != request_id:
            raise TokenRefused("this stream token is for another request")
        if self._now() >= expires_at:
            raise TokenRefused("stream token expired; mint a new one")
        return StreamGrant(request_id=rid, user_id=uid, expires_at=float(expires_at))
