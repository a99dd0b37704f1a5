//! The class of a representative error of every variant that reaches the
//! pipeline, as a table: what the relay does about each failure.

use pgwire_replication::PgWireError;
use rdkafka::error::KafkaError;
use tokio_postgres::error::SqlState;

use super::*;
use crate::codec::registry::RegistryError;
use crate::delivery::PublishError;
use crate::error_class::text_cause;
use crate::outbox::RowError;
use crate::sink::{ConnectError, Failure};
use crate::source::pgoutput::DecodeError;

/// A Postgres error without a SQLSTATE (as a lost connection has none).
fn pg() -> tokio_postgres::Error {
    match "host=a connect_timeout=never".parse::<tokio_postgres::Config>() {
        Err(err) => err,
        Ok(_) => panic!("the URL must not parse"),
    }
}

fn operator(fix: &str) -> ErrorClass {
    ErrorClass::Operator(fix.to_string().into())
}

const URL_FIX: &str = "correct postgres.url / postgres.tls_ca_file";
const TABLE_FIX: &str = "outbox table \"public\".\"outbox\" does not exist: run `relay migrate`";
const HELD_FIX: &str = "release or skip held rows once the cause is fixed";
const GRANT_FIX: &str = "grant the relay's role what it needs: `relay check` names each missing privilege, `relay migrate --print-grants ROLE` prints the GRANTs (README, Security)";
const PASSWORD_FIX: &str = "check the user and password in postgres.url, and pg_hba.conf";

fn no_table() -> StoreError {
    StoreError::NoTable("\"public\".\"outbox\"".into())
}

fn too_many_held() -> TooManyHeld {
    TooManyHeld { held: 3, max: 2, last_error: "too large".into() }
}

fn tls() -> DatabaseError {
    DatabaseError::Tls { what: "/ca.pem".into(), source: "no certificate".into() }
}

fn server(message: &str) -> PipelineError {
    LogicalError::Replication(PgWireError::Server(message.into())).into()
}

fn registry(err: RegistryError) -> PipelineError {
    SchemaError::Registry(err).into()
}

fn kafka_refused() -> ConnectError {
    ConnectError::Authentication { servers: "b:9092".into(), reason: "SASL".into() }
}

/// A flat table, one row per variant (and per wrapped variant whose class
/// its wrapper decides itself): name, error, expected class.
fn table() -> Vec<(&'static str, PipelineError, ErrorClass)> {
    use ErrorClass::{Retry, StepDown};
    vec![
        ("database url", DatabaseError::Url(pg()).into(), operator(URL_FIX)),
        ("database tls", tls().into(), operator(URL_FIX)),
        ("database connect", DatabaseError::Connect(pg()).into(), Retry),
        ("database query", DatabaseError::Query(pg()).into(), Retry),
        ("postgres", pg().into(), Retry),
        ("store postgres", StoreError::Postgres(pg()).into(), Retry),
        ("store column", StoreError::Column { column: "id".into(), expected: "bigint", source: pg() }.into(), Retry),
        ("store no table", no_table().into(), operator(TABLE_FIX)),
        (
            "store layout",
            StoreError::Layout { configured: "side_table", found: "published_at is set".into() }.into(),
            operator("run `relay migrate` with this config"),
        ),
        ("store row", StoreError::Row(RowError::Null { column: "id".into() }).into(), Retry),
        ("store not found", StoreError::NotFound(7).into(), Retry),
        ("store not held", StoreError::NotHeld { id: 7, state: "published" }.into(), Retry),
        ("store behind", StoreError::Behind { id: 7, blocker: 6 }.into(), Retry),
        ("store fenced", StoreError::Fenced { epoch: 3 }.into(), StepDown),
        ("logical auth", LogicalError::Replication(PgWireError::Auth("refused".into())).into(), operator(PASSWORD_FIX)),
        (
            "logical tls",
            LogicalError::Replication(PgWireError::Tls("bad".into())).into(),
            operator("check postgres.url's sslmode and postgres.tls_ca_file"),
        ),
        ("logical server 42501", server("permission denied for table outbox (SQLSTATE 42501)"), operator(GRANT_FIX)),
        ("logical server 57P01", server("terminating connection (SQLSTATE 57P01)"), Retry),
        ("logical server without code", server("the server went away"), Retry),
        ("logical protocol", LogicalError::Replication(PgWireError::Protocol("odd".into())).into(), Retry),
        ("logical decode", LogicalError::Decode(DecodeError::NotUtf8).into(), Retry),
        ("logical row", LogicalError::Row(RowError::MissingColumn("id".into())).into(), Retry),
        ("logical postgres", LogicalError::Postgres(pg()).into(), Retry),
        ("logical store", LogicalError::Store(no_table()).into(), Retry),
        ("logical url", LogicalError::Url(pg()).into(), Retry),
        ("logical stream ended", LogicalError::StreamEnded.into(), Retry),
        ("sink client", SinkError::Client(KafkaError::ClientCreation("bad".into())).into(), Retry),
        ("sink too many held", SinkError::TooManyHeld(too_many_held()).into(), operator(HELD_FIX)),
        ("sink refused", SinkError::Refused(kafka_refused()).into(), operator(kafka_refused().fix())),
        ("sink fenced", SinkError::Fenced(Failure::new("commit")).into(), StepDown),
        (
            "sink transactional id refused",
            SinkError::TransactionalIdRefused(Failure::new("init")).into(),
            operator("grant WRITE and DESCRIBE on TRANSACTIONAL_ID (kafka.transactional_id, prefixed) to the relay's principal, or use kafka.delivery = \"at_least_once\""),
        ),
        ("sink transaction", SinkError::Transaction(Failure::new("commit")).into(), Retry),
        (
            "schema read",
            SchemaError::Read { path: "a.avsc".into(), reason: "missing".into() }.into(),
            operator("correct the schemas or codec.schemas"),
        ),
        (
            "schema parse",
            SchemaError::Parse { path: "a.avsc".into(), reason: "bad".into() }.into(),
            operator("correct the schemas or codec.schemas"),
        ),
        (
            "schema unnamed",
            SchemaError::Unnamed { path: "a.avsc".into() }.into(),
            operator("correct the schemas or codec.schemas"),
        ),
        ("registry unreachable", registry(RegistryError::Unreachable(text_cause("HTTP 503"))), Retry),
        (
            "registry not registered",
            registry(RegistryError::NotRegistered { subject: "s".into(), file: "a.avsc".into() }),
            Retry,
        ),
        ("registry refused", registry(RegistryError::Refused { what: "w".into(), reason: "r".into() }), Retry),
        (
            "registry ca file",
            registry(RegistryError::CaFile { file: "/ca.pem".into(), source: text_cause("unreadable") }),
            operator("correct registry.tls_ca_file"),
        ),
        (
            "registry certificate",
            registry(RegistryError::Certificate { reason: "UnknownIssuer".into(), fix: "set it" }),
            operator("correct the registry's TLS trust"),
        ),
        ("checkpoint record", CheckpointError::Record(StoreError::Postgres(pg())).into(), Retry),
        ("checkpoint record fenced", CheckpointError::Record(StoreError::Fenced { epoch: 3 }).into(), StepDown),
        ("checkpoint delivery", CheckpointError::Delivery(PublishError::retriable("timed out")).into(), Retry),
        ("checkpoint too many held", CheckpointError::TooManyHeld(too_many_held()).into(), operator(HELD_FIX)),
        ("checkpoint progress", CheckpointError::progress(std::io::Error::other("gone")).into(), Retry),
        ("poll connect", PollError::Database(DatabaseError::Connect(pg())).into(), Retry),
        ("poll listen statement", PollError::Database(DatabaseError::Query(pg())).into(), Retry),
        ("poll url", PollError::Database(DatabaseError::Url(pg())).into(), Retry),
        ("poll tls", PollError::Database(tls()).into(), Retry),
        ("poll postgres", PollError::Postgres(pg()).into(), Retry),
        ("poll no table", PollError::Store(no_table()).into(), operator(TABLE_FIX)),
        ("poll store postgres", PollError::Store(StoreError::Postgres(pg())).into(), Retry),
        ("poll row", PollError::Row(RowError::Null { column: "id".into() }).into(), Retry),
        ("poll listener closed", PollError::ListenerClosed.into(), Retry),
        (
            "slot not allowed",
            SlotError::NotAllowed { slot: "s".into(), state: "missing" }.into(),
            operator("recreate the slot, or set source.create_slot = true"),
        ),
        (
            "slot publication mismatch",
            SlotError::PublicationMismatch { publication: "p".into(), table: "t".into(), tables: "u".into() }.into(),
            operator("correct the publication as said below"),
        ),
        (
            "slot publication not via root",
            SlotError::PublicationNotViaRoot { publication: "p".into(), table: "t".into() }.into(),
            operator("correct the publication as said below"),
        ),
        ("slot postgres", SlotError::Postgres(pg()).into(), Retry),
        ("slot store", SlotError::Store(StoreError::Postgres(pg())).into(), Retry),
        ("too many held", too_many_held().into(), operator(HELD_FIX)),
        ("leader url", LeaderError::Database(DatabaseError::Url(pg())).into(), operator(URL_FIX)),
        ("leader tls", LeaderError::Database(tls()).into(), operator(URL_FIX)),
        ("leader connect", LeaderError::Database(DatabaseError::Connect(pg())).into(), Retry),
        ("leader store", LeaderError::Store(StoreError::Postgres(pg())).into(), Retry),
        ("leader listener closed", LeaderError::ListenerClosed.into(), Retry),
        (
            "needs operator",
            PipelineError::NeedsOperator { fix: "fix it".into(), cause: Box::new(pg().into()) },
            operator("fix it"),
        ),
    ]
}

#[test]
fn every_error_says_what_it_means() {
    let wrong: Vec<String> = table()
        .into_iter()
        .filter(|(_, err, expected)| err.class() != *expected)
        .map(|(name, err, expected)| format!("{name}: {:?}, expected {expected:?}", err.class()))
        .collect();
    assert!(wrong.is_empty(), "misclassified:\n{}", wrong.join("\n"));
}

#[test]
fn a_sql_state_names_its_fix_or_is_retried() {
    let cases: [(Option<SqlState>, ErrorClass); 8] = [
        (Some(SqlState::INVALID_PASSWORD), operator(PASSWORD_FIX)),
        (Some(SqlState::INVALID_AUTHORIZATION_SPECIFICATION), operator(PASSWORD_FIX)),
        (Some(SqlState::INSUFFICIENT_PRIVILEGE), operator(GRANT_FIX)),
        (
            Some(SqlState::UNDEFINED_TABLE),
            operator("a table the relay needs does not exist: run `relay migrate` as the outbox table's owner"),
        ),
        (
            Some(SqlState::UNDEFINED_COLUMN),
            operator("a configured column does not exist: run `relay migrate` or correct outbox.columns"),
        ),
        (Some(SqlState::INVALID_CATALOG_NAME), operator("the database in postgres.url does not exist")),
        (Some(SqlState::T_R_SERIALIZATION_FAILURE), ErrorClass::Retry),
        (None, ErrorClass::Retry),
    ];
    for (code, expected) in cases {
        assert_eq!(database::sql_state_class(code.as_ref()), expected, "{code:?}");
    }
}

#[test]
fn an_operator_stop_wraps_its_cause_once() {
    let stopped = stop_for_operator(no_table().into()).expect_err("a missing table stops the relay");
    assert!(matches!(&stopped, PipelineError::NeedsOperator { fix, .. } if fix == TABLE_FIX), "{stopped:?}");
    let again = stop_for_operator(stopped).expect_err("still a stop");
    assert!(
        matches!(&again, PipelineError::NeedsOperator { cause, .. } if matches!(**cause, PipelineError::Store(_))),
        "not wrapped twice: {again:?}"
    );
    assert!(stop_for_operator(pg().into()).is_ok(), "a lost connection is retried");
    assert!(stop_for_operator(StoreError::Fenced { epoch: 1 }.into()).is_ok(), "stepping down is the caller's");
}
