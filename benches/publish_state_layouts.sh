#!/usr/bin/env bash
# What recording publish state costs Postgres under different table layouts:
# the relay's own batch UPDATE (the statement in src/store/publish.rs) on
# the outbox table as the migrations make it, against layouts that would
# change the table's contract. Run by `scripts/bench publish-state`.
#
# Each layout: a fresh table of 300,000 published and 100,000 pending rows
# (payload about 300 B, 1,000 entities), then the 100,000 pending rows are
# recorded as published in 100 transactions of 1,000 rows, one session, as
# the relay's checkpoint stage does. Reported per 100k rows: the seconds
# that session took (Postgres is the only thing working, so this is its
# CPU within a few percent) and the WAL written, with the ratio to the
# current layout measured in the same run. Layouts:
#   current          the migrations' table: PK, UNIQUE event_id, and three
#                    partial indexes whose predicates name published_at
#   no_published_idx without the (published_at) index (retention, status)
#   pk_unpublished   only the PK and the unpublished-rows index: the floor
#                    of any layout whose UPDATE cannot be HOT
#   hot_ff70/ff50    no index names published_at, fillfactor 70 / 50: the
#                    UPDATE can be HOT when the page has room
#   side_table       checkpoint.publish_state = "side_table": the relay's
#                    INSERT into outbox_relay_published (migration 0008)
#                    instead of an UPDATE of the outbox row
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
port="${RELAY_PG_PORT:-55432}"
bindir="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1)"
admin="postgres://relay:relay@127.0.0.1:$port/outbox"
db="bench_layouts_$$"
url="postgres://relay:relay@127.0.0.1:$port/$db"
export PGOPTIONS="-c client_min_messages=warning"
psql() { "$bindir/psql" -X -v ON_ERROR_STOP=1 -qAt "$@"; }
work="$(mktemp -d)"
trap 'psql "$admin" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT

psql "$admin" -c "CREATE DATABASE $db"
# The table exactly as `relay migrate` makes it.
for f in "$repo"/migrations/*.sql; do
  sed -e 's/{{schema}}/public/g' -e 's/{{table}}/outbox/g' "$f"
done > "$work/migrations.sql"

# 100 transactions of `statement`, its @ROWS@ replaced by 1,000 ids with
# their topic, partition and offset, as the relay binds them.
batches() {
  local statement="$1" b lo hi rows
  for b in $(seq 0 99); do
    lo=$((300001 + b * 1000)); hi=$((lo + 999))
    rows="unnest(ARRAY(SELECT generate_series($lo, $hi))::bigint[], array_fill('bench.entity'::text, ARRAY[1000]), array_fill(3, ARRAY[1000]), ARRAY(SELECT generate_series($lo, $hi))::bigint[]) AS u(id, topic, part, off)"
    echo "BEGIN;"
    echo "${statement//@ROWS@/$rows} \\g /dev/null"
    echo "COMMIT;"
  done
}
# The relay's statements (src/store/publish.rs): the outbox-row layout's
# UPDATE and the side-table layout's INSERT.
batches "UPDATE outbox AS o SET published_at = now(), kafka_topic = u.topic, kafka_partition = u.part, kafka_offset = u.off, attempts = o.attempts + 1, last_error = NULL, waiting_for = NULL FROM @ROWS@ WHERE o.id = u.id RETURNING o.id" > "$work/update.sql"
batches "WITH u AS (SELECT * FROM @ROWS@), cleared AS (UPDATE outbox AS o SET last_error = NULL, waiting_for = NULL WHERE o.id = ANY(ARRAY(SELECT id FROM u)) AND o.last_error IS NOT NULL) INSERT INTO outbox_relay_published (id, published_at, kafka_topic, kafka_partition, kafka_offset) SELECT DISTINCT ON (u.id) u.id, now(), u.topic, u.part, u.off FROM u WHERE NOT EXISTS (SELECT 1 FROM outbox_relay_published AS p WHERE p.id = u.id) ORDER BY u.id" > "$work/insert.sql"

# layout NAME FILLFACTOR SETUP_SQL WRITES_FILE
layout() {
  local name="$1" fillfactor="$2" setup="$3" writes="$4"
  psql "$url" -c "DROP TABLE IF EXISTS outbox, outbox_relay_published CASCADE" 2>/dev/null
  psql "$url" -f "$work/migrations.sql" >/dev/null
  psql "$url" -c "ALTER TABLE outbox SET (fillfactor = $fillfactor)"
  psql "$url" -c "
    INSERT INTO outbox (aggregate_type, aggregate_id, event_type, kind, payload, published_at, kafka_topic, kafka_partition, kafka_offset, attempts)
    SELECT 'entity', 'e' || (g % 1000), 'Changed', 'event', jsonb_build_object('seq', g, 'pad', repeat('x', 250)), now(), 'bench.entity', g % 6, g, 1
    FROM generate_series(1, 300000) g;
    INSERT INTO outbox (aggregate_type, aggregate_id, event_type, kind, payload)
    SELECT 'entity', 'e' || (g % 1000), 'Changed', 'event', jsonb_build_object('seq', g, 'pad', repeat('x', 250))
    FROM generate_series(1, 100000) g;"
  [ -n "$setup" ] && psql "$url" -c "$setup"
  psql "$url" -c "VACUUM ANALYZE outbox"
  local wal0 start end wal1
  wal0="$(psql "$url" -c "SELECT pg_current_wal_lsn()")"
  start="$(date +%s.%N)"
  psql "$url" -f "$writes"
  end="$(date +%s.%N)"
  wal1="$(psql "$url" -c "SELECT pg_current_wal_lsn()")"
  local seconds wal hot
  seconds="$(echo "$end - $start" | bc -l)"
  wal="$(psql "$url" -c "SELECT round(pg_wal_lsn_diff('$wal1', '$wal0') / 1048576.0, 1)")"
  hot="$(psql "$url" -c "SELECT CASE WHEN n_tup_upd = 0 THEN '-' ELSE round(100.0 * n_tup_hot_upd / n_tup_upd)::text || ' %' END FROM pg_stat_user_tables WHERE relname = 'outbox'")"
  echo "$name $seconds $wal $hot"
}

drop_published_indexes="DROP INDEX outbox_unpublished_idx, outbox_published_at_idx, outbox_released_idx"
{
  layout current 100 "" "$work/update.sql"
  layout no_published_idx 100 "DROP INDEX outbox_published_at_idx" "$work/update.sql"
  layout pk_unpublished 100 "DROP INDEX outbox_published_at_idx, outbox_released_idx; ALTER TABLE outbox DROP CONSTRAINT outbox_event_id_key" "$work/update.sql"
  layout hot_ff70 70 "$drop_published_indexes" "$work/update.sql"
  layout hot_ff50 50 "$drop_published_indexes" "$work/update.sql"
  layout side_table 100 "INSERT INTO outbox_relay_published SELECT id, published_at, kafka_topic, kafka_partition, kafka_offset FROM outbox WHERE published_at IS NOT NULL; ANALYZE outbox_relay_published" "$work/insert.sql"
} > "$work/results"

echo "| layout | seconds per 100k rows | x current | WAL per 100k | HOT updates |"
echo "|---|---|---|---|---|"
base="$(awk '$1 == "current" {print $2}' "$work/results")"
while read -r name seconds wal hot; do
  printf '| %s | %.2f s | %.2f | %s MiB | %s |\n' "$name" "$seconds" "$(echo "$seconds / $base" | bc -l)" "$wal" "$hot"
done < "$work/results"
