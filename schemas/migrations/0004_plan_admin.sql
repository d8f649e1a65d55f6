-- Admins see every user's quota use (on the worker that owns the user) and every dead letter in
-- /dashboard; ordinary keys see their own quota only. A plan flag, so granting or taking it away
-- is `plans set NAME --admin/--no-admin`, pushed to every worker by the plans' NOTIFY.
ALTER TABLE plans ADD COLUMN admin boolean NOT NULL DEFAULT false;
