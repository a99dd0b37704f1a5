//! The relay's Kafka producer and its delivery reports, without a channel or
//! a boxed sender per record.
//!
//! rdkafka's `FutureProducer` allocates a oneshot channel and boxes its
//! sender for every record; both are made on the relay's thread and freed
//! on the producer's polling thread, which defeats the allocator's
//! per-thread caches. Here each record takes a slot in a table that the
//! delivery callback fills and the record's [`Report`] future reads. Slots
//! are reused, so the table grows to the most records in flight at once and
//! then stays that size.
//!
//! The opaque librdkafka carries for a record is a ticket: the slot's index
//! and how many times the slot was handed out before. A report whose ticket is not
//! the slot's current one (librdkafka reporting a record twice, or after
//! its slot was reused) is logged and dropped instead of settling another
//! record with the wrong partition and offset.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};

use rdkafka::client::ClientContext;
use rdkafka::config::FromClientConfigAndContext;
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::message::Message;
use rdkafka::producer::{DeliveryResult, ProducerContext, ThreadedProducer};
use rdkafka::ClientConfig;

use crate::delivery::Ack;

/// The producer the sink, the dead-letter copy and `relay replay` share:
/// librdkafka's own thread serves the delivery reports into [`Reports`].
pub type KafkaProducer = Arc<ThreadedProducer<Reports>>;

/// Creates a producer with `config`.
pub fn create(config: &ClientConfig) -> KafkaResult<KafkaProducer> {
    Ok(Arc::new(ThreadedProducer::from_config_and_context(config, Reports::default())?))
}

/// The delivery reports of records in flight, by slot.
#[derive(Default)]
pub struct Reports {
    table: Mutex<Table>,
}

#[derive(Default)]
struct Table {
    slots: Vec<Entry>,
    free: Vec<usize>,
}

struct Entry {
    /// Times this slot was handed out before its current record (wrapping):
    /// the high half of a ticket.
    generation: u32,
    state: Slot,
}

// A ticket packs two 32-bit halves into the opaque.
const _: () = assert!(usize::BITS >= 64, "tickets need a 64-bit usize");

/// A record's opaque: its slot's generation in the high 32 bits, the
/// slot's index in the low 32 (the table never holds more slots than
/// records in flight, far fewer than 2^32).
fn ticket(slot: usize, generation: u32) -> usize {
    debug_assert!(slot <= u32::MAX as usize, "slot index {slot} does not fit a ticket");
    ((generation as usize) << 32) | slot
}

/// The slot and generation of a ticket.
fn untie(ticket: usize) -> (usize, u32) {
    (ticket & 0xffff_ffff, (ticket >> 32) as u32)
}

enum Slot {
    Free,
    /// Handed to a record; the waker of the task awaiting its report.
    Waiting(Option<Waker>),
    Done(Result<Ack, KafkaError>),
    /// Its [`Report`] was dropped before the report came: freed when it does.
    Abandoned,
}

impl Table {
    /// A free slot, now waiting for a report: its ticket.
    fn take(&mut self) -> usize {
        match self.free.pop() {
            Some(slot) => {
                let entry = &mut self.slots[slot];
                entry.generation = entry.generation.wrapping_add(1);
                entry.state = Slot::Waiting(None);
                ticket(slot, entry.generation)
            }
            None => {
                self.slots.push(Entry { generation: 0, state: Slot::Waiting(None) });
                ticket(self.slots.len() - 1, 0)
            }
        }
    }

    fn release(&mut self, slot: usize) {
        self.slots[slot].state = Slot::Free;
        self.free.push(slot);
    }
}

impl Reports {
    fn lock(&self) -> MutexGuard<'_, Table> {
        // The table stays consistent across a panic: every change is one
        // assignment.
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A slot for a record about to be sent; its opaque is [`Report::ticket`].
    pub fn reserve(self: &Arc<Self>) -> Report {
        let ticket = self.lock().take();
        Report { reports: Arc::clone(self), ticket, sent: false, settled: false }
    }

    /// Slots in use (records in flight and reports not yet read).
    #[cfg(test)]
    fn in_use(&self) -> usize {
        let table = self.lock();
        table.slots.len() - table.free.len()
    }

    fn settle(&self, ticket: usize, outcome: Result<Ack, KafkaError>) {
        let (slot, generation) = untie(ticket);
        let waker = {
            let mut table = self.lock();
            let Some(entry) = table.slots.get_mut(slot).filter(|e| e.generation == generation) else {
                // librdkafka reports each record it took exactly once; this
                // would be a second report, or one for a slot already reused.
                tracing::error!(slot, generation, "delivery report for no record in flight; ignored");
                return;
            };
            match std::mem::replace(&mut entry.state, Slot::Done(outcome)) {
                Slot::Waiting(waker) => waker,
                Slot::Abandoned => {
                    table.release(slot);
                    None
                }
                previous => {
                    entry.state = previous;
                    tracing::error!(slot, generation, "second delivery report for one record; ignored");
                    None
                }
            }
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

impl ClientContext for Reports {}

impl ProducerContext for Reports {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, ticket: usize) {
        let outcome = match result {
            Ok(message) => Ok(Ack { partition: message.partition(), offset: message.offset() }),
            Err((error, _)) => Err(error.clone()),
        };
        self.settle(ticket, outcome);
    }
}

/// The delivery report of one record, once it comes.
pub struct Report {
    reports: Arc<Reports>,
    ticket: usize,
    /// Handed to librdkafka, which will report it.
    sent: bool,
    /// Read: the slot is free again.
    settled: bool,
}

impl Report {
    /// The record's opaque for librdkafka.
    pub fn ticket(&self) -> usize {
        self.ticket
    }

    fn slot(&self) -> usize {
        untie(self.ticket).0
    }

    /// librdkafka took the record: a report will come.
    pub fn mark_sent(&mut self) {
        self.sent = true;
    }
}

impl Future for Report {
    type Output = Result<Ack, KafkaError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if self.settled {
            return Poll::Ready(Err(KafkaError::Canceled));
        }
        let slot = self.slot();
        let outcome = {
            let mut table = self.reports.lock();
            match &mut table.slots[slot].state {
                Slot::Waiting(waker) => {
                    if !waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                        *waker = Some(cx.waker().clone());
                    }
                    return Poll::Pending;
                }
                Slot::Done(_) => match std::mem::replace(&mut table.slots[slot].state, Slot::Free) {
                    Slot::Done(outcome) => {
                        table.free.push(slot);
                        outcome
                    }
                    _ => unreachable!("matched Done above"),
                },
                Slot::Free | Slot::Abandoned => Err(KafkaError::Canceled),
            }
        };
        self.settled = true;
        Poll::Ready(outcome)
    }
}

impl Drop for Report {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        let mut table = self.reports.lock();
        let slot = self.slot();
        match table.slots[slot].state {
            Slot::Waiting(_) if self.sent => table.slots[slot].state = Slot::Abandoned,
            Slot::Waiting(_) | Slot::Done(_) => table.release(slot),
            Slot::Free | Slot::Abandoned => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;

    fn reports() -> Arc<Reports> {
        Arc::new(Reports::default())
    }

    #[test]
    fn a_report_reads_its_own_slot_and_frees_it() {
        let reports = reports();
        let mut first = reports.reserve();
        let mut second = reports.reserve();
        first.mark_sent();
        second.mark_sent();
        assert!((&mut first).now_or_never().is_none(), "no report yet");
        reports.settle(second.ticket(), Ok(Ack { partition: 1, offset: 7 }));
        reports.settle(first.ticket(), Ok(Ack { partition: 0, offset: 3 }));
        assert_eq!(first.now_or_never().expect("ready").expect("ok"), Ack { partition: 0, offset: 3 });
        assert_eq!(second.now_or_never().expect("ready").expect("ok"), Ack { partition: 1, offset: 7 });
        assert_eq!(reports.in_use(), 0);
        let third = reports.reserve();
        assert!(third.slot() < 2, "a freed slot is reused");
    }

    #[test]
    fn a_report_for_a_reused_slot_settles_nothing() {
        let reports = reports();
        let mut first = reports.reserve();
        first.mark_sent();
        let stale = first.ticket();
        reports.settle(stale, Ok(Ack { partition: 0, offset: 1 }));
        assert!(first.now_or_never().is_some(), "settled");
        let mut second = reports.reserve();
        second.mark_sent();
        assert_eq!(second.slot(), untie(stale).0, "the slot is reused");
        // A report with the first record's ticket (librdkafka repeating
        // itself) must not hand the first record's offset to the second.
        reports.settle(stale, Ok(Ack { partition: 0, offset: 1 }));
        assert!((&mut second).now_or_never().is_none(), "still waiting for its own report");
        reports.settle(second.ticket(), Ok(Ack { partition: 3, offset: 2 }));
        assert_eq!(second.now_or_never().expect("ready").expect("ok"), Ack { partition: 3, offset: 2 });
    }

    #[test]
    fn an_error_report_is_the_reports_outcome() {
        let reports = reports();
        let mut report = reports.reserve();
        report.mark_sent();
        reports.settle(report.ticket(), Err(KafkaError::Canceled));
        assert!(matches!(report.now_or_never(), Some(Err(KafkaError::Canceled))));
    }

    #[test]
    fn a_dropped_report_frees_its_slot_only_when_its_report_comes() {
        let reports = reports();
        let mut sent = reports.reserve();
        sent.mark_sent();
        let slot = sent.ticket();
        drop(sent);
        assert_eq!(reports.in_use(), 1, "librdkafka still holds the record");
        reports.settle(slot, Ok(Ack { partition: 0, offset: 1 }));
        assert_eq!(reports.in_use(), 0);
        // A record never sent (the queue stayed full, the run ended) frees
        // its slot at once: no report will come.
        drop(reports.reserve());
        assert_eq!(reports.in_use(), 0);
    }

    #[tokio::test]
    async fn a_report_wakes_the_task_awaiting_it() {
        let reports = reports();
        let mut report = reports.reserve();
        report.mark_sent();
        let slot = report.ticket();
        let settler = Arc::clone(&reports);
        let waiter = tokio::spawn(report);
        tokio::task::yield_now().await;
        std::thread::spawn(move || settler.settle(slot, Ok(Ack { partition: 2, offset: 9 })));
        let outcome = waiter.await.expect("joined").expect("ok");
        assert_eq!(outcome, Ack { partition: 2, offset: 9 });
    }
}
