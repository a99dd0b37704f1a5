//! Leadership among the sidecars of one outbox: a lease with a bounded term.
//!
//! Every replica of a service may run a relay; exactly one may publish. The
//! relays of a group (one outbox table and `source.slot_name`) share one
//! lease row ([`LeaseStore`]), whose times come from the Postgres server's
//! clock:
//!
//! - A standby takes the lease only once it ran out or was released, with
//!   the next epoch ([`LeaseStore::try_acquire`]). It looks every
//!   `leader.renew_interval_ms`, right when the lease it saw runs out, and
//!   at once when the holder notifies a release (graceful stop).
//! - The active relay renews it every `leader.renew_interval_ms`. A renewal
//!   sent at local time t proves leadership until t +
//!   `leader.lease_timeout_ms`: the server received it after t and set
//!   `lease_until` from that moment, so the proof runs out locally no later
//!   than the lease does on the server. Without a proof the relay
//!   self-fences ([`Term::lost`]): its pipeline run is dropped at once, which
//!   stops producing and drops its producer (librdkafka purges what is
//!   queued), and it records nothing more.
//! - Independently of any clock, every publish-state write checks the
//!   epoch in the same transaction ([`crate::store::PreparedFence::begin`]):
//!   a relay that lost its lease records nothing, even when it wakes up
//!   from a pause in the middle of a batch, and ends its run.
//!
//! What a paused-then-resumed relay can still send to Kafka before it
//! notices is what it had handed to the producer before the pause (its
//! in-flight window, at most `checkpoint.max_in_flight` rows, one poll batch
//! in poll mode): the check of the proof comes before the stages are polled
//! again, so nothing new is produced. Consumers dedupe on `event_id`.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::{Instant, Sleep};
use tokio_postgres::Client;

use crate::config::{Config, LeaderConfig, PostgresConfig};
use crate::database::{self, DatabaseError};
use crate::error_class::ErrorClass;
use crate::store::{Acquired, Fence, LeaseStore, Store, StoreError};
use crate::telemetry::{metrics, ErrorChain, Health};

/// Appended to the `application_name` of the session that reads, takes and
/// renews the lease (`outbox-relay-lease` by default).
pub const LEASE_SESSION: &str = "lease";

/// How long after a lease runs out (by the server's reckoning) a standby
/// asks again: the time its question takes to arrive.
const RUN_OUT_MARGIN: Duration = Duration::from_millis(5);

/// Why the lease could not be read or taken.
#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    #[error(transparent)]
    Database(#[from] DatabaseError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the connection that waits for a released lease closed")]
    ListenerClosed,
}

impl LeaderError {
    /// By the Postgres error; a closed listener is reopened by a retry.
    pub fn class(&self) -> ErrorClass {
        match self {
            Self::Database(e) => e.class(),
            Self::Store(e) => e.class(),
            Self::ListenerClosed => ErrorClass::Retry,
        }
    }
}

/// Why a term ended without a release.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lost {
    /// Another relay holds the lease now (a renewal or a write was refused).
    TakenOver,
    /// No renewal succeeded within `leader.lease_timeout_ms`.
    NotRenewed,
}

impl Lost {
    /// The `reason` label of `outbox_relay_leader_lost_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::TakenOver => "taken_over",
            Self::NotRenewed => "not_renewed",
        }
    }
}

/// This relay as a candidate for the lease of its group.
pub struct Candidate {
    id: String,
    lease: LeaseStore,
    leader: LeaderConfig,
    postgres: PostgresConfig,
}

impl Candidate {
    pub fn new(config: &Config) -> Self {
        Self {
            id: instance_id(),
            lease: Store::new(config).lease(),
            leader: config.leader.clone(),
            postgres: config.postgres.clone(),
        }
    }

    /// This relay's instance id (`host:pid:random`), as the lease names its holder.
    pub fn id(&self) -> &str {
        &self.id
    }

    fn lease_ms(&self) -> i64 {
        i64::try_from(self.leader.lease_timeout_ms).unwrap_or(i64::MAX)
    }

    /// Stands by until this relay holds the lease (`Some`), or `stop`
    /// (`None`). An error (Postgres unreachable, the lease table missing) is
    /// for the caller to retry with backoff.
    pub async fn campaign(
        &self,
        stop: &mut watch::Receiver<bool>,
        health: &Health,
    ) -> Result<Option<Term>, LeaderError> {
        let (client, mut released) =
            database::listen(&self.postgres, Some(LEASE_SESSION), self.lease.channel()).await?;
        let interval = Duration::from_millis(self.leader.renew_interval_ms);
        let mut announced = false;
        loop {
            let round = async {
                if let Some(held) = self.lease.held_by_other(&client, &self.id).await? {
                    return Ok::<_, LeaderError>(Err(held));
                }
                let sent = Instant::now();
                Ok(Ok(self.lease.try_acquire(&client, &self.id, self.lease_ms()).await?.map(|a| (a, sent))))
            };
            let outcome = tokio::select! {
                outcome = round => outcome?,
                _ = stop.wait_for(|s| *s) => return Ok(None),
            };
            // Look again after a round, or when the lease runs out if sooner
            // (a dead leader's lease is taken as soon as it can be).
            let mut wait = interval;
            match outcome {
                Ok(Some((acquired, sent))) => return Ok(Some(self.begin_term(acquired, sent, client, health))),
                Ok(None) => {}
                Err(held) => {
                    if !announced {
                        tracing::info!(holder = %held.holder, epoch = held.epoch, "another relay holds the lease; standing by");
                        announced = true;
                    }
                    let runs_out = Duration::try_from_secs_f64(held.remaining_seconds).unwrap_or_default();
                    wait = wait.min(runs_out + RUN_OUT_MARGIN);
                }
            }
            health.set_active(false);
            health.set_ready(true);
            tokio::select! {
                _ = stop.wait_for(|s| *s) => return Ok(None),
                woken = released.recv() => {
                    if woken.is_none() {
                        return Err(LeaderError::ListenerClosed);
                    }
                }
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Starts renewing a lease acquired by a statement sent at `sent`.
    fn begin_term(&self, acquired: Acquired, sent: Instant, client: Client, health: &Health) -> Term {
        let lease = Duration::from_millis(self.leader.lease_timeout_ms);
        let (proof_tx, proof) = watch::channel(Proof { until: sent + lease, taken_over: false });
        let (stop_tx, stop_rx) = watch::channel(false);
        let renewer = Renewer {
            lease: self.lease.clone(),
            postgres: self.postgres.clone(),
            holder: self.id.clone(),
            epoch: acquired.epoch,
            interval: Duration::from_millis(self.leader.renew_interval_ms),
            lease_timeout: lease,
        };
        let handle = tokio::spawn(renewer.run(Some(client), proof_tx, stop_rx));
        metrics::leader_takeover(acquired.previous.as_str());
        health.set_epoch(Some(acquired.epoch));
        tracing::info!(
            epoch = acquired.epoch,
            previous = acquired.previous.as_str(),
            "this relay holds the lease: active"
        );
        Term {
            epoch: acquired.epoch,
            holder: self.id.clone(),
            lease: self.lease.clone(),
            lease_ms: self.lease_ms(),
            postgres: self.postgres.clone(),
            release_timeout: Duration::from_millis(self.leader.renew_interval_ms.max(1_000)),
            proof,
            stop_renewing: stop_tx,
            renewer: Some(handle),
        }
    }
}

/// How long this relay may act as the leader without another renewal.
#[derive(Debug, Clone, Copy)]
struct Proof {
    /// Local monotonic time at which the last renewal's lease runs out.
    until: Instant,
    /// A renewal found the lease held by another relay.
    taken_over: bool,
}

/// One term of leadership this relay holds: renewed in the background
/// until it is released, lost, or dropped.
pub struct Term {
    epoch: i64,
    holder: String,
    lease: LeaseStore,
    lease_ms: i64,
    postgres: PostgresConfig,
    release_timeout: Duration,
    proof: watch::Receiver<Proof>,
    stop_renewing: watch::Sender<bool>,
    renewer: Option<JoinHandle<Option<Client>>>,
}

impl Term {
    pub fn epoch(&self) -> i64 {
        self.epoch
    }

    /// The fence of this term's publish-state writes.
    pub fn fence(&self) -> Fence {
        self.lease.fence(&self.holder, self.epoch, self.lease_ms)
    }

    /// Resolves when this relay can no longer prove it holds the lease:
    /// another relay took over, or no renewal succeeded for
    /// `leader.lease_timeout_ms`. The caller must stop producing at once.
    ///
    /// Safety: the proof runs out locally no later than the lease on the
    /// server (see the module doc), and a standby takes over only after
    /// that, by the server's clock; so a relay that is running (not paused)
    /// has stopped producing before another one starts. The clock is read
    /// on every poll, so a relay that wakes from a pause longer than its
    /// lease resolves this at its first poll, before the stages it guards
    /// (polled after it, `biased`) produce anything more. What it had
    /// handed to the producer before the pause may still go out: the
    /// in-flight window. Test: `tests/it/slow/leadership.rs`,
    /// `a_paused_active_relay_records_nothing_after_a_standby_took_over`
    /// (duplicates stay within one in-flight window).
    pub async fn lost(&self) -> Lost {
        let mut proof = self.proof.clone();
        loop {
            let current = *proof.borrow_and_update();
            if current.taken_over {
                return Lost::TakenOver;
            }
            tokio::select! {
                biased;
                _ = Deadline::new(current.until) => return Lost::NotRenewed,
                changed = proof.changed() => {
                    if changed.is_err() && !proof.borrow().taken_over {
                        // The renewer gave up: its proof ran out.
                        Deadline::new(current.until).await;
                        return Lost::NotRenewed;
                    }
                }
            }
        }
    }

    /// Stops renewing and hands back the lease session, if still usable.
    async fn stop_renewing(&mut self) -> Option<Client> {
        let _ = self.stop_renewing.send(true);
        match self.renewer.take() {
            Some(handle) => handle.await.ok().flatten(),
            None => None,
        }
    }

    /// Ends the term and, unless another relay took over, releases the
    /// lease at once (`lease_until = now()`, NOTIFY), so a standby takes
    /// over without waiting for it to run out. Call it only when nothing
    /// more of this term will be written: after a graceful stop recorded
    /// and confirmed everything, or after a step-down dropped the run.
    /// Returns whether the lease was released.
    pub async fn release(mut self) -> bool {
        let client = self.stop_renewing().await;
        if self.proof.borrow().taken_over {
            return false;
        }
        let attempt = async {
            let client = match client {
                Some(client) if !client.is_closed() => client,
                _ => database::connect_as(&self.postgres, Some(LEASE_SESSION)).await.map_err(LeaderError::from)?,
            };
            Ok::<_, LeaderError>(self.lease.release(&client, &self.holder, self.epoch).await?)
        };
        match tokio::time::timeout(self.release_timeout, attempt).await {
            Ok(Ok(released)) => released,
            Ok(Err(err)) => {
                tracing::debug!(error = %ErrorChain(&err), "cannot release the lease; it runs out by itself");
                false
            }
            Err(_) => false,
        }
    }
}

impl Drop for Term {
    fn drop(&mut self) {
        if let Some(handle) = self.renewer.take() {
            handle.abort();
        }
    }
}

/// Renews one term's lease in the background.
struct Renewer {
    lease: LeaseStore,
    postgres: PostgresConfig,
    holder: String,
    epoch: i64,
    interval: Duration,
    lease_timeout: Duration,
}

impl Renewer {
    /// Renews every `interval` until `stop`, the proof runs out, or a
    /// renewal finds another holder. A failed renewal (session ended,
    /// Postgres unreachable) is tried again soon on a new session, for as
    /// long as the proof lasts. Returns the lease session.
    async fn run(
        self,
        mut client: Option<Client>,
        proof: watch::Sender<Proof>,
        mut stop: watch::Receiver<bool>,
    ) -> Option<Client> {
        let retry = (self.interval / 4).max(Duration::from_millis(10));
        let mut next = Instant::now() + self.interval;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(next) => {}
                _ = stop.wait_for(|s| *s) => return client,
            }
            let until = proof.borrow().until;
            let sent = Instant::now();
            if sent >= until {
                tracing::warn!(epoch = self.epoch, "no lease renewal succeeded in leader.lease_timeout_ms");
                return None;
            }
            match tokio::time::timeout_at(until, self.renew(&mut client)).await {
                Ok(Ok(true)) => {
                    proof.send_replace(Proof { until: sent + self.lease_timeout, taken_over: false });
                    next = sent + self.interval;
                }
                Ok(Ok(false)) => {
                    tracing::warn!(epoch = self.epoch, "another relay took the lease over");
                    proof.send_replace(Proof { until, taken_over: true });
                    return client;
                }
                Ok(Err(err)) => {
                    tracing::warn!(error = %ErrorChain(&err), epoch = self.epoch, "lease renewal failed; retrying on a new session");
                    client = None;
                    next = Instant::now() + retry;
                }
                Err(_) => {
                    tracing::warn!(epoch = self.epoch, "no lease renewal succeeded in leader.lease_timeout_ms");
                    return None;
                }
            }
        }
    }

    async fn renew(&self, client: &mut Option<Client>) -> Result<bool, LeaderError> {
        let session = match client.take() {
            Some(session) if !session.is_closed() => session,
            _ => database::connect_as(&self.postgres, Some(LEASE_SESSION)).await?,
        };
        let lease_ms = i64::try_from(self.lease_timeout.as_millis()).unwrap_or(i64::MAX);
        let renewed = self.lease.renew(&session, &self.holder, self.epoch, lease_ms).await?;
        *client = Some(session);
        Ok(renewed)
    }
}

/// Resolves once the monotonic clock reaches `until`. It reads the clock on
/// every poll, not only when its timer fires, so after a pause (SIGSTOP, a
/// frozen VM) the first poll already sees that the time is up.
struct Deadline {
    until: Instant,
    timer: Pin<Box<Sleep>>,
}

impl Deadline {
    fn new(until: Instant) -> Self {
        Self { until, timer: Box::pin(tokio::time::sleep_until(until)) }
    }
}

impl Future for Deadline {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if Instant::now() >= self.until {
            return Poll::Ready(());
        }
        self.timer.as_mut().poll(cx)
    }
}

/// `host:pid:random`: unique per process, and names the pod (HOSTNAME) in
/// Kubernetes, so `relay status` says which replica is active.
fn instance_id() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.trim().is_empty())
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok().map(|h| h.trim().to_string()))
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown".into());
    let nonce = uuid::Uuid::new_v4().simple().to_string();
    format!("{host}:{}:{}", std::process::id(), &nonce[..6])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_ids_differ_per_candidate() {
        let (a, b) = (instance_id(), instance_id());
        assert_ne!(a, b);
        assert_eq!(a.split(':').count(), 3, "{a}");
    }
}
