-- The lease that makes one relay of a group active: one row per group (the
-- sidecars that share this outbox and source.slot_name, in poll mode too).
-- The active relay renews `lease_until` from the server's clock every
-- leader.renew_interval_ms; a standby takes the row over only once
-- `lease_until` has passed (or the holder released it on SIGTERM), and each
-- takeover increments `epoch`. Every publish-state write of the relay runs in
-- a transaction that first locks this row FOR SHARE with its own holder and
-- epoch, and writes nothing when they no longer match: a takeover's UPDATE of
-- the row waits for those transactions, and they find nothing after it.
--   holder:      the instance id of the relay (host:pid:random)
--   holder_pid:  the backend pid of the holder's lease session at its last renewal
--   acquired_at: when this epoch began; renewed_at: its last renewal
--   released_at: set when the holder released the lease (graceful stop)
CREATE TABLE IF NOT EXISTS "{{schema}}"."{{table}}_relay_leader" (
    slot_name   text        PRIMARY KEY,
    holder      text        NOT NULL,
    holder_pid  integer,
    epoch       bigint      NOT NULL,
    acquired_at timestamptz NOT NULL,
    renewed_at  timestamptz NOT NULL,
    lease_until timestamptz NOT NULL,
    released_at timestamptz
);
