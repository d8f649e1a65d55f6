"""Stream tokens: signed, expiring, scoped to one request and its owner; anything else is refused."""

from __future__ import annotations

import base64

import orjson
import pytest

from inferstream.apikeys import hash_key
from streams.gateway.stream_tokens import MAX_TOKEN_CHARS, StreamTokens, TokenRefused, derive_key

RID = "req_0123456789abcdef01234567"
OTHER = "req_fedcba9876543210fedcba98"


class Clock:
    def __init__(self) -> None:
        self.t = 1_800_000_000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def tokens(clock: Clock) -> StreamTokens:
    return StreamTokens("server-secret", ttl_s=300, now=clock)


def test_a_minted_token_grants_its_request_to_its_owner(tokens: StreamTokens, clock: Clock) -> None:
    token, expires_at = tokens.mint(RID, "alice")
    assert expires_at == clock.t + 300
    grant = tokens.check(token, RID)
    assert (grant.request_id, grant.user_id, grant.expires_at) == (RID, "alice", expires_at)


def test_expired_at_the_ttl(tokens: StreamTokens, clock: Clock) -> None:
    token, _ = tokens.mint(RID, "alice")
    clock.t += 299.9
    tokens.check(token, RID)
    clock.t += 0.1
    with pytest.raises(TokenRefused, match="expired"):
        tokens.check(token, RID)


def test_another_requests_token_is_refused(tokens: StreamTokens) -> None:
    token, _ = tokens.mint(OTHER, "bob")
    with pytest.raises(TokenRefused, match="another request"):
        tokens.check(token, RID)


def _payload(token: str) -> list[object]:
    part = token.split(".")[0]
    loaded: list[object] = orjson.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    return loaded


def _with_payload(token: str, payload: list[object]) -> str:
    body = base64.urlsafe_b64encode(orjson.dumps(payload)).rstrip(b"=").decode()
    return f"{body}.{token.split('.')[1]}"


@pytest.mark.parametrize("index,value", [(1, OTHER), (2, "mallory"), (3, 4_000_000_000.0)])
def test_an_edited_payload_fails_the_signature(tokens: StreamTokens, index: int, value: object) -> None:
    token, _ = tokens.mint(RID, "alice")
    payload = _payload(token)
    payload[index] = value
    with pytest.raises(TokenRefused, match="signature"):
        tokens.check(_with_payload(token, payload), RID)


def test_an_edited_signature_is_refused(tokens: StreamTokens) -> None:
    token, _ = tokens.mint(RID, "alice")
    body, sig = token.split(".")
    flipped = sig[:-2] + ("AA" if sig[-2:] != "AA" else "BB")
    with pytest.raises(TokenRefused, match="signature"):
        tokens.check(f"{body}.{flipped}", RID)


def test_another_secret_does_not_verify(clock: Clock) -> None:
    token, _ = StreamTokens("secret-a", 300, now=clock).mint(RID, "alice")
    with pytest.raises(TokenRefused):
        StreamTokens("secret-b", 300, now=clock).check(token, RID)


@pytest.mark.parametrize(
    "token",
    ["", "abc", "a.b.c", "é.é", "x" * (MAX_TOKEN_CHARS + 1), ".", "e30.AAAA"],
)
def test_malformed_tokens_are_refused(tokens: StreamTokens, token: str) -> None:
    with pytest.raises(TokenRefused):
        tokens.check(token, RID)


def test_a_well_signed_payload_of_the_wrong_shape_is_refused(tokens: StreamTokens) -> None:
    # Signed with the right key (as if by an older version), yet not [1, rid, uid, exp].
    body = base64.urlsafe_b64encode(orjson.dumps({"rid": RID})).rstrip(b"=").decode()
    forged = f"{body}.{tokens._sign(body)}"
    with pytest.raises(TokenRefused, match="malformed"):
        tokens.check(forged, RID)


def test_the_signing_key_is_not_the_key_digest_key() -> None:
    # A token signature can never double as an API-key digest (or the other way round).
    assert derive_key("s") != b"s"
    assert derive_key("s").hex() != hash_key("s", "inferstream/stream-token/v1")


def test_refusal_answers_401_json(tokens: StreamTokens) -> None:
    from streams.gateway.errors import http_status

    with pytest.raises(TokenRefused) as info:
        tokens.check("nope", RID)
    assert http_status(info.value) == 401
    assert info.value.body()["error"]["type"] == "unauthorized"
