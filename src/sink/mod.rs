//! The sink stage: produces each row to Kafka and hands the pending delivery
//! to the checkpoint stage, in source order.
//!
//! Contract: the producer is idempotent with `acks=all`, so librdkafka's own
//! retries neither duplicate nor reorder records within a partition. The key
//! is the entity id and the partitioner is `murmur2_random`, the Java client's
//! default for keyed records, so every message of one entity lands in one
//! partition, the same one a Java producer would choose. A row counts as
//! published only when the checkpoint stage has its delivery report; nothing
//! here marks anything.
//!
//! The sink picks each record's partition itself (murmur2, as the Java
//! client) and sends a partition's first record of a run alone (see
//! [`first_write`]): a broker accepts any sequence number from a producer
//! it holds no state for, so a first request lost while the second lands
//! would let later records of an entity overtake earlier ones.
//!
//! After a row it could not send for a reason a restart may cure, the sink
//! sends nothing more: the run restarts from its last confirmed boundary,
//! and a row sent after the failed one would land before the failed one's
//! resend.
//!
//! Backpressure: when librdkafka's queue is full, the sink waits and stops
//! taking rows from the source, which stops reading Postgres.

pub mod classify;
pub mod connection;
pub mod consumer;
pub mod dead_letter;
pub mod first_write;
pub mod partition;
pub mod progress;
pub mod record;
pub mod reports;
pub mod topics;
pub mod transaction;

use std::sync::Arc;
use std::time::Instant;

use futures::FutureExt;
use rdkafka::error::KafkaError;
use rdkafka::producer::Producer;
use rdkafka::ClientConfig;
use tokio::sync::mpsc;

pub use classify::classify_for_topic;
pub use connection::{client_config, probe, ConnectError};
pub use dead_letter::DeadLetterTopic;
pub use record::{Outbound, RecordBuilder};
pub use reports::KafkaProducer;
pub use topics::Topics;
pub use transaction::Transactions;

use crate::codec::Codec;
use crate::config::{Config, Delivery, KafkaConfig};
use crate::delivery::{Ack, InFlight, PendingDelivery, PublishError, RoutedRow};
use crate::error_class::ErrorClass;
use crate::hold::{self, HeldAt, HeldEntities, Holder, TooManyHeld};
use crate::outbox::{OutboxRow, SourceEvent};
use crate::routing::{TopicKind, TopicRouter};
use crate::telemetry::{metrics, ErrorChain};

/// Why the sink stage stopped.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("cannot create the Kafka client")]
    Client(#[source] KafkaError),
    #[error(transparent)]
    TooManyHeld(#[from] TooManyHeld),
    /// The brokers refused the relay's credentials or certificate checks:
    /// only an operator can fix that.
    #[error(transparent)]
    Refused(ConnectError),
    /// Exactly-once: another producer with the same transactional id took
    /// over (a new leader): stop at once and step down, never retry.
    #[error("this relay's Kafka producer was fenced by a newer one with the same transactional id")]
    Fenced(#[source] Failure),
    /// Exactly-once: the principal may not use the transactional id.
    #[error("Kafka refused the transactional id")]
    TransactionalIdRefused(#[source] Failure),
    /// Exactly-once: a transaction could not be begun, committed or read
    /// back; the run restarts and nothing of it counts.
    #[error("Kafka transaction failed")]
    Transaction(#[source] Failure),
}

impl SinkError {
    /// Refused credentials or transactional id need an operator, a fenced
    /// producer ends the term; the rest restarts the run.
    pub fn class(&self) -> ErrorClass {
        match self {
            Self::Client(_) | Self::Transaction(_) => ErrorClass::Retry,
            Self::TooManyHeld(e) => e.class(),
            // Only a refusal is wrapped here (`needs_operator`), so its fix.
            Self::Refused(e) => ErrorClass::operator(e.fix()),
            Self::Fenced(_) => ErrorClass::StepDown,
            Self::TransactionalIdRefused(_) => ErrorClass::operator(
                "grant WRITE and DESCRIBE on TRANSACTIONAL_ID (kafka.transactional_id, prefixed) to the relay's principal, or use kafka.delivery = \"at_least_once\"",
            ),
        }
    }
}

/// Which step of exactly-once failed (`step`), and why, when a library
/// said so.
#[derive(Debug, thiserror::Error)]
#[error("{step}")]
pub struct Failure {
    step: String,
    #[source]
    cause: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl Failure {
    /// A failure the relay itself detected.
    pub fn new(step: impl Into<String>) -> Self {
        Self { step: step.into(), cause: None }
    }

    /// A failure of `step` that `cause` reports.
    pub fn because(step: impl Into<String>, cause: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self { step: step.into(), cause: Some(Box::new(cause)) }
    }
}

/// The producer properties for `config`: idempotent; in exactly-once mode
/// also transactional (`message.timeout.ms` may not exceed the transaction
/// timeout there, so a delivery is retried for as long as a transaction may
/// stay open).
pub fn producer_config(config: &Config) -> ClientConfig {
    let mut client = idempotent_config(&config.kafka);
    if config.kafka.delivery == Delivery::ExactlyOnce {
        let timeout = TRANSACTION_TIMEOUT_MS.to_string();
        client
            .set("transactional.id", config.transactional_id())
            .set("transaction.timeout.ms", &timeout)
            .set("message.timeout.ms", &timeout);
    }
    client
}

/// `transaction.timeout.ms` of exactly-once mode: how long the broker lets
/// a transaction of a vanished producer stay open before it aborts it.
const TRANSACTION_TIMEOUT_MS: u64 = 60_000;

/// The idempotent producer's properties, never transactional (`relay replay`).
pub fn idempotent_config(config: &KafkaConfig) -> ClientConfig {
    let mut client = client_config(config);
    client
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("partitioner", "murmur2_random")
        .set("compression.type", config.compression.librdkafka_name())
        .set("linger.ms", config.linger_ms().to_string())
        .set("batch.size", config.batch_size_bytes.to_string())
        .set("message.timeout.ms", config.message_timeout_ms.to_string())
        .set("queue.buffering.max.messages", config.queue_max_messages.to_string());
    client
}

/// Produces rows to Kafka.
pub struct KafkaSink {
    producer: KafkaProducer,
    /// Who the ACLs must name, for held-row messages.
    principal: Arc<str>,
    topics: Topics,
    builder: RecordBuilder,
    holder: Holder,
    /// Exactly-once mode's bounds; `None` at least once.
    transactions: Option<Transactions>,
    /// Which partitions had their first record of this run acknowledged.
    first_writes: first_write::FirstWrites,
    /// Set once a row could not be sent for a retriable reason: the run
    /// ends there, and nothing after that row may be sent before it.
    failed: bool,
}

impl KafkaSink {
    /// A sink whose held rows (and waiting rows) are decided by a holder
    /// over `held`, with the dead-letter topic if one is configured.
    pub fn new(config: &Config, held: HeldEntities, codec: Codec) -> Result<Self, SinkError> {
        let producer = reports::create(&producer_config(config)).map_err(SinkError::Client)?;
        let admin = client_config(&config.kafka).create().map_err(SinkError::Client)?;
        let principal: Arc<str> = config.kafka.principal().into();
        let topics = Topics::new(admin, producer.clone(), config.routing.clone(), Arc::clone(&principal));
        let mut holder = Holder::new(held);
        if let Some(topic) = config.routing.dead_letter_topic.clone() {
            holder = holder.with_dead_letter(Arc::new(DeadLetterTopic::new(topic, producer.clone(), topics.clone())));
        }
        Ok(Self {
            producer,
            principal,
            topics,
            builder: RecordBuilder::new(TopicRouter::new(&config.routing), codec),
            holder,
            transactions: (config.kafka.delivery == Delivery::ExactlyOnce).then(|| Transactions::new(config)),
            first_writes: first_write::FirstWrites::default(),
            failed: false,
        })
    }

    /// The holder the checkpoint stage uses for rows held from their
    /// delivery report.
    pub fn holder(&self) -> Holder {
        self.holder.clone()
    }

    /// Forwards every source event, in order, to the checkpoint stage.
    /// Returns when the source is exhausted or the checkpoint stage is gone.
    pub async fn run(
        mut self,
        mut input: mpsc::Receiver<SourceEvent>,
        output: mpsc::Sender<InFlight>,
    ) -> Result<(), SinkError> {
        if let Some(bounds) = self.transactions.take() {
            return self.run_transactional(bounds, input, output).await;
        }
        while let Some(event) = input.recv().await {
            let item = match event {
                SourceEvent::Boundary(boundary) => InFlight::Boundary(boundary),
                SourceEvent::Row(row) => self.publish(row).await?,
            };
            metrics::in_flight_inc();
            if output.send(item).await.is_err() || self.failed {
                break;
            }
        }
        Ok(())
    }

    /// Starts the delivery of one row, or holds it, or lets it wait behind
    /// its entity's held row.
    async fn publish(&mut self, row: OutboxRow) -> Result<InFlight, SinkError> {
        let topic = self.builder.topic(&row);
        let routed = RoutedRow::new(row, topic);
        match self.check(&routed).await {
            Ok(record) => self.hand_over(routed, record).await,
            Err(NotSent::Waits(behind)) => Ok(InFlight::Waiting { row: routed, behind }),
            Err(NotSent::Held(error)) => self.hold(routed, error).await,
            Err(NotSent::Failed(error)) => Ok(self.failed(routed, error)),
        }
    }

    /// Everything decided before a row goes to the producer: whether it
    /// waits behind a held row, whether it can be published at all
    /// (tombstone, topic, kind, payload, size), and its record, with the
    /// partition chosen.
    async fn check(&self, routed: &RoutedRow) -> Result<Outbound, NotSent> {
        if let Some(behind) = self.holder.waits_behind(routed) {
            return Err(NotSent::Waits(behind));
        }
        let row = &routed.row;
        let kind = TopicKind::of_row(&row.kind);
        if row.payload.is_none() && kind != TopicKind::State {
            return Err(NotSent::Held(hold::tombstone_reason(&row.kind)));
        }
        let facts = match self.topics.ensure(&routed.topic, kind, Some(&row.aggregate_type)).await {
            Ok(facts) => facts,
            Err(permanent @ PublishError::Permanent { .. }) => return Err(NotSent::Held(permanent.reason())),
            Err(retriable) => return Err(NotSent::Failed(retriable)),
        };
        facts.accepts(kind, &routed.topic, &row.aggregate_type).map_err(NotSent::Held)?;
        let mut record =
            self.builder.build(row, &routed.topic).map_err(|err| NotSent::Held(ErrorChain(&err).to_string()))?;
        if let Some(limit) = facts.max_message_bytes {
            let size = record.size();
            if size > limit {
                return Err(NotSent::Held(hold::too_large_reason(size, &routed.topic, limit)));
            }
        }
        if let Some(partitions) = facts.partitions {
            record.partition = Some(partition::partition_for(&record.key, partitions));
        }
        Ok(record)
    }

    /// Hands `record` (of `routed`) to the producer, after the first record
    /// of its partition was acknowledged (see [`first_write`]); the pending
    /// delivery goes on to the checkpoint stage.
    async fn hand_over(&mut self, mut routed: RoutedRow, record: Outbound) -> Result<InFlight, SinkError> {
        let bytes = record.payload.as_ref().map_or(0, bytes::Bytes::len);
        let partition = record.partition;
        if let Some(partition) = partition {
            self.first_writes.ready(&routed.topic, partition).await;
        }
        // A clone of the key `Bytes` allocates; only a dead-letter copy needs it.
        let key = self.holder.keeps_payloads().then(|| record.key.clone());
        let delivery = match record::produce(&self.producer, record).await {
            Ok(delivery) => delivery,
            Err(err) => {
                return match classify_for_topic(err, &routed.topic, &self.principal) {
                    permanent @ PublishError::Permanent { .. } => {
                        routed.key = key;
                        self.hold(routed, permanent.reason()).await
                    }
                    retriable => Ok(self.failed(routed, retriable)),
                }
            }
        };
        let handed_over = Instant::now();
        metrics::bytes_produced(bytes);
        metrics::producer_queue(self.producer.in_flight_count());
        if self.holder.keeps_payloads() {
            // For the dead-letter copy of a row held from its report.
            routed.key = key;
        } else {
            // Only a dead-letter copy needs it after this point.
            routed.row.payload = None;
        }
        // Cloned per row for the error message of a refused delivery.
        let (topic, principal) = (routed.topic.clone(), Arc::clone(&self.principal));
        let pending: PendingDelivery = Box::pin(delivery.map(move |outcome| {
            metrics::kafka_ack(handed_over.elapsed());
            delivery_outcome(outcome, &topic, &principal)
        }));
        let pending = match partition {
            Some(partition) => self.first_writes.sent(&routed.topic, partition, pending),
            None => pending,
        };
        Ok(InFlight::Sent { row: routed, delivery: pending })
    }

    async fn hold(&self, row: RoutedRow, error: String) -> Result<InFlight, SinkError> {
        self.holder.hold(&row, &error, HeldAt::Produce).await?;
        Ok(InFlight::Held { row, error })
    }

    /// A row whose send failed in a way a restart may cure: the checkpoint
    /// stage ends the run when it reaches it, after settling what came
    /// before; the sink sends nothing after it.
    fn failed(&mut self, row: RoutedRow, error: PublishError) -> InFlight {
        tracing::warn!(row = row.row.id, topic = %row.topic, error = %ErrorChain(&error), "cannot send the row; the run ends here and restarts from its last confirmed boundary");
        self.failed = true;
        InFlight::Sent { row, delivery: Box::pin(futures::future::ready(Err(error))) }
    }
}

/// Why [`KafkaSink::check`] did not let a row go to the producer.
enum NotSent {
    /// It waits behind this held row of its entity.
    Waits(i64),
    /// It can never be published as it is: held for this reason.
    Held(String),
    /// A failure a restart may cure (see [`KafkaSink::failed`]).
    Failed(PublishError),
}

/// What a delivery report of a record to `topic` means for its row.
fn delivery_outcome(outcome: Result<Ack, KafkaError>, topic: &str, principal: &str) -> Result<Ack, PublishError> {
    match outcome {
        // A report of success without an offset (librdkafka's -1001, e.g. a
        // retry answered DUPLICATE_SEQUENCE_NUMBER) was seen for a message
        // no consumer could find: never record it as published; the run
        // restarts and sends it again (a duplicate at worst, never a loss).
        Ok(delivery) if delivery.offset < 0 => Err(PublishError::retriable(format!(
            "delivery report without an offset (partition {}, offset {}); not counted as published",
            delivery.partition, delivery.offset
        ))),
        Ok(ack) => Ok(ack),
        Err(KafkaError::Canceled) => Err(PublishError::retriable("producer closed before delivery")),
        Err(err) => Err(classify_for_topic(err, topic, principal)),
    }
}

#[cfg(test)]
mod tests {
    use rdkafka::error::RDKafkaErrorCode;

    use super::*;

    #[test]
    fn a_delivery_report_counts_as_published_only_with_an_offset() {
        let outcome = |report| delivery_outcome(report, "orders", "User:relay");
        assert_eq!(outcome(Ok(Ack { partition: 2, offset: 7 })).ok(), Some(Ack { partition: 2, offset: 7 }));
        assert!(matches!(outcome(Ok(Ack { partition: 2, offset: -1001 })), Err(PublishError::Retriable { .. })));
        assert!(matches!(outcome(Err(KafkaError::Canceled)), Err(PublishError::Retriable { .. })));
        let refused = KafkaError::MessageProduction(RDKafkaErrorCode::TopicAuthorizationFailed);
        match outcome(Err(refused)) {
            Err(err @ PublishError::Permanent { .. }) => {
                let text = err.reason();
                assert!(text.contains("grant WRITE on TOPIC orders"), "{text}")
            }
            other => panic!("an ACL refusal holds the row: {other:?}"),
        }
    }
}
