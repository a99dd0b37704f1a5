-- Poll mode wakes up on NOTIFY "{{table}}_relay" instead of waiting for
-- source.poll_interval_ms. This migration only creates the trigger function;
-- the statement-level trigger that calls it exists only while the relay runs
-- in poll mode (`relay migrate` and the poll source create it, logical mode
-- drops it): NOTIFY serializes the commits of notifying transactions on a
-- global lock, a cost logical-mode writers must not pay. Identical
-- notifications of one transaction fold into one, delivered at commit.
CREATE OR REPLACE FUNCTION "{{schema}}"."{{table}}_relay_notify"() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('{{table}}_relay', '');
    RETURN NULL;
END
$$;
