"""Per-user state: the quota and idempotency tables with their single writers, and the key cache."""
