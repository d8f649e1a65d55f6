"""API keys and plans, and the LISTEN/NOTIFY channel their changes are announced on."""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from typing import Any

import asyncpg

from bridges.clients.store.pool import Aggregate, Pool
from inferstream.apikeys import hash_key
from inferstream.errors import InvalidRequest
from inferstream.settings import PRIORITIES, Settings
from schemas.plans import KeyRecord, Plan

KEY_PREFIX = "isk_"


class Keys(Aggregate):
    """Keys are stored as their HMAC under ``settings.key_secret``; every change is notified on :attr:`channel`."""

    def __init__(self, pool: Pool, settings: Settings) -> None:
        super().__init__(pool)
        self._secret = settings.key_secret

    @property
    def channel(self) -> str:
        """The LISTEN/NOTIFY channel of key and plan changes: ``key:<digest>`` or ``plan:<name>``."""
        return f"{self.pool.schema}_keys"

    async def create_key(self, user_id: str, plan: str = "default") -> str:
        """A new key for ``user_id``; the key is returned once and only its HMAC is stored."""
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        try:
            # The notification (sent at commit) drops a cached "unknown" answer for the digest.
            await self.pool.execute(
                "WITH k AS (INSERT INTO api_keys (key_hash, key_prefix, user_id, plan) VALUES ($1, $2, $3, $4)"
                " RETURNING key_hash) SELECT pg_notify($5, 'key:' || key_hash) FROM k",
                hash_key(self._secret, key),
                key[:8],
                user_id,
                plan,
                self.channel,
            )
        except asyncpg.ForeignKeyViolationError:
            known = sorted(await self.load_plans())
            raise InvalidRequest(
                f"unknown plan {plan!r}; known plans: {', '.join(known)}"
            ) from None
        return key

    async def revoke_key(self, key: str) -> bool:
        """True if an active key was revoked."""
        # One statement: the revocation and its notification commit together (workers drop the
        # digest on the notification; none can miss a committed revocation while listening).
        revoked = await self.pool.write(
            "WITH r AS (UPDATE api_keys SET revoked_at = now() WHERE key_hash = $1 AND revoked_at IS NULL"
            " RETURNING key_hash) SELECT pg_notify($2, 'key:' || key_hash) FROM r",
            hash_key(self._secret, key),
            self.channel,
        )
        return len(revoked) == 1

    async def find_key(self, digest: str) -> tuple[KeyRecord, Plan | None] | None:
        """The active key with this digest and its plan's row, for a cache miss; StoreUnavailable if PostgreSQL is down."""
        row = await self.pool.read_one(
            "SELECT k.user_id, k.plan AS key_plan, p.* FROM api_keys k LEFT JOIN plans p ON p.name = k.plan"
            " WHERE k.key_hash = $1 AND k.revoked_at IS NULL",
            digest,
        )
        if row is None:
            return None
        return KeyRecord(user_id=row["user_id"], plan=row["key_plan"]), (_plan(row) if row["name"] else None)

    async def load_keys(self) -> dict[str, KeyRecord]:
        """Active keys by hash."""
        rows = await self.pool.read("SELECT key_hash, user_id, plan FROM api_keys WHERE revoked_at IS NULL")
        return {r["key_hash"]: KeyRecord(user_id=r["user_id"], plan=r["plan"]) for r in rows}

    async def set_plan(
        self,
        name: str,
        requests_per_day: int,
        tokens_per_day: int,
        requests_per_minute: int,
        max_priority: str = "high",
        admin: bool | None = None,
        batch_priority: str | None = None,
    ) -> Plan:
        """Create or change a plan; ``admin`` and ``batch_priority`` None keep what a plan has (a new
        plan: not admin, batches at ``low``)."""
        for label, value in (("max_priority", max_priority), ("batch_priority", batch_priority)):
            if value is not None and value not in PRIORITIES:
                raise InvalidRequest(f"{label} must be one of {', '.join(PRIORITIES)}, not {value!r}")
        if min(requests_per_day, tokens_per_day, requests_per_minute) < 0:
            raise InvalidRequest("plan limits must not be negative")
        (row,) = await self.pool.write(
            "WITH p AS (INSERT INTO plans (name, requests_per_day, tokens_per_day, requests_per_minute, max_priority,"
            " admin, batch_priority) VALUES ($1, $2, $3, $4, $5, coalesce($7, false), coalesce($8, 'low'))"
            " ON CONFLICT (name) DO UPDATE SET"
            " requests_per_day = EXCLUDED.requests_per_day, tokens_per_day = EXCLUDED.tokens_per_day,"
            " requests_per_minute = EXCLUDED.requests_per_minute, max_priority = EXCLUDED.max_priority,"
            " admin = coalesce($7, plans.admin), batch_priority = coalesce($8, plans.batch_priority),"
            " updated_at = now() RETURNING *) SELECT p.*, pg_notify($6, 'plan:' || p.name) FROM p",
            name,
            requests_per_day,
            tokens_per_day,
            requests_per_minute,
            max_priority,
            self.channel,
            admin,
            batch_priority,
        )
        return _plan(row)

    async def load_plans(self) -> dict[str, Plan]:
        return {r["name"]: _plan(r) for r in await self.pool.read("SELECT * FROM plans")}


def _plan(row: Mapping[str, Any]) -> Plan:
    return Plan(
        name=row["name"],
        requests_per_day=row["requests_per_day"],
        tokens_per_day=row["tokens_per_day"],
        requests_per_minute=row["requests_per_minute"],
        max_priority=row["max_priority"],
        admin=bool(row.get("admin", False)),
        batch_priority=row.get("batch_priority") or "low",
        updated_at=row["updated_at"].timestamp(),
    )
