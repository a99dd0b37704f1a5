//! The Postgres privileges the running relay needs, from one list: what
//! `relay migrate --print-grants ROLE` prints and what `relay check` checks.
//!
//! What an administrator runs once as the table's owner (`relay migrate`:
//! the tables, triggers, publication) is apart from what the running relay
//! needs, which is only:
//! - `REPLICATION` (logical mode: the slot and its stream);
//! - `USAGE` on the outbox's schema, `SELECT` on the outbox (catch-up,
//!   poll, replay), `UPDATE` on the publish-state columns only, `DELETE`
//!   when retention is enabled;
//! - its own tables: the lease (`_relay_leader`), in logical mode the
//!   catch-up marker (`_relay_catchup`), and with `checkpoint.publish_state
//!   = "side_table"` the publish-state table (`_relay_published`).
//!
//! Everything else it calls needs no grant: LISTEN, `pg_notify`, the
//! catalogs, and ending its own stale walsender (same role).

use tokio_postgres::Client;

use super::{ident, StoreError};
use crate::config::{Config, PublishStateLayout, SourceMode};

/// The publish-state columns the relay (and `relay held`) writes.
pub const PUBLISH_STATE_COLUMNS: &[&str] = &[
    "published_at",
    "kafka_topic",
    "kafka_partition",
    "kafka_offset",
    "attempts",
    "last_error",
    "waiting_for",
    "retry_requested_at",
    "skipped_at",
    "skip_reason",
];

/// A table by schema and name (shown quoted: `"public"."outbox"`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    pub schema: String,
    pub name: String,
}

impl std::fmt::Display for Table {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", ident(&self.schema), ident(&self.name))
    }
}

/// One privilege the running relay needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Privilege {
    /// The `REPLICATION` attribute (or membership of a managed database's
    /// replication role, e.g. RDS's `rds_replication`).
    Replication,
    /// `USAGE` on a schema.
    SchemaUsage { schema: String },
    /// A table privilege (`SELECT`, `INSERT`, `UPDATE`, `DELETE`).
    Table { privilege: &'static str, table: Table },
    /// `UPDATE` on some columns of a table.
    UpdateColumns { table: Table, columns: Vec<String> },
}

impl Privilege {
    /// How the grant reads: `SELECT ON "public"."outbox"`.
    pub fn describe(&self) -> String {
        match self {
            Self::Replication => "REPLICATION (role attribute)".to_string(),
            Self::SchemaUsage { schema } => format!("USAGE ON SCHEMA {}", ident(schema)),
            Self::Table { privilege, table } => format!("{privilege} ON {table}"),
            Self::UpdateColumns { table, columns } => format!("UPDATE ({}) ON {table}", columns.join(", ")),
        }
    }

    /// The statement that grants it to `role`.
    pub fn grant(&self, role: &str) -> String {
        let role = ident(role);
        match self {
            Self::Replication => format!("ALTER ROLE {role} WITH REPLICATION;"),
            Self::SchemaUsage { schema } => format!("GRANT USAGE ON SCHEMA {} TO {role};", ident(schema)),
            Self::Table { privilege, table } => format!("GRANT {privilege} ON {table} TO {role};"),
            Self::UpdateColumns { table, columns } => {
                format!("GRANT UPDATE ({}) ON {table} TO {role};", columns.join(", "))
            }
        }
    }

    /// The statement that takes it back from `role`.
    pub fn revoke(&self, role: &str) -> String {
        let role = ident(role);
        match self {
            Self::Replication => format!("ALTER ROLE {role} WITH NOREPLICATION;"),
            Self::SchemaUsage { schema } => format!("REVOKE USAGE ON SCHEMA {} FROM {role};", ident(schema)),
            Self::Table { privilege, table } => format!("REVOKE {privilege} ON {table} FROM {role};"),
            Self::UpdateColumns { table, columns } => {
                format!("REVOKE UPDATE ({}) ON {table} FROM {role};", columns.join(", "))
            }
        }
    }

    /// Why the relay needs it (a comment in the printed SQL).
    fn why(&self) -> &'static str {
        let own = |table: &Table| {
            if table.name.ends_with("_relay_leader") {
                Some("the leader lease (one active relay among the sidecars)")
            } else if table.name.ends_with("_relay_catchup") {
                Some("logical mode: the catch-up marker of slot recovery")
            } else if table.name.ends_with("_relay_published") {
                Some("checkpoint.publish_state = \"side_table\": record publish state (DELETE: retention)")
            } else {
                None
            }
        };
        match self {
            Self::Replication => "logical mode: create, stream from and advance the replication slot",
            Self::SchemaUsage { .. } => "reach the outbox and the relay's tables",
            Self::Table { table, .. } | Self::UpdateColumns { table, .. } if own(table).is_some() => {
                own(table).unwrap_or_default()
            }
            Self::Table { privilege: "DELETE", .. } => "retention (retention.enabled, on by default)",
            Self::Table { .. } => "read rows (catch-up, poll, replay, status)",
            Self::UpdateColumns { .. } => "record publish state (only these columns)",
        }
    }
}

/// The privileges the running relay needs with this config, in the order
/// they are granted.
pub fn required(config: &Config) -> Vec<Privilege> {
    let (schema, table) = (&config.outbox.schema, &config.outbox.table);
    let quoted = |name: &str| Table { schema: schema.clone(), name: name.to_string() };
    let outbox = quoted(table);
    let logical = config.source.mode == SourceMode::Logical;
    let mut required = Vec::new();
    if logical {
        required.push(Privilege::Replication);
    }
    required.push(Privilege::SchemaUsage { schema: schema.clone() });
    required.push(Privilege::Table { privilege: "SELECT", table: outbox.clone() });
    required.push(Privilege::UpdateColumns {
        table: outbox.clone(),
        columns: PUBLISH_STATE_COLUMNS.iter().map(|c| c.to_string()).collect(),
    });
    if config.retention.enabled {
        required.push(Privilege::Table { privilege: "DELETE", table: outbox });
    }
    let leader = quoted(&format!("{table}_relay_leader"));
    for privilege in ["SELECT", "INSERT", "UPDATE"] {
        required.push(Privilege::Table { privilege, table: leader.clone() });
    }
    if config.checkpoint.publish_state == PublishStateLayout::SideTable {
        let published = quoted(&format!("{table}_relay_published"));
        let mut privileges = vec!["SELECT", "INSERT", "UPDATE"];
        if config.retention.enabled {
            privileges.push("DELETE");
        }
        for privilege in privileges {
            required.push(Privilege::Table { privilege, table: published.clone() });
        }
    }
    if logical {
        let catchup = quoted(&format!("{table}_relay_catchup"));
        for privilege in ["SELECT", "INSERT", "UPDATE", "DELETE"] {
            required.push(Privilege::Table { privilege, table: catchup.clone() });
        }
    }
    required
}

/// The SQL an administrator runs (as the outbox's owner, after `relay
/// migrate`) so that `role` can run the relay with this config.
pub fn grants_sql(config: &Config, role: &str) -> String {
    let mode = match config.source.mode {
        SourceMode::Logical => "logical",
        SourceMode::Poll => "poll",
    };
    let mut sql = format!(
        "-- Runtime grants for the relay's role {} (source.mode = \"{mode}\"{}), to run\n\
         -- as the outbox's owner after `relay migrate`. The role needs LOGIN and\n\
         -- nothing else: no ownership, no CREATE, no superuser.\n",
        ident(role),
        if config.retention.enabled { ", retention enabled" } else { "" },
    );
    let mut last_why = "";
    for privilege in required(config) {
        if privilege.why() != last_why {
            last_why = privilege.why();
            sql.push_str(&format!("-- {last_why}\n"));
        }
        if privilege == Privilege::Replication {
            sql.push_str(
                "-- (Amazon RDS / Aurora: GRANT rds_replication TO the role instead. Cloud SQL\n\
                 --  with cloudsql.logical_decoding=on, Azure flexible server: run this as the\n\
                 --  admin user.)\n",
            );
        }
        sql.push_str(&privilege.grant(role));
        sql.push('\n');
    }
    sql
}

/// What `relay check` finds about the current role's privileges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PrivilegeReport {
    /// Every privilege is there.
    Complete,
    /// These tables do not exist: `relay migrate` has not run.
    MissingTables(Vec<String>),
    /// The current role (named) lacks these privileges.
    Missing { role: String, missing: Vec<Privilege> },
}

/// Checks, as the connected role, every privilege in [`required`]. Tables
/// that do not exist are told apart from privileges that are missing.
pub async fn check(client: &Client, config: &Config) -> Result<PrivilegeReport, StoreError> {
    let required = required(config);
    let mut absent = Vec::new();
    for privilege in &required {
        if let Privilege::Table { table, .. } | Privilege::UpdateColumns { table, .. } = privilege {
            if table_oid(client, table).await?.is_none() && !absent.contains(&table.to_string()) {
                absent.push(table.to_string());
            }
        }
    }
    if !absent.is_empty() {
        return Ok(PrivilegeReport::MissingTables(absent));
    }
    let mut missing = Vec::new();
    for privilege in required {
        if let Some(lacking) = lacking(client, privilege).await? {
            missing.push(lacking);
        }
    }
    let role: String = client.query_one("SELECT current_user::text", &[]).await?.try_get(0)?;
    Ok(if missing.is_empty() { PrivilegeReport::Complete } else { PrivilegeReport::Missing { role, missing } })
}

/// The table's OID, from the catalogs: a name lookup (`to_regclass`,
/// `has_table_privilege(text)`) would fail without `USAGE` on its schema
/// instead of telling what is missing.
async fn table_oid(client: &Client, table: &Table) -> Result<Option<u32>, StoreError> {
    let row = client
        .query_opt(
            "SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relname = $2",
            &[&table.schema, &table.name],
        )
        .await?;
    Ok(row.map(|r| r.try_get(0)).transpose()?)
}

/// The part of `privilege` the current role lacks, if any.
async fn lacking(client: &Client, privilege: Privilege) -> Result<Option<Privilege>, StoreError> {
    let has: bool = match &privilege {
        Privilege::Replication => client
            .query_one(
                "SELECT r.rolsuper OR r.rolreplication OR EXISTS (SELECT 1 FROM pg_roles m \
                 WHERE m.rolname = 'rds_replication' AND pg_has_role(m.oid, 'MEMBER')) \
                 FROM pg_roles r WHERE r.rolname = current_user",
                &[],
            )
            .await?
            .try_get(0)?,
        Privilege::SchemaUsage { schema } => client
            .query_one(
                "SELECT coalesce((SELECT has_schema_privilege(oid, 'USAGE') FROM pg_namespace WHERE nspname = $1), false)",
                &[schema],
            )
            .await?
            .try_get(0)?,
        Privilege::Table { privilege: name, table } => {
            let oid = table_oid(client, table).await?;
            client.query_one("SELECT coalesce(has_table_privilege($1::oid, $2), false)", &[&oid, name]).await?.try_get(0)?
        }
        Privilege::UpdateColumns { table, columns } => {
            let oid = table_oid(client, table).await?;
            let lacking: Vec<String> = client
                .query_one(
                    "SELECT coalesce(array_agg(c ORDER BY n), '{}') FROM unnest($2::text[]) WITH ORDINALITY AS u(c, n) \
                     WHERE NOT coalesce(has_column_privilege($1::oid, c, 'UPDATE'), false)",
                    &[&oid, columns],
                )
                .await?
                .try_get(0)?;
            if lacking.is_empty() {
                return Ok(None);
            }
            return Ok(Some(Privilege::UpdateColumns { table: table.clone(), columns: lacking }));
        }
    };
    Ok((!has).then_some(privilege))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> Config {
        Config::from_toml_str(&format!(
            "[postgres]\nurl = \"postgres://u@h/db\"\n[kafka]\nbootstrap_servers = \"k:9092\"\n{extra}"
        ))
        .expect("config")
    }

    #[test]
    fn logical_mode_needs_replication_and_the_catch_up_marker() {
        let sql = grants_sql(&config("[retention]\nenabled = false"), "relay_rt");
        assert!(sql.contains("ALTER ROLE \"relay_rt\" WITH REPLICATION;"), "{sql}");
        assert!(sql.contains("GRANT SELECT ON \"public\".\"outbox\" TO \"relay_rt\";"), "{sql}");
        assert!(sql.contains("GRANT UPDATE (published_at, kafka_topic,"), "{sql}");
        assert!(sql.contains("\"outbox_relay_catchup\" TO"), "{sql}");
        assert!(!sql.contains("GRANT DELETE ON \"public\".\"outbox\""), "no retention, no DELETE: {sql}");
    }

    #[test]
    fn poll_mode_needs_no_replication_and_retention_needs_delete() {
        let sql = grants_sql(&config("[source]\nmode = \"poll\"\n[retention]\nenabled = true"), "r");
        assert!(!sql.contains("REPLICATION;"), "{sql}");
        assert!(!sql.contains("_relay_catchup"), "{sql}");
        assert!(sql.contains("GRANT DELETE ON \"public\".\"outbox\" TO \"r\";"), "{sql}");
    }

    #[test]
    fn the_side_table_layout_needs_its_table_and_retention_delete_on_it() {
        let sql = grants_sql(&config("[checkpoint]\npublish_state = \"side_table\"\n[retention]\nenabled = true"), "r");
        for privilege in ["SELECT", "INSERT", "UPDATE", "DELETE"] {
            assert!(
                sql.contains(&format!("GRANT {privilege} ON \"public\".\"outbox_relay_published\" TO \"r\";")),
                "{sql}"
            );
        }
        let default = grants_sql(&config("[retention]\nenabled = true"), "r");
        assert!(!default.contains("_relay_published"), "{default}");
    }

    #[test]
    fn every_grant_has_its_revoke() {
        for privilege in required(&config("[retention]\nenabled = true")) {
            let revoke = privilege.revoke("r");
            assert!(revoke.starts_with("REVOKE ") || revoke.ends_with("WITH NOREPLICATION;"), "{revoke}");
            assert!(revoke.contains("\"r\""), "{revoke}");
        }
    }
}
