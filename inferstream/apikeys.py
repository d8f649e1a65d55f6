"""API-key digests: what PostgreSQL stores and what every gateway looks keys up by."""

from __future__ import annotations

import hashlib
import hmac


def hash_key(secret: str, key: str) -> str:
    """Hex HMAC-SHA256 of an API key under the server secret (the raw key is never stored)."""
    return hmac.new(secret.encode(), key.encode(), hashlib.sha256).hexdigest()
