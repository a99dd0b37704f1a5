//! Exactly-once mode's recovery, before a run reads anything: rows that a
//! committed transaction carried but whose publish state a crash kept from
//! being recorded. The progress records are read back newest first
//! (after `init_transactions`, so no open transaction of an earlier
//! producer can still commit) until a record whose rows are all recorded:
//! the checkpoint stage records in commit order, so every older one is
//! recorded too. The unrecorded ones are then recorded oldest first, with
//! the partition and offset each names, so a recovery cut short (a kill
//! -9 during it) keeps that order too: were a newer record recorded before
//! an older one, the next start would stop at the newer one and send the
//! older one's rows again.
//!
//! The records come from a [`ProgressSource`] the pipeline hands over (the
//! sink reads its own progress topic): the checkpoint opens no Kafka client.

use tokio_postgres::Client;

use super::CheckpointError;
use crate::config::Config;
use crate::delivery::ProgressSource;
use crate::store::{PublishStateStore, Published, Store};

/// Records what committed transactions carried (as `progress` reads them
/// back, newest first) and Postgres does not show as published; returns
/// how many rows it recorded.
pub async fn recover<S: PublishStateStore, P: ProgressSource>(
    config: &Config,
    state: &S,
    client: &Client,
    progress: &mut P,
) -> Result<usize, CheckpointError> {
    let store = Store::new(config);
    // Newest first, each with its rows not recorded yet.
    let mut unrecorded_records: Vec<Vec<Published>> = Vec::new();
    'read: while let Some(window) = progress.older().await.map_err(CheckpointError::progress)? {
        for record in window {
            let ids: Vec<i64> = record.rows.iter().map(|r| r.id).collect();
            let unrecorded = store.unpublished_among(client, &ids).await?;
            if unrecorded.is_empty() {
                break 'read;
            }
            unrecorded_records.push(
                record
                    .rows
                    .iter()
                    .filter(|r| unrecorded.contains(&r.id))
                    .map(|r| Published {
                        id: r.id,
                        topic: r.topic.as_str().into(),
                        partition: r.partition,
                        offset: r.offset,
                        xid: None,
                    })
                    .collect(),
            );
        }
    }
    let mut recorded = 0;
    for rows in unrecorded_records.iter().rev() {
        let refs: Vec<&Published> = rows.iter().collect();
        recorded += state.record_published(&refs).await?.len();
    }
    Ok(done(recorded))
}

fn done(recorded: usize) -> usize {
    if recorded > 0 {
        tracing::info!(rows = recorded, "recorded rows that committed Kafka transactions carried before a crash");
    }
    recorded
}
