-- Pending catch-up phases, one row per replication slot. A logical slot
-- streams only what commits after it was created, so whenever the relay (or
-- `relay migrate`) creates a slot, this row is written first and deleted
-- only after every row committed before the slot existed was published
-- through the poll path. A crash in between leaves the row, and the next
-- start catches up again: the slot alone cannot tell that it is new.
--   reason: created | missing | invalidated | wal_budget (why the slot was made)
--   max_id: the highest outbox id visible right after the slot was created;
--     rows above it committed after the slot existed and are streamed.
--     NULL while the slot is being created: catch up without a bound.
CREATE TABLE IF NOT EXISTS "{{schema}}"."{{table}}_relay_catchup" (
    slot_name    text        PRIMARY KEY,
    reason       text        NOT NULL,
    max_id       bigint,
    requested_at timestamptz NOT NULL DEFAULT now()
);
