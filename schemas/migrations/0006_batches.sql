-- OpenAI-style Batch API (issue 14): uploaded files stored in parts, batches' last-written objects,
-- and each batch line's request row tagged with its batch and 0-based line.
CREATE TABLE files (
    file_id    text PRIMARY KEY,
    user_id    text NOT NULL,
    purpose    text NOT NULL CHECK (purpose IN ('batch', 'batch_output')),
    filename   text NOT NULL,
    bytes      bigint NOT NULL,
    lines      integer NOT NULL DEFAULT 0,
    created_at timestamptz NOT NULL DEFAULT now(),
    deleted_at timestamptz,          -- deleted by its owner while a batch still reads it
    -- false while an upload streams in: such a file is no one's to read or list yet; one left
    -- behind by a crashed worker is purged by a later upload (bridges/clients/store/files.py).
    complete   boolean NOT NULL DEFAULT false
);
CREATE INDEX files_user_idx ON files (user_id, file_id DESC);
CREATE INDEX files_incomplete_idx ON files (created_at) WHERE NOT complete;
CREATE TABLE file_parts (
    file_id text NOT NULL REFERENCES files (file_id) ON DELETE CASCADE,
    part    integer NOT NULL,
    data    bytea NOT NULL,
    PRIMARY KEY (file_id, part)
);
CREATE TABLE batches (
    batch_id      text PRIMARY KEY,
    user_id       text NOT NULL,
    input_file_id text NOT NULL,
    status        text NOT NULL,
    doc           jsonb NOT NULL,       -- the batch object as last written
    created_at    timestamptz NOT NULL,
    updated_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX batches_user_idx ON batches (user_id, batch_id DESC);
ALTER TABLE requests ADD COLUMN batch_id text, ADD COLUMN batch_line integer;
CREATE INDEX requests_batch_idx ON requests (batch_id, batch_line) WHERE batch_id IS NOT NULL;
ALTER TABLE plans ADD COLUMN batch_priority text NOT NULL DEFAULT 'low'
    CHECK (batch_priority IN ('high', 'normal', 'low'));
