//! `relay replay`: re-publishes rows that were already published, for a
//! consumer that lost data.
//!
//! Rows are selected by `published_at IS NOT NULL` plus a filter (`--since`
//! on `occurred_at`, or `--from-id`; optionally `--aggregate-type` and
//! `--to-id`), in id order, in batches of `source.batch_rows` by keyset
//! pagination on id, so memory stays bounded whatever the table's size.
//! Without `--to-id`, the range ends at the highest published id when the
//! replay starts, so rows published meanwhile by a running relay are not
//! chased.
//!
//! Each row is built and published exactly as the relay does it, by the
//! sink's [`RecordBuilder`] and produce loop (same columns read as text into
//! [`OutboxRow`], same producer settings, topic routing, key bytes, payload
//! encoding and headers), plus two headers:
//! `replayed` = `true` and `replayed_at` (RFC 3339, the start of this
//! replay, the same for every record of one run). Rows are sent in id order
//! by the idempotent producer, so per key they arrive in id order.
//!
//! **Replays are not publications.** The rows' publish state
//! (`published_at`, `kafka_topic`, `kafka_partition`, `kafka_offset`,
//! `attempts`, `last_error`) is never touched: it keeps pointing at the
//! original publication. The session is read-only to make sure of that.
//! Replay does not create topics (the rows were published, so their topics
//! exist) and does not take the relay's leader lock: it can run while the
//! relay runs.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use chrono::{DateTime, SecondsFormat, Utc};
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressState, ProgressStyle};
use rdkafka::error::KafkaError;
use rdkafka::producer::Producer;

use crate::codec::{Codec, SchemaError};
use crate::config::Config;
use crate::database::{self, DatabaseError};
use crate::outbox::{OutboxRow, RowError};
use crate::routing::TopicRouter;
use crate::sink::{self, classify_for_topic, record, RecordBuilder};
use crate::store::{text_values, RowQuery, Store, StoreError};
use crate::telemetry::ErrorChain;

/// Which published rows to replay.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplayFilter {
    /// Rows whose `occurred_at` is at or after this time.
    pub since: Option<DateTime<Utc>>,
    /// Rows with `id >= from_id`.
    pub from_id: Option<i64>,
    /// Rows with `id <= to_id`; by default the highest published id at start.
    pub to_id: Option<i64>,
    /// Only rows of this aggregate type.
    pub aggregate_type: Option<String>,
}

/// What a replay did.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplaySummary {
    /// Rows sent (delivered or failed).
    pub rows: u64,
    /// Rows whose delivery (or encoding) failed.
    pub failed: u64,
    /// First and last replayed row id, if any row matched.
    pub first_id: Option<i64>,
    pub last_id: Option<i64>,
    pub elapsed: Duration,
}

impl std::fmt::Display for ReplaySummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let secs = self.elapsed.as_secs_f64();
        match (self.first_id, self.last_id) {
            (Some(first), Some(last)) => write!(
                f,
                "replayed {} rows from id {first} to {last} in {secs:.1} s, {} failed",
                self.rows, self.failed
            ),
            _ => write!(f, "replayed 0 rows (none matched) in {secs:.1} s, 0 failed"),
        }
    }
}

/// Why a replay could not run (individual delivery failures are counted in
/// [`ReplaySummary::failed`] instead).
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("give --since or --from-id: replaying the whole outbox must be asked for explicitly (--from-id 1)")]
    NoFilter,
    #[error("--from-id {from} is above --to-id {to}")]
    EmptyRange { from: i64, to: i64 },
    #[error(transparent)]
    Database(#[from] DatabaseError),
    #[error("postgres")]
    Postgres(#[from] tokio_postgres::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("outbox row cannot be read")]
    Row(#[from] RowError),
    #[error(transparent)]
    Schema(#[from] SchemaError),
    #[error("cannot create the Kafka producer")]
    Producer(#[source] KafkaError),
}

/// Runs `relay replay`: prints the summary line; exit 1 if any row failed.
pub async fn run(config: &Config, filter: &ReplayFilter) -> Result<ExitCode, ReplayError> {
    let summary = replay(config, filter).await?;
    println!("{summary}");
    Ok(if summary.failed > 0 { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}

/// Re-publishes the published rows that `filter` selects, waits for every
/// delivery and returns the counts. A progress bar is drawn on stderr when
/// it is a terminal.
pub async fn replay(config: &Config, filter: &ReplayFilter) -> Result<ReplaySummary, ReplayError> {
    if filter.since.is_none() && filter.from_id.is_none() {
        return Err(ReplayError::NoFilter);
    }
    if let (Some(from), Some(to)) = (filter.from_id, filter.to_id) {
        if from > to {
            return Err(ReplayError::EmptyRange { from, to });
        }
    }
    let started = Instant::now();
    let replayed_at = Utc::now().to_rfc3339_opts(SecondsFormat::Micros, true);
    let client = database::connect(&config.postgres).await?;
    // Replays are not publications: nothing here may write publish state.
    client.batch_execute("SET default_transaction_read_only = on").await?;
    let store = Store::new(config);
    let table = store.table_layout(&client).await?;

    let after = filter.from_id.map_or(0, |id| id.saturating_sub(1));
    let upto = match filter.to_id {
        Some(to) => to,
        None => store.max_published_id(&client).await?,
    };

    let progress = if std::io::stderr().is_terminal() {
        let total: i64 = client
            .query_one(&RowQuery::replay_count(store.sql()), &[&after, &upto, &filter.since, &filter.aggregate_type])
            .await?
            .try_get(0)?;
        progress_bar(u64::try_from(total).unwrap_or(0))
    } else {
        ProgressBar::hidden()
    };

    let codec = Codec::prepare(config).await?;
    let builder = RecordBuilder::new(TopicRouter::new(&config.routing), codec);
    let producer = sink::reports::create(&sink::idempotent_config(&config.kafka)).map_err(ReplayError::Producer)?;
    let principal = config.kafka.principal();
    let statement = client.prepare(&RowQuery::replay(store.sql(), &table.columns)).await?;
    let limit = i64::try_from(config.source.batch_rows).unwrap_or(i64::MAX);
    let max_in_flight = config.checkpoint.max_in_flight.max(1);

    let mut summary = ReplaySummary { rows: 0, failed: 0, first_id: None, last_id: None, elapsed: Duration::ZERO };
    let mut in_flight: FuturesUnordered<Delivery> = FuturesUnordered::new();
    let mut cursor = after;
    loop {
        let rows = client.query(&statement, &[&cursor, &upto, &filter.since, &filter.aggregate_type, &limit]).await?;
        let full = rows.len() as i64 >= limit;
        for pg_row in &rows {
            let (values, _) = text_values(pg_row)?;
            let row = table.layout.row(&values, None)?;
            cursor = row.id;
            summary.first_id.get_or_insert(row.id);
            summary.last_id = Some(row.id);
            summary.rows += 1;
            while in_flight.len() >= max_in_flight {
                settle(in_flight.next().await, &mut summary, &progress);
            }
            match send(&producer, &builder, &row, (&replayed_at, &principal)).await {
                Ok(delivery) => in_flight.push(delivery),
                Err(error) => fail(row.id, &error, &mut summary, &progress),
            }
        }
        if !full {
            break;
        }
    }
    while let Some(outcome) = in_flight.next().await {
        settle(Some(outcome), &mut summary, &progress);
    }
    // Everything is acknowledged; flush only returns queued-but-unsent leftovers (none).
    let _ = producer.flush(Duration::from_secs(10));
    progress.finish_and_clear();
    summary.elapsed = started.elapsed();
    Ok(summary)
}

type Delivery = std::pin::Pin<Box<dyn std::future::Future<Output = (i64, Result<(), String>)> + Send>>;

/// A progress bar of `total` rows on stderr.
fn progress_bar(total: u64) -> ProgressBar {
    let bar = ProgressBar::new(total);
    if let Ok(style) =
        ProgressStyle::with_template("{spinner} replay [{bar:40}] {pos}/{len} rows, {rate} rows/s, eta {eta}")
    {
        let rate = |state: &ProgressState, w: &mut dyn std::fmt::Write| {
            let _ = write!(w, "{:.0}", state.per_sec());
        };
        bar.set_style(style.progress_chars("=> ").with_key("rate", rate));
    }
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// Builds one row's record as the sink does, plus the replay headers, and
/// enqueues it (the shared produce loop waits while librdkafka's queue is full).
/// `principal` names the relay in an authorization refusal.
async fn send(
    producer: &sink::KafkaProducer,
    builder: &RecordBuilder,
    row: &OutboxRow,
    (replayed_at, principal): (&str, &str),
) -> Result<Delivery, String> {
    let topic = builder.topic(row);
    let record = builder
        .build(row, &topic)
        .map_err(|e| ErrorChain(&e).to_string())?
        .with_header("replayed", "true")
        .with_header("replayed_at", replayed_at);
    match record::produce(producer, record).await {
        Ok(delivery) => Ok(Box::pin(outcome(row.id, delivery, topic, principal.to_string()))),
        Err(err) => Err(classify_for_topic(err, &topic, principal).reason()),
    }
}

async fn outcome(
    id: i64,
    delivery: sink::reports::Report,
    topic: std::sync::Arc<str>,
    principal: String,
) -> (i64, Result<(), String>) {
    let result = match delivery.await {
        Ok(_) => Ok(()),
        Err(KafkaError::Canceled) => Err("producer closed before delivery".to_string()),
        Err(err) => Err(classify_for_topic(err, &topic, &principal).reason()),
    };
    (id, result)
}

fn settle(done: Option<(i64, Result<(), String>)>, summary: &mut ReplaySummary, progress: &ProgressBar) {
    match done {
        Some((_, Ok(()))) => progress.inc(1),
        Some((id, Err(error))) => fail(id, &error, summary, progress),
        None => {}
    }
}

fn fail(id: i64, error: &str, summary: &mut ReplaySummary, progress: &ProgressBar) {
    summary.failed += 1;
    progress.inc(1);
    progress.suspend(|| tracing::warn!(row_id = id, error = %error, "replay of row failed"));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_line() {
        let summary = ReplaySummary {
            rows: 3,
            failed: 1,
            first_id: Some(4),
            last_id: Some(9),
            elapsed: Duration::from_millis(1500),
        };
        assert_eq!(summary.to_string(), "replayed 3 rows from id 4 to 9 in 1.5 s, 1 failed");
        let none = ReplaySummary { rows: 0, failed: 0, first_id: None, last_id: None, elapsed: Duration::ZERO };
        assert_eq!(none.to_string(), "replayed 0 rows (none matched) in 0.0 s, 0 failed");
    }
}
