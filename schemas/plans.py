"""Plans (quota limits) and API key records, as loaded from PostgreSQL by every worker."""

from __future__ import annotations

from dataclasses import dataclass, field

from inferstream.settings import PRIORITIES, Priority


@dataclass(frozen=True)
class Plan:
    """A row of the ``plans`` table: the limits a user's keys are held to."""

    name: str
    requests_per_day: int
    tokens_per_day: int
    requests_per_minute: int
    max_priority: Priority = "high"
    # The priority a Batch API batch's lines run at (migration 0006): below interactive work by default.
    batch_priority: Priority = "low"
    # Admins see every user's quota use and every dead letter on /dashboard (migration 0004).
    admin: bool = False
    updated_at: float | None = field(default=None, compare=False)

    def cap_priority(self, priority: str) -> Priority:
        """A priority above the plan's maximum is capped, not rejected."""
        wanted = (
            PRIORITIES.index(priority) if priority in PRIORITIES else PRIORITIES.index("normal")
        )
        return PRIORITIES[min(wanted, PRIORITIES.index(self.max_priority))]

    def cap_batch_priority(self) -> Priority:
        """The priority of the plan's batches: ``batch_priority``, capped by ``max_priority`` (the route's
        own cap still applies on top, as for single requests)."""
        return self.cap_priority(self.batch_priority)


@dataclass(frozen=True)
class KeyRecord:
    """An API key as the gateway knows it: only its HMAC is ever stored."""

    user_id: str
    plan: str
    revoked: bool = False


DEFAULT_PLAN = Plan(
    name="default",
    requests_per_day=100,
    tokens_per_day=10_000,
    requests_per_minute=60,
    max_priority="high",
)
