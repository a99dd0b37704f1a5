-- Tombstones: a state row with a NULL payload says "this entity is gone";
-- the relay publishes it as a record with the entity's key and a null value
-- (a Kafka tombstone), which compaction keeps until it removes the key.
-- Only state rows may lack a payload: an event without one is a bug.
ALTER TABLE "{{schema}}"."{{table}}" ALTER COLUMN payload DROP NOT NULL;
ALTER TABLE "{{schema}}"."{{table}}" DROP CONSTRAINT IF EXISTS "{{table}}_payload_or_tombstone";
ALTER TABLE "{{schema}}"."{{table}}" ADD CONSTRAINT "{{table}}_payload_or_tombstone"
    CHECK (payload IS NOT NULL OR kind = 'state');
