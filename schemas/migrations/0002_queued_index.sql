-- The watchdog's query (streams/agents/watchdog.py): requests still `queued` long after
-- admission. A partial index keeps it cheap however many finished rows the table holds.
CREATE INDEX requests_queued_idx ON requests (updated_at) WHERE status = 'queued';
