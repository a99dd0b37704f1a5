//! Exactly-once delivery (`kafka.delivery = "exactly_once"`): the sink sends
//! the rows in Kafka transactions, each closed by a progress record
//! ([`super::progress`]) that names every row it carries and where it
//! landed, and hands the rows on to the checkpoint stage only once the
//! transaction committed.
//!
//! Why no row is seen twice by a `read_committed` consumer:
//! - A transaction's rows and its progress record become visible together,
//!   or not at all. A crash before the commit aborts them (the next
//!   producer's `init_transactions` does it, and fences the old one); the
//!   rows are not recorded in Postgres, so they are sent again, once.
//! - A crash after the commit but before the publish-state write leaves
//!   committed rows unrecorded: at the next start the recovery reads the
//!   progress records back and records those rows before anything is read
//!   from the source (`checkpoint::progress`), and the sources skip rows
//!   recorded as published.
//! - Every relay of a group has the same `transactional.id`: a new leader's
//!   `init_transactions` fences the old producer, whose next send or commit
//!   fails; the sink then stops ([`SinkError::Fenced`]) and the relay steps
//!   down. It never retries into a duplicate.
//!
//! Held rows keep per-entity order: a row refused at produce time is held
//! before the transaction; a row refused in its delivery report aborts the
//! transaction, is held, and the batch is sent again in a new transaction,
//! where the later rows of its entity wait behind it.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::Producer;

use super::reports::KafkaProducer;
use tokio::sync::mpsc;

use super::{Failure, KafkaSink, SinkError};
use crate::config::Config;
use crate::delivery::{InFlight, ProgressRecord, ProgressRow, PublishError, RoutedRow};
use crate::error_class::Leaf;
use crate::hold::HeldAt;
use crate::outbox::{OutboxRow, SourceEvent};
use crate::telemetry::metrics;

/// How long a blocking transaction call may take before it fails.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// 1 ms steps to wait for librdkafka to count delivered messages as gone
/// before a commit (see `send_progress`).
const SETTLE_STEPS: usize = 20;
/// Aborted attempts of one batch before the run restarts.
const MAX_ATTEMPTS: usize = 10;

/// The bounds and names of exactly-once mode.
#[derive(Debug, Clone)]
pub struct Transactions {
    pub transactional_id: String,
    pub progress_topic: String,
    pub interval: Duration,
    pub max_rows: usize,
    pub max_bytes: usize,
    /// Test-only: a pause between a commit and handing the rows on, so a
    /// test can kill the relay in that window (`RELAY_TEST_AFTER_COMMIT_DELAY_MS`,
    /// read only with the `test-hooks` feature).
    pub after_commit_delay: Option<Duration>,
}

impl Transactions {
    pub fn new(config: &Config) -> Self {
        let kafka = &config.kafka;
        Self {
            transactional_id: config.transactional_id(),
            progress_topic: kafka.progress_topic.clone(),
            interval: Duration::from_millis(kafka.transaction_interval_ms),
            max_rows: kafka.transaction_max_rows,
            max_bytes: kafka.transaction_max_bytes,
            after_commit_delay: test_after_commit_delay(),
        }
    }
}

/// `RELAY_TEST_AFTER_COMMIT_DELAY_MS`, read only in builds with the
/// `test-hooks` feature: `cargo test` turns it on (the crate's
/// dev-dependency on itself), so tests/it/slow/exactly_once.rs can kill the relay
/// between a commit and the publish state, while the release binary never
/// reads the variable.
#[cfg(feature = "test-hooks")]
fn test_after_commit_delay() -> Option<Duration> {
    std::env::var("RELAY_TEST_AFTER_COMMIT_DELAY_MS").ok().and_then(|v| v.parse().ok()).map(Duration::from_millis)
}

/// Without the `test-hooks` feature there is no delay.
#[cfg(not(feature = "test-hooks"))]
fn test_after_commit_delay() -> Option<Duration> {
    None
}

/// Runs a blocking transaction call of the producer off the runtime.
async fn call<F>(producer: &KafkaProducer, f: F) -> Result<(), KafkaError>
where
    F: FnOnce(&KafkaProducer) -> Result<(), KafkaError> + Send + 'static,
{
    let producer = producer.clone();
    match tokio::task::spawn_blocking(move || f(&producer)).await {
        Ok(result) => result,
        Err(_) => Err(KafkaError::Canceled),
    }
}

/// Whether `err` says another producer with the same transactional id took
/// over (or the producer can go on no more): then the sink stops with
/// [`SinkError::Fenced`], whose class makes the relay step down.
fn is_fenced(err: &KafkaError) -> bool {
    if let KafkaError::Transaction(e) = err {
        if e.is_fatal() {
            return true;
        }
    }
    matches!(
        err.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::Fenced
                | RDKafkaErrorCode::ProducerFenced
                | RDKafkaErrorCode::InvalidProducerEpoch
                | RDKafkaErrorCode::TransactionCoordinatorFenced
        )
    )
}

fn requires_abort(err: &KafkaError) -> bool {
    matches!(err, KafkaError::Transaction(e) if e.txn_requires_abort())
}

/// A transaction call's failure as the sink's error.
fn failure(what: &str, err: KafkaError) -> SinkError {
    let refused = err.rdkafka_error_code() == Some(RDKafkaErrorCode::TransactionalIdAuthorizationFailed);
    let fenced = is_fenced(&err);
    let failure = Failure::because(what, Leaf(err));
    if refused {
        SinkError::TransactionalIdRefused(failure)
    } else if fenced {
        SinkError::Fenced(failure)
    } else {
        SinkError::Transaction(failure)
    }
}

/// Reads source events into the next transaction's batch. Rows that arrive
/// while a transaction waits for its acknowledgements or its commit are
/// collected meanwhile (the source goes on reading Postgres instead of
/// waiting for the commit), so under load each transaction carries what
/// arrived during the previous one and batches grow by themselves. A row
/// that arrives when the sink is idle waits at most
/// `transaction_interval_ms` for others to share its transaction.
struct Collector {
    input: mpsc::Receiver<SourceEvent>,
    pending: Vec<SourceEvent>,
    rows: usize,
    bytes: usize,
    max_rows: usize,
    max_bytes: usize,
    interval: Duration,
    /// The source is done: what is pending is the last batch.
    closed: bool,
}

impl Collector {
    fn new(input: mpsc::Receiver<SourceEvent>, bounds: &Transactions) -> Self {
        Self {
            input,
            pending: Vec::new(),
            rows: 0,
            bytes: 0,
            max_rows: bounds.max_rows.max(1),
            max_bytes: bounds.max_bytes.max(1),
            interval: bounds.interval,
            closed: false,
        }
    }

    fn is_full(&self) -> bool {
        self.rows >= self.max_rows || self.bytes >= self.max_bytes
    }

    fn add(&mut self, event: Option<SourceEvent>) {
        match event {
            Some(event) => {
                if let SourceEvent::Row(row) = &event {
                    self.rows += 1;
                    self.bytes += row.payload.as_ref().map_or(0, bytes::Bytes::len);
                }
                self.pending.push(event);
            }
            None => self.closed = true,
        }
    }

    /// Awaits `work`, collecting source events into the next batch
    /// meanwhile, up to the bounds. (`recv` is cancel-safe: an event is
    /// either taken or left in the channel.)
    async fn while_awaiting<F: std::future::Future>(&mut self, work: F) -> F::Output {
        tokio::pin!(work);
        loop {
            if self.closed || self.is_full() {
                return work.await;
            }
            tokio::select! {
                biased;
                out = &mut work => return out,
                event = self.input.recv() => self.add(event),
            }
        }
    }

    /// The next batch, in source order, up to the rows or bytes bound;
    /// `None` when the source is done and nothing is pending.
    async fn next_batch(&mut self) -> Option<Vec<SourceEvent>> {
        if self.pending.is_empty() && !self.closed {
            let first = self.input.recv().await;
            self.add(first);
            // Alone: wait a little for others to share the transaction.
            let deadline = tokio::time::Instant::now() + self.interval;
            while !self.closed && !self.is_full() {
                match tokio::time::timeout_at(deadline, self.input.recv()).await {
                    Ok(event) => self.add(event),
                    Err(_elapsed) => break,
                }
            }
        }
        // What is already waiting joins without a wait.
        while !self.closed && !self.is_full() {
            match self.input.try_recv() {
                Ok(event) => self.add(Some(event)),
                Err(mpsc::error::TryRecvError::Disconnected) => self.closed = true,
                Err(mpsc::error::TryRecvError::Empty) => break,
            }
        }
        (self.rows, self.bytes) = (0, 0);
        let batch = std::mem::take(&mut self.pending);
        (!batch.is_empty()).then_some(batch)
    }
}

/// What one attempt at a batch's transaction came to.
enum Attempt {
    /// Committed: the items, every delivery already acknowledged.
    Committed(Vec<InFlight>),
    /// A row was refused in its delivery report: the transaction was
    /// aborted; hold this row and try again.
    Refused(Box<RoutedRow>, String),
}

impl KafkaSink {
    /// Fences every earlier producer with this transactional id and aborts
    /// its open transaction. Before the recovery reads progress back.
    pub async fn init_transactions(&self) -> Result<(), SinkError> {
        call(&self.producer, |p| p.init_transactions(CALL_TIMEOUT))
            .await
            .map_err(|err| failure("cannot initialize transactions", err))
    }

    /// [`KafkaSink::run`] in exactly-once mode.
    pub(super) async fn run_transactional(
        mut self,
        bounds: Transactions,
        input: mpsc::Receiver<SourceEvent>,
        output: mpsc::Sender<InFlight>,
    ) -> Result<(), SinkError> {
        let mut collector = Collector::new(input, &bounds);
        while let Some(batch) = collector.next_batch().await {
            let items = self.send_batch(batch, &bounds, &mut collector).await?;
            if let Some(delay) = bounds.after_commit_delay {
                tracing::info!(
                    delay_ms = delay.as_millis() as u64,
                    "test delay: committed, publish state not yet recorded"
                );
                tokio::time::sleep(delay).await;
            }
            for item in items {
                metrics::in_flight_inc();
                if output.send(item).await.is_err() {
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    /// Sends one batch in a transaction until it commits, holding each row
    /// refused in a delivery report and sending the rest again.
    async fn send_batch(
        &mut self,
        batch: Vec<SourceEvent>,
        bounds: &Transactions,
        collector: &mut Collector,
    ) -> Result<Vec<InFlight>, SinkError> {
        if !batch.iter().any(|e| matches!(e, SourceEvent::Row(_))) {
            return Ok(batch.into_iter().filter_map(boundary).collect());
        }
        let mut refused: HashMap<i64, String> = HashMap::new();
        let mut to_hold: Vec<(RoutedRow, String)> = Vec::new();
        for _ in 0..MAX_ATTEMPTS {
            call(&self.producer, |p| p.begin_transaction())
                .await
                .map_err(|e| failure("cannot begin a transaction", e))?;
            // Inside the transaction, so a dead-letter copy goes with it.
            for (row, error) in to_hold.drain(..) {
                self.holder.hold(&row, &error, HeldAt::Delivery).await?;
            }
            match self.attempt(&batch, &refused, bounds, collector).await? {
                Attempt::Committed(items) => return Ok(items),
                Attempt::Refused(row, error) => {
                    metrics::transaction(None);
                    metrics::publish_error(true);
                    refused.insert(row.row.id, error.clone());
                    to_hold.push((*row, error));
                }
            }
        }
        Err(SinkError::Transaction(Failure::new(format!("a batch was aborted {MAX_ATTEMPTS} times in a row"))))
    }

    /// One transaction over `batch`: produce, wait for every delivery
    /// report, add the progress record, commit.
    async fn attempt(
        &mut self,
        batch: &[SourceEvent],
        refused: &HashMap<i64, String>,
        bounds: &Transactions,
        collector: &mut Collector,
    ) -> Result<Attempt, SinkError> {
        let mut items = Vec::with_capacity(batch.len());
        for event in batch {
            items.push(match event {
                SourceEvent::Boundary(b) => InFlight::Boundary(*b),
                SourceEvent::Row(row) => match refused.get(&row.id) {
                    Some(error) => self.refused_item(row, error),
                    None => self.publish(row.clone()).await?,
                },
            });
        }
        let mut settled = Vec::with_capacity(items.len());
        let mut progress = Vec::new();
        for item in items {
            let InFlight::Sent { row, delivery } = item else {
                settled.push(item);
                continue;
            };
            match collector.while_awaiting(delivery).await {
                Ok(ack) => {
                    progress.push(ProgressRow::new(&row, ack));
                    settled.push(InFlight::Sent { row, delivery: Box::pin(futures::future::ready(Ok(ack))) });
                }
                Err(permanent @ PublishError::Permanent { .. }) => {
                    self.abort().await?;
                    return Ok(Attempt::Refused(Box::new(row), permanent.reason()));
                }
                Err(retriable @ PublishError::Retriable { .. }) => {
                    // A fenced producer fails here too; its abort says so.
                    self.abort().await?;
                    return Err(SinkError::Transaction(Failure::because("a delivery failed", retriable)));
                }
            }
        }
        collector.while_awaiting(self.commit(progress, bounds)).await?;
        Ok(Attempt::Committed(settled))
    }

    /// The item of a row held after an aborted attempt.
    fn refused_item(&self, row: &OutboxRow, error: &str) -> InFlight {
        let topic = self.builder.topic(row);
        InFlight::Held { row: RoutedRow::new(row.clone(), topic), error: error.to_string() }
    }

    /// Adds the progress record and commits.
    async fn commit(&self, rows: Vec<ProgressRow>, bounds: &Transactions) -> Result<(), SinkError> {
        let count = rows.len();
        let record = ProgressRecord { transactional_id: bounds.transactional_id.clone(), rows }
            .outbound(&bounds.progress_topic)?;
        if let Err(err) = self.send_progress(record).await {
            let _ = self.abort().await;
            return Err(failure("cannot send the progress record", err));
        }
        let started = Instant::now();
        match call(&self.producer, |p| p.commit_transaction(CALL_TIMEOUT)).await {
            Ok(()) => {
                metrics::transaction(Some((count, started.elapsed())));
                Ok(())
            }
            Err(err) if requires_abort(&err) => {
                self.abort().await?;
                Err(SinkError::Transaction(Failure::because("the commit failed", Leaf(err))))
            }
            Err(err) => Err(failure("the commit failed", err)),
        }
    }

    /// Sends the progress record and waits for its delivery report: the
    /// commit must find nothing in flight, or rust-rdkafka's flush before
    /// it polls for a whole 100 ms step while the producer's own thread
    /// takes the report (100 ms added to every transaction).
    async fn send_progress(&self, record: super::Outbound) -> Result<(), KafkaError> {
        let delivery = super::record::produce(&self.producer, record).await?;
        delivery.await?;
        // The report reaches this task a moment before librdkafka counts
        // the message as gone; a flush that still sees it waits 100 ms.
        for _ in 0..SETTLE_STEPS {
            if self.producer.in_flight_count() == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        Ok(())
    }

    async fn abort(&self) -> Result<(), SinkError> {
        call(&self.producer, |p| p.abort_transaction(CALL_TIMEOUT))
            .await
            .map_err(|err| failure("cannot abort the transaction", err))
    }
}

fn boundary(event: SourceEvent) -> Option<InFlight> {
    match event {
        SourceEvent::Boundary(b) => Some(InFlight::Boundary(b)),
        SourceEvent::Row(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: i64) -> SourceEvent {
        SourceEvent::Row(OutboxRow::for_test(id, "o-1"))
    }

    fn ids(batch: &[SourceEvent]) -> Vec<i64> {
        batch.iter().filter_map(|e| if let SourceEvent::Row(r) = e { Some(r.id) } else { None }).collect()
    }

    fn bounds(max_rows: usize) -> Transactions {
        Transactions {
            transactional_id: "t".into(),
            progress_topic: "p".into(),
            interval: Duration::from_millis(5),
            max_rows,
            max_bytes: usize::MAX,
            after_commit_delay: None,
        }
    }

    #[tokio::test]
    async fn rows_arriving_during_a_commit_form_the_next_batch_in_order_and_bounded() {
        let (tx, rx) = mpsc::channel(100);
        let mut collector = Collector::new(rx, &bounds(3));
        tx.send(row(1)).await.expect("send");
        assert_eq!(ids(&collector.next_batch().await.expect("first batch")), vec![1]);

        // While "the commit" runs, rows 2..=6 arrive; the collector takes
        // three (the bound) and leaves the rest in the channel.
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
        let sender = tx.clone();
        tokio::spawn(async move {
            for id in 2..=6 {
                sender.send(row(id)).await.expect("send");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            let _ = done_tx.send(());
        });
        collector.while_awaiting(done_rx).await.expect("commit");
        assert_eq!(ids(&collector.next_batch().await.expect("second")), vec![2, 3, 4]);
        assert_eq!(ids(&collector.next_batch().await.expect("third")), vec![5, 6]);

        drop(tx);
        assert!(collector.next_batch().await.is_none(), "the source is done");
    }
}
