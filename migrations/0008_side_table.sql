-- Publish state beside the outbox row (`checkpoint.publish_state =
-- "side_table"`, logical mode): one narrow row per published outbox row,
-- inserted by the relay in the same fenced transaction in which the default
-- layout updates the outbox row. A row published twice (a catch-up and the
-- stream) keeps its first record. The outbox row itself is then written only
-- for held and waiting rows. Empty with the default layout; `relay migrate`
-- moves the publish state of published rows into the layout the config
-- names.
CREATE TABLE IF NOT EXISTS "{{schema}}"."{{table}}_relay_published" (
    id              bigint      PRIMARY KEY,
    published_at    timestamptz NOT NULL DEFAULT now(),
    kafka_topic     text,
    kafka_partition int,
    kafka_offset    bigint
);

-- Last publish time and retention, in this layout.
CREATE INDEX IF NOT EXISTS "{{table}}_relay_published_at_idx"
    ON "{{schema}}"."{{table}}_relay_published" (published_at);

-- Held, waiting and skipped rows (all have `last_error`; publishing a row
-- clears it in both layouts). In the side-table layout `published_at` stays
-- NULL, so the unpublished-rows index no longer narrows anything: this one
-- finds the held rows instead. No row the relay publishes without an error
-- ever enters it.
CREATE INDEX IF NOT EXISTS "{{table}}_held_idx"
    ON "{{schema}}"."{{table}}" (id) WHERE last_error IS NOT NULL;

-- One view of the publish state for both layouts: what users query instead
-- of the outbox's own columns.
CREATE OR REPLACE VIEW "{{schema}}"."{{table}}_publish_state" AS
SELECT o.id,
       coalesce(p.published_at, o.published_at)       AS published_at,
       coalesce(p.kafka_topic, o.kafka_topic)         AS kafka_topic,
       coalesce(p.kafka_partition, o.kafka_partition) AS kafka_partition,
       coalesce(p.kafka_offset, o.kafka_offset)       AS kafka_offset,
       -- Publishing counts one attempt; a row published before the move to
       -- this layout has it counted in the outbox row already.
       CASE WHEN p.id IS NOT NULL AND o.published_at IS NULL
            THEN o.attempts + 1 ELSE o.attempts END    AS attempts,
       o.last_error,
       o.waiting_for,
       o.retry_requested_at,
       o.skipped_at,
       o.skip_reason
  FROM "{{schema}}"."{{table}}" AS o
  LEFT JOIN "{{schema}}"."{{table}}_relay_published" AS p ON p.id = o.id;
