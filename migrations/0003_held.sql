-- Operator decisions on held rows (`relay held retry|skip`). A held row is
-- one with `last_error` and no `published_at`.
--   retry_requested_at: when `relay held retry` (or the relay itself, for a
--     row whose blocker is gone) cleared `last_error`; the relay publishes
--     such rows through its catch-up phase, in id order.
--   skipped_at, skip_reason: `relay held skip`: the row is settled without
--     being published. It keeps `last_error` (why it was held), so the
--     poll and catch-up queries never select it, and it no longer holds its
--     entity.
ALTER TABLE "{{schema}}"."{{table}}"
    ADD COLUMN IF NOT EXISTS retry_requested_at timestamptz,
    ADD COLUMN IF NOT EXISTS skipped_at         timestamptz,
    ADD COLUMN IF NOT EXISTS skip_reason        text;

-- Released rows not yet published: the catch-up phase's query, small
-- (only rows an operator released and the relay has not published yet).
CREATE INDEX IF NOT EXISTS "{{table}}_released_idx"
    ON "{{schema}}"."{{table}}" (id)
    WHERE retry_requested_at IS NOT NULL AND published_at IS NULL;
