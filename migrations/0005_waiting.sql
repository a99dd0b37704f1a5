-- Waiting rows as a typed fact: `waiting_for` names the held row of the
-- same entity a row waits behind (NULL for held rows and everything else).
-- Earlier versions wrote it only into last_error as text; this backfills it.
ALTER TABLE "{{schema}}"."{{table}}" ADD COLUMN IF NOT EXISTS waiting_for bigint;

UPDATE "{{schema}}"."{{table}}"
   SET waiting_for = substring(last_error FROM '^waiting behind held row ([0-9]+)')::bigint
 WHERE published_at IS NULL AND waiting_for IS NULL
   AND last_error LIKE 'waiting behind held row %';
