-- The outbox table in its default layout. `{{schema}}` and `{{table}}` are
-- replaced with outbox.schema and outbox.table from the config.
CREATE TABLE IF NOT EXISTS "{{schema}}"."{{table}}" (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id        uuid        NOT NULL UNIQUE DEFAULT gen_random_uuid(),
    aggregate_type  text        NOT NULL,
    aggregate_id    text        NOT NULL,
    event_type      text        NOT NULL,
    kind            text        NOT NULL CHECK (kind IN ('event', 'state', 'command')),
    entity_version  bigint,
    payload         jsonb       NOT NULL,
    headers         jsonb,
    occurred_at     timestamptz NOT NULL DEFAULT now(),
    -- Publish state, written by the relay only.
    published_at    timestamptz,
    kafka_topic     text,
    kafka_partition int,
    kafka_offset    bigint,
    attempts        int         NOT NULL DEFAULT 0,
    last_error      text
);

-- Unpublished rows: small however long the history, used by status,
-- held-row lookups and ordered polling.
CREATE INDEX IF NOT EXISTS "{{table}}_unpublished_idx"
    ON "{{schema}}"."{{table}}" (id) WHERE published_at IS NULL;

-- Published rows by age: last publish time and retention.
CREATE INDEX IF NOT EXISTS "{{table}}_published_at_idx"
    ON "{{schema}}"."{{table}}" (published_at) WHERE published_at IS NOT NULL;
