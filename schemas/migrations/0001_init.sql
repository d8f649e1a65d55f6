-- Initial schema: plans, API keys, the requests system of record, dead letters.
-- Written schema-unqualified: schemas/migrate.py runs it with search_path set
-- to the namespace's schema.

CREATE TABLE plans (
    name                text PRIMARY KEY,
    requests_per_day    integer NOT NULL CHECK (requests_per_day >= 0),
    tokens_per_day      bigint  NOT NULL CHECK (tokens_per_day >= 0),
    requests_per_minute integer NOT NULL CHECK (requests_per_minute >= 0),
    max_priority        text    NOT NULL CHECK (max_priority IN ('high', 'normal', 'low')),
    updated_at          timestamptz NOT NULL DEFAULT now()
);

INSERT INTO plans (name, requests_per_day, tokens_per_day, requests_per_minute, max_priority)
VALUES ('default', 100, 10000, 60, 'high');

CREATE TABLE api_keys (
    key_hash   text PRIMARY KEY,          -- hex HMAC-SHA256 of the key; the key itself is never stored
    key_prefix text NOT NULL,             -- first characters, so an operator can tell keys apart
    user_id    text NOT NULL,
    plan       text NOT NULL REFERENCES plans (name),
    created_at timestamptz NOT NULL DEFAULT now(),
    revoked_at timestamptz
);

CREATE INDEX api_keys_user_idx ON api_keys (user_id, created_at DESC);

CREATE TABLE requests (
    request_id       text PRIMARY KEY,
    user_id          text NOT NULL,
    task             text,
    model            text,
    priority         text,
    status           text NOT NULL,
    status_rank      smallint NOT NULL,
    input            jsonb,
    params           jsonb,
    metadata         jsonb,
    estimated_tokens integer,
    attempts         integer NOT NULL DEFAULT 0,
    result           jsonb,
    error            jsonb,
    usage            jsonb,
    created_at       timestamptz,
    updated_at       timestamptz NOT NULL,
    dispatched_at    timestamptz,
    started_at       timestamptz,
    completed_at     timestamptz,
    deadline_at      timestamptz,
    callback_url     text,
    quota_day        text,
    history          jsonb NOT NULL DEFAULT '[]'::jsonb,
    webhook_state        text CHECK (webhook_state IN ('pending', 'delivered', 'failed')),
    webhook_attempts     integer NOT NULL DEFAULT 0,
    webhook_last_error   text,
    webhook_delivered_at timestamptz
);

-- The caller's list: request ids sort by creation time, so newest first is id descending.
CREATE INDEX requests_user_idx ON requests (user_id, request_id DESC);
CREATE INDEX requests_user_status_idx ON requests (user_id, status, request_id DESC);
-- Small by construction: only rows whose webhook still has to be delivered.
CREATE INDEX requests_webhook_pending_idx ON requests (updated_at) WHERE webhook_state = 'pending';

CREATE TABLE dead_letters (
    request_id    text PRIMARY KEY,
    user_id       text NOT NULL,
    payload       jsonb NOT NULL,         -- the InferenceRequest, as it would be re-submitted
    error         jsonb,
    history       jsonb NOT NULL DEFAULT '[]'::jsonb,
    created_at    timestamptz NOT NULL DEFAULT now(),
    redriven_at   timestamptz,
    redrive_count integer NOT NULL DEFAULT 0
);

CREATE INDEX dead_letters_created_idx ON dead_letters (created_at DESC);
