-- Poll mode wakes up on NOTIFY "{{table}}_relay" instead of waiting for
-- source.poll_interval_ms. Statement-level: one notification per INSERT
-- statement, and Postgres folds identical notifications of one transaction
-- into one, delivered at commit (when the rows become visible).
CREATE OR REPLACE FUNCTION "{{schema}}"."{{table}}_relay_notify"() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('{{table}}_relay', '');
    RETURN NULL;
END
$$;

DROP TRIGGER IF EXISTS "{{table}}_relay_notify" ON "{{schema}}"."{{table}}";
CREATE TRIGGER "{{table}}_relay_notify"
    AFTER INSERT ON "{{schema}}"."{{table}}"
    FOR EACH STATEMENT EXECUTE FUNCTION "{{schema}}"."{{table}}_relay_notify"();
