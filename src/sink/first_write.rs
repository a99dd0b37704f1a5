//! The first record a producer sends to a partition goes alone: no later
//! record of that partition is handed to librdkafka until Kafka has
//! acknowledged it.
//!
//! Why: a broker that holds no state for a producer id on a partition
//! accepts that producer's batch at *any* sequence number
//! (`ProducerAppendInfo.checkSequence`: "If there is no current producer
//! epoch ... accept writes with any sequence number"). So when the first
//! produce request of a partition fails without being persisted (a
//! partition still being set up after its topic was created, a leader that
//! moved) while the second one, already in flight, succeeds, the broker
//! keeps the second batch and can no longer place the first: its retry is
//! refused as a duplicate (librdkafka then reports success with offset
//! -1001) or as out of order. Either way the first records are missing and
//! the run's resend puts them after their entity's later records: per-key
//! order broken. Seen in CI right after the relay created a topic.
//!
//! Once one record of the partition is acknowledged, the broker holds the
//! producer's state and enforces the sequence, and librdkafka's idempotent
//! retries keep the order. The wait costs one round trip per partition per
//! pipeline run. A partition idle for [`REARM_AFTER`] is treated as new
//! again: the broker forgets idle producers (`producer.id.expiration.ms`,
//! one day by default).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use futures::future::{FutureExt, Shared};

use crate::delivery::PendingDelivery;

/// After this long without a record, a partition's next record waits for
/// its acknowledgement again (well inside the broker's producer expiry).
pub const REARM_AFTER: Duration = Duration::from_secs(3600);

enum State {
    /// The partition's first record, not yet acknowledged.
    Pending(Shared<PendingDelivery>),
    /// Acknowledged once; the time of the latest record handed over since.
    Open(Instant),
}

/// Per topic and partition, whether a record may be sent right away.
#[derive(Default)]
pub struct FirstWrites {
    topics: HashMap<String, HashMap<i32, State>>,
}

impl FirstWrites {
    /// Waits until a record may be handed to the producer for `partition`
    /// of `topic`: at once when the partition's first record of this run
    /// was acknowledged, else after that acknowledgement. A first record
    /// that failed leaves the partition new: the next record goes alone.
    pub async fn ready(&mut self, topic: &str, partition: i32) {
        let Some(partitions) = self.topics.get_mut(topic) else { return };
        match partitions.get(&partition) {
            Some(State::Pending(first)) => {
                let first = first.clone();
                tracing::debug!(topic, partition, "waiting for the partition's first acknowledgement");
                match first.await {
                    Ok(_) => partitions.insert(partition, State::Open(Instant::now())),
                    Err(_) => partitions.remove(&partition),
                };
            }
            Some(State::Open(last)) if last.elapsed() >= REARM_AFTER => {
                partitions.remove(&partition);
            }
            _ => {}
        }
    }

    /// Notes a record just handed to the producer for `partition` of
    /// `topic` (after [`FirstWrites::ready`]) and returns its delivery: when
    /// it is the partition's first, a shared one that the next record of
    /// the partition waits on.
    pub fn sent(&mut self, topic: &str, partition: i32, delivery: PendingDelivery) -> PendingDelivery {
        let partitions = match self.topics.get_mut(topic) {
            Some(partitions) => partitions,
            None => self.topics.entry(topic.to_string()).or_default(),
        };
        match partitions.get_mut(&partition) {
            Some(State::Open(last)) => {
                *last = Instant::now();
                delivery
            }
            // Not reachable after `ready`; sent as it is.
            Some(State::Pending(_)) => delivery,
            None => {
                let shared = delivery.shared();
                partitions.insert(partition, State::Pending(shared.clone()));
                Box::pin(shared)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::sync::oneshot;

    use super::*;
    use crate::delivery::{Ack, PublishError};

    fn delivery(rx: oneshot::Receiver<Result<Ack, PublishError>>) -> PendingDelivery {
        Box::pin(async move { rx.await.unwrap_or(Err(PublishError::retriable("dropped"))) })
    }

    /// The second record of a partition waits for the first's
    /// acknowledgement; other partitions and later records do not wait.
    #[tokio::test]
    async fn the_second_record_of_a_partition_waits_for_the_first_ack() {
        let mut writes = FirstWrites::default();
        assert!(writes.ready("t", 0).now_or_never().is_some(), "a new partition's first record goes at once");
        let (ack_first, first) = oneshot::channel();
        let first = writes.sent("t", 0, delivery(first));
        assert!(writes.ready("t", 1).now_or_never().is_some(), "another partition is not held up");
        let _other = writes.sent("t", 1, delivery(oneshot::channel().1));
        {
            let mut second = Box::pin(writes.ready("t", 0));
            assert!(
                futures::poll!(&mut second).is_pending(),
                "the second record went before the first was acknowledged"
            );
            ack_first.send(Ok(Ack { partition: 0, offset: 0 })).expect("send ack");
            second.await;
        }
        // The checkpoint still gets the first record's outcome.
        assert_eq!(first.await.expect("first delivered"), Ack { partition: 0, offset: 0 });
        // From now on the partition is open.
        let _second = writes.sent("t", 0, delivery(oneshot::channel().1));
        assert!(writes.ready("t", 0).now_or_never().is_some(), "an open partition does not wait");
    }

    /// A first record that failed leaves the partition new: the next record
    /// goes alone again.
    #[tokio::test]
    async fn a_failed_first_record_makes_the_next_one_first() {
        let mut writes = FirstWrites::default();
        let (fail, first) = oneshot::channel();
        let _first = writes.sent("t", 0, delivery(first));
        fail.send(Err(PublishError::retriable("not leader"))).expect("send");
        writes.ready("t", 0).await;
        let (ack_next, next) = oneshot::channel();
        let _next = writes.sent("t", 0, delivery(next));
        let mut third = Box::pin(writes.ready("t", 0));
        assert!(futures::poll!(&mut third).is_pending(), "the record after a failed first one must go alone");
        ack_next.send(Ok(Ack { partition: 0, offset: 1 })).expect("send");
        third.await;
    }
}
