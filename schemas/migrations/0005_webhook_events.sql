-- Which statuses (and `output`) a request's callback_url is told of: NULL means the terminal
-- statuses only, as before. Each delivery attempt of each event is kept for
-- GET /v1/requests/{id}/webhooks; the columns on requests still track the terminal event's delivery.
ALTER TABLE requests ADD COLUMN webhook_events jsonb;

CREATE TABLE webhook_attempts (
    request_id  text        NOT NULL,
    at          timestamptz NOT NULL DEFAULT clock_timestamp(),
    event       text        NOT NULL,
    webhook_id  text        NOT NULL,
    attempt     integer     NOT NULL,
    state       text        NOT NULL CHECK (state IN ('pending', 'delivered', 'failed')),
    http_status integer,
    error       text
);
CREATE INDEX webhook_attempts_request_idx ON webhook_attempts (request_id, at);
