//! Wires source -> sink -> checkpoint, runs it while this relay holds the
//! leader lease ([`crate::leader`]), and restarts the pipeline from its last
//! confirmed commit boundary after any failure that a retry can cure. A
//! failure that only an operator can cure (role lacks a privilege, table
//! missing, authentication or TLS misconfigured, publication covers the
//! wrong table) stops the relay with a one-line message naming the fix, so
//! a sidecar shows the reason in CrashLoopBackOff instead of retrying in
//! silence.
//!
//! Here the leadership loop ([`run`], `lead`); in `run.rs` one run of the
//! stages (prepare, wire, watch, end); in `error.rs` [`PipelineError`],
//! what each failure means and the pacing of restarts.

mod error;
mod run;

use std::time::Duration;

use tokio::sync::watch;

use crate::codec::Codec;
use crate::config::Config;
use crate::error_class::ErrorClass;
use crate::leader::{Candidate, Lost, Term};
use crate::telemetry::{metrics, ErrorChain, Health};
pub use error::PipelineError;
use error::{backoff, pause, stop_for_operator, Backoff};
use run::{run_with_codec, RunEnd};

/// Runs the relay until `stop` turns true: stands by until this relay holds
/// the leader lease, then runs the pipeline while it does, restarting with
/// backoff after failures a retry can cure. Returns an error only for a
/// failure an operator must fix.
pub async fn run(config: Config, mut stop: watch::Receiver<bool>, health: Health) -> Result<(), PipelineError> {
    let mut delays = backoff();
    // Resolved once, then kept across restarts: a registry outage after
    // start-up cannot stop publishing.
    let mut codec: Option<Codec> = None;
    let candidate = Candidate::new(&config);
    health.set_instance(candidate.id());
    tracing::info!(instance = candidate.id(), "relay instance");
    while !*stop.borrow() {
        let term = match candidate.campaign(&mut stop, &health).await {
            Ok(Some(term)) => term,
            Ok(None) => return Ok(()),
            Err(err) => {
                let err = stop_for_operator(err.into())?;
                tracing::warn!(error = %ErrorChain(&err), "cannot read or take the leader lease; retrying");
                health.set_ready(false);
                metrics::restart("postgres");
                if pause(delays.next().unwrap_or(Duration::from_secs(10)), &mut stop).await {
                    return Ok(());
                }
                continue;
            }
        };
        health.set_active(true);
        let end = lead(&config, &term, &mut codec, &mut delays, &mut stop, &health).await;
        health.set_active(false);
        health.set_epoch(None);
        let epoch = term.epoch();
        match end {
            Ok(LeadEnd::Stopped) => {
                let released = term.release().await;
                tracing::info!(epoch, released, "stopped; leader lease released for a standby to take over");
                return Ok(());
            }
            Ok(LeadEnd::Lost(lost)) => {
                metrics::leader_lost(lost.as_str());
                tracing::warn!(epoch, reason = lost.as_str(), "lost the leader lease: stopped producing and dropped the producer; nothing more is recorded in this term; standing by");
                term.release().await;
            }
            Err(err) => {
                term.release().await;
                return Err(err);
            }
        }
    }
    Ok(())
}

/// How leading ended.
enum LeadEnd {
    /// `stop` turned true; everything is recorded and confirmed.
    Stopped,
    /// The term is over; the run was dropped.
    Lost(Lost),
}

/// Runs the pipeline while `term` lasts.
///
/// Safety: `term.lost()` is polled first (`biased`) on every poll, and
/// resolving it drops the run: the source stops reading, the sink's
/// producer is dropped (librdkafka purges its queue) and the checkpoint
/// stage records nothing more. See [`Term::lost`] for why the
/// relay stops producing before a standby can take over, and
/// [`crate::store::PreparedFence::begin`] for why nothing of an ended term
/// is recorded even when it is not noticed here (a pause): a refused write
/// ([`ErrorClass::StepDown`]) ends leading the same way, never a retry.
async fn lead(
    config: &Config,
    term: &Term,
    codec: &mut Option<Codec>,
    delays: &mut Backoff,
    stop: &mut watch::Receiver<bool>,
    health: &Health,
) -> Result<LeadEnd, PipelineError> {
    loop {
        let started = std::time::Instant::now();
        let result = tokio::select! {
            biased;
            lost = term.lost() => return Ok(LeadEnd::Lost(lost)),
            result = run_with_codec(config, codec, term.fence(), stop.clone(), health) => result,
        };
        match result {
            Ok(RunEnd::Stopped) => return Ok(LeadEnd::Stopped),
            // Not a failure: the run ended to recover the slot or to
            // publish released held rows; the next one starts at once.
            Ok(RunEnd::Restart) if *stop.borrow() => return Ok(LeadEnd::Stopped),
            Ok(RunEnd::Restart) => {}
            Err(err) if err.class() == ErrorClass::StepDown => {
                tracing::warn!(error = %ErrorChain(&err), "a publish-state write was refused");
                return Ok(LeadEnd::Lost(Lost::TakenOver));
            }
            Err(err) => {
                health.set_ready(false);
                let err = stop_for_operator(err)?;
                // A run that went well for a while starts the backoff afresh.
                if started.elapsed() > Duration::from_secs(60) {
                    *delays = backoff();
                }
                metrics::restart(err.component());
                metrics::in_flight_reset();
                let delay = delays.next().unwrap_or(Duration::from_secs(10));
                tracing::error!(error = %ErrorChain(&err), component = err.component(), retry_in_ms = delay.as_millis() as u64, "pipeline stopped; restarting from the last confirmed commit boundary");
                tokio::select! {
                    biased;
                    lost = term.lost() => return Ok(LeadEnd::Lost(lost)),
                    stopped = pause(delay, stop) => {
                        if stopped {
                            return Ok(LeadEnd::Stopped);
                        }
                    }
                }
            }
        }
    }
}
