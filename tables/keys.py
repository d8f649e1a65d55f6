"""The API-key and plan cache every gateway reads: loaded from PostgreSQL, refreshed every few seconds.

The gateway never queries PostgreSQL per request. A key is looked up by its
HMAC-SHA256 digest (the raw key is never stored) and the stored digest is
compared in constant time. A revoked key disappears at the next refresh
(``INFERSTREAM_KEY_REFRESH_S``, 2 s by default).
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from dataclasses import dataclass

from inferstream.apikeys import hash_key
from inferstream.errors import Unauthorized, Unavailable
from schemas.plans import DEFAULT_PLAN, Plan


@dataclass(frozen=True)
class Principal:
    user_id: str
    plan: Plan


class KeyCache:
    def __init__(self, secret: str) -> None:
        self._secret = secret
        self._keys: dict[str, tuple[str, str, str]] = {}  # digest -> (stored digest, user_id, plan)
        self._plans: dict[str, Plan] = {}
        self.loaded = False

    def replace(self, keys: Mapping[str, tuple[str, str]], plans: Mapping[str, Plan]) -> None:
        """``keys`` maps a stored digest to (user_id, plan name)."""
        self._keys = {digest: (digest, user, plan) for digest, (user, plan) in keys.items()}
        self._plans = dict(plans)
        self.loaded = True

    def plan(self, name: str) -> Plan:
        return self._plans.get(name) or (DEFAULT_PLAN if name == "default" else self._plans.get("default", DEFAULT_PLAN))

    def authenticate(self, key: str | None) -> Principal:
        if not key:
            raise Unauthorized("missing API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'")
        if not self.loaded:
            raise Unavailable("API keys are still loading", retry_after=1)
        digest = hash_key(self._secret, key)
        found = self._keys.get(digest)
        # Found by digest (which says nothing about the key); confirmed in constant time.
        if found is None or not hmac.compare_digest(found[0], digest):
            raise Unauthorized("invalid or revoked API key")
        _, user_id, plan_name = found
        return Principal(user_id=user_id, plan=self.plan(plan_name))
