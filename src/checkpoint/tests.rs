//! The settling logic without Postgres: an in-memory store, deliveries
//! completed in any order.

use std::sync::{Arc, Mutex};

use proptest::prelude::*;
use tokio::sync::oneshot;

use super::*;
use crate::outbox::{OutboxRow, PollBatch};

#[derive(Clone, Default)]
struct MemoryStore {
    published: Arc<Mutex<Vec<Published>>>,
    held: Arc<Mutex<Vec<HeldState>>>,
}

impl MemoryStore {
    fn recorded(&self) -> HashSet<i64> {
        let published = self.published.lock().expect("lock");
        let held = self.held.lock().expect("lock");
        published.iter().map(|p| p.id).chain(held.iter().map(|h| h.id)).collect()
    }
}

impl PublishStateStore for MemoryStore {
    async fn record_published(&self, rows: &[&Published]) -> Result<Vec<i64>, StoreError> {
        self.published.lock().expect("lock").extend(rows.iter().map(|r| (*r).clone()));
        Ok(rows.iter().map(|r| r.id).collect())
    }
    async fn record_held(&self, rows: &[&HeldState]) -> Result<Vec<i64>, StoreError> {
        self.held.lock().expect("lock").extend(rows.iter().map(|r| (*r).clone()));
        Ok(rows.iter().map(|r| r.id).collect())
    }
    async fn in_progress(&self, _xids: &[u32]) -> Result<HashSet<u32>, StoreError> {
        Ok(HashSet::new())
    }
}

fn row(id: i64) -> RoutedRow {
    RoutedRow::new(OutboxRow::for_test(id, &format!("o-{}", id % 3)), "t".into())
}

/// One generated item: a row on `partition` (acked, or failing
/// permanently when `permanent`), followed by a boundary when `boundary`.
#[derive(Debug, Clone)]
struct Item {
    partition: i32,
    permanent: bool,
    boundary: bool,
}

fn items() -> impl Strategy<Value = (Vec<Item>, Vec<usize>, usize)> {
    prop::collection::vec((0..4i32, prop::bool::weighted(0.05), prop::bool::weighted(0.3)), 1..60).prop_flat_map(
        |raw| {
            let items: Vec<Item> = raw
                .into_iter()
                .map(|(partition, permanent, boundary)| Item { partition, permanent, boundary })
                .collect();
            let order: Vec<usize> = (0..items.len()).collect();
            (Just(items), Just(order).prop_shuffle(), 1..8usize)
        },
    )
}

/// Runs the checkpoint over `items`, completing deliveries in `ack_order`;
/// after every confirmation, checks that every row before the confirmed
/// boundary is recorded. Returns the last confirmed boundary.
async fn settle(items: Vec<Item>, ack_order: Vec<usize>, batch_rows: usize) -> Option<CommitBoundary> {
    let store = MemoryStore::default();
    let (confirmed_tx, mut confirmed_rx) = watch::channel(None);
    let checkpoint =
        Checkpoint::new(store.clone(), batch_rows, Duration::from_millis(1), Holder::default(), confirmed_tx);
    let (tx, rx) = mpsc::channel(8);
    let mut acks = Vec::new();
    // Rows before each boundary number, to check against.
    let mut rows_before = Vec::new();
    let feeder = {
        let mut sends = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let (ack_tx, ack_rx) = oneshot::channel::<Result<Ack, PublishError>>();
            acks.push((ack_tx, item.clone()));
            let delivery: PendingDelivery =
                Box::pin(async move { ack_rx.await.unwrap_or(Err(PublishError::retriable("dropped"))) });
            sends.push(InFlight::Sent { row: row(i as i64), delivery });
            if item.boundary {
                rows_before.push(i as i64 + 1);
                sends.push(InFlight::Boundary(CommitBoundary::Batch(PollBatch(rows_before.len() as u64))));
            }
        }
        tokio::spawn(async move {
            for item in sends {
                if tx.send(item).await.is_err() {
                    return;
                }
            }
        })
    };
    let acker = tokio::spawn(async move {
        let mut acks: Vec<Option<_>> = acks.into_iter().map(Some).collect();
        for (offset, index) in ack_order.into_iter().enumerate() {
            if let Some((ack_tx, item)) = acks[index].take() {
                let outcome = if item.permanent {
                    Err(PublishError::permanent("too large"))
                } else {
                    Ok(Ack { partition: item.partition, offset: offset as i64 })
                };
                let _ = ack_tx.send(outcome);
            }
            tokio::task::yield_now().await;
        }
    });
    let watcher = {
        let store = store.clone();
        tokio::spawn(async move {
            let mut last = None;
            while confirmed_rx.changed().await.is_ok() {
                let boundary = *confirmed_rx.borrow_and_update();
                if let Some(CommitBoundary::Batch(PollBatch(n))) = boundary {
                    let recorded = store.recorded();
                    let before = rows_before[n as usize - 1];
                    let missing: Vec<i64> = (0..before).filter(|id| !recorded.contains(id)).collect();
                    assert!(missing.is_empty(), "boundary {n} confirmed with rows {missing:?} not recorded");
                }
                last = boundary;
            }
            last
        })
    };
    checkpoint.run(rx).await.expect("checkpoint");
    feeder.await.expect("feeder");
    acker.await.expect("acker");
    watcher.await.expect("every confirmation covered recorded rows only")
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Any interleaving of acks across partitions confirms only a
    /// contiguous prefix of recorded rows, and in the end the last boundary.
    #[test]
    fn confirms_only_a_recorded_prefix((items, order, batch_rows) in items()) {
        let boundaries = items.iter().filter(|i| i.boundary).count() as u64;
        let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build().expect("runtime");
        let last = runtime.block_on(settle(items, order, batch_rows));
        let expected = (boundaries > 0).then_some(CommitBoundary::Batch(PollBatch(boundaries)));
        prop_assert_eq!(last, expected);
    }
}

#[tokio::test]
async fn a_permanent_delivery_error_holds_the_entity_for_later_rows() {
    let holder = Holder::default();
    let store = MemoryStore::default();
    let (confirmed_tx, _confirmed_rx) = watch::channel(None);
    let checkpoint = Checkpoint::new(store.clone(), 10, Duration::from_millis(5), holder.clone(), confirmed_tx);
    let (tx, rx) = mpsc::channel(4);
    let held = row(3);
    tx.send(InFlight::Sent {
        row: held.clone(),
        delivery: Box::pin(async { Err(PublishError::permanent("MessageSizeTooLarge")) }),
    })
    .await
    .expect("send");
    drop(tx);
    checkpoint.run(rx).await.expect("checkpoint");
    assert_eq!(holder.entities().blocker("order", "o-0"), Some(3));
    let recorded = store.held.lock().expect("lock").clone();
    assert_eq!(
        recorded,
        vec![HeldState { id: 3, error: "MessageSizeTooLarge".into(), attempted: true, waiting_for: None, xid: None }]
    );
}

/// Rows of one entity sent together and refused together in their delivery
/// reports: the first is held, the later ones wait behind it (one `held
/// retry` releases them all, in order), not held each on its own.
#[tokio::test]
async fn later_rows_refused_behind_a_delivery_hold_wait_behind_it() {
    let holder = Holder::default();
    let store = MemoryStore::default();
    let (confirmed_tx, _confirmed_rx) = watch::channel(None);
    let checkpoint = Checkpoint::new(store.clone(), 10, Duration::from_millis(5), holder.clone(), confirmed_tx);
    let (tx, rx) = mpsc::channel(4);
    for id in [3, 6] {
        tx.send(InFlight::Sent {
            row: row(id),
            delivery: Box::pin(async { Err(PublishError::permanent("TopicAuthorizationFailed")) }),
        })
        .await
        .expect("send");
    }
    drop(tx);
    checkpoint.run(rx).await.expect("checkpoint");
    let recorded = store.held.lock().expect("lock").clone();
    assert_eq!(recorded.len(), 2, "{recorded:?}");
    assert_eq!((recorded[0].id, recorded[0].waiting_for), (3, None));
    assert_eq!((recorded[1].id, recorded[1].waiting_for), (6, Some(3)));
}
