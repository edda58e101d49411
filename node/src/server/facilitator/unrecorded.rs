//! Statuses the job store could not take (its disk full, its database reopening): the job's
//! clients get each one when it comes all the same, numbered as the store will number it, and
//! the store records them in order once it can — at the job's next status, or, after the job's
//! last one, once a second for up to [`SETTLE_FOR`]. Before, a status the store refused was
//! dropped: a job accepted before the disk filled ran on, and its client heard nothing of it.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use horde_protocol::messages::StatusUpdate;
use horde_protocol::{JobId, JobStatus};
use tracing::{info, warn};

use super::store::JobStoreError;
use super::{Facilitator, LiveJob};
use crate::clock::now;

/// After a job's last status, how long the facilitator keeps trying to record what the store
/// refused (the store reopens a closed database at most once a second).
pub(super) const SETTLE_FOR: Duration = Duration::from_secs(600);

/// How often a job that has ended tries again.
const SETTLE_EVERY: Duration = Duration::from_secs(1);

/// A job's statuses not yet in the store, oldest first, and the number its next status gets.
#[derive(Debug)]
pub(super) struct Unrecorded {
    next_seq: u32,
    backlog: VecDeque<StatusUpdate>,
}

/// Shared between the job's driver and clients attaching to it.
pub(super) type SharedUnrecorded = Arc<Mutex<Unrecorded>>;

impl Unrecorded {
    /// For a job whose next status is number `next_seq` (1 for a new job: `Received` is 0).
    pub(super) fn shared(next_seq: u32) -> SharedUnrecorded {
        Arc::new(Mutex::new(Self {
            next_seq,
            backlog: VecDeque::new(),
        }))
    }
}

/// A store error that a later attempt may not have: the database's file or the database
/// itself failed (a full disk), not the job's own state.
fn may_pass(error: &JobStoreError) -> bool {
    matches!(error, JobStoreError::Io(_) | JobStoreError::Database(_))
}

impl LiveJob {
    fn unrecorded(&self) -> std::sync::MutexGuard<'_, Unrecorded> {
        self.unrecorded
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The oldest status not yet recorded.
    fn first_unrecorded(&self) -> Option<StatusUpdate> {
        self.unrecorded().backlog.front().cloned()
    }

    /// The statuses not yet recorded after `seq` (all of them for `None`), for a client that
    /// read the store's history up to `seq`.
    pub(super) fn unrecorded_after(&self, seq: Option<u32>) -> Vec<StatusUpdate> {
        self.unrecorded()
            .backlog
            .iter()
            .filter(|update| seq.is_none_or(|seq| update.seq > seq))
            .cloned()
            .collect()
    }
}

impl Facilitator {
    /// Records `status` and sends it to the job's attached clients; whether it ends the job.
    /// When the store refuses it for its disk or database, the clients get it all the same and
    /// it waits, in order, to be recorded (module docs).
    pub(super) async fn record(&self, job_id: JobId, live: &LiveJob, status: JobStatus) -> bool {
        let terminal = status.is_terminal();
        let at = now();
        if self.record_waiting(job_id, live).await {
            match self.store.append_status(job_id, status.clone(), at).await {
                Ok(update) => {
                    live.unrecorded().next_seq = update.seq + 1;
                    // No receiver (no client attached) is fine: the store has it.
                    let _ = live.statuses.send(update);
                    return terminal;
                }
                Err(error) if may_pass(&error) => {
                    warn!(%error, "could not store status; sent to the job's clients, stored once the store can");
                }
                Err(error) => {
                    warn!(%error, "could not store status");
                    return terminal;
                }
            }
        }
        let update = {
            let mut unrecorded = live.unrecorded();
            let update = StatusUpdate {
                job_id,
                seq: unrecorded.next_seq,
                at,
                status,
            };
            unrecorded.next_seq += 1;
            unrecorded.backlog.push_back(update.clone());
            update
        };
        let _ = live.statuses.send(update);
        terminal
    }

    /// Records the statuses waiting, oldest first; whether none is left.
    async fn record_waiting(&self, job_id: JobId, live: &LiveJob) -> bool {
        while let Some(first) = live.first_unrecorded() {
            match self
                .store
                .append_status(job_id, first.status.clone(), first.at)
                .await
            {
                Ok(stored) => {
                    if stored.seq != first.seq {
                        warn!(
                            sent = first.seq,
                            stored = stored.seq,
                            "a status was stored under another number than its clients got"
                        );
                    }
                    live.unrecorded().backlog.pop_front();
                    info!(seq = stored.seq, "status stored after the store failed");
                }
                Err(error) if may_pass(&error) => return false,
                Err(error) => {
                    warn!(%error, "a status waiting for the store cannot be stored; dropped");
                    live.unrecorded().backlog.pop_front();
                }
            }
        }
        true
    }

    /// After the job's last status: tries to record what waits, once a second for up to
    /// [`SETTLE_FOR`] or until the facilitator stops.
    pub(super) async fn settle(&self, job_id: JobId, live: &LiveJob) {
        let until = tokio::time::Instant::now() + SETTLE_FOR;
        while !self.record_waiting(job_id, live).await {
            if tokio::time::Instant::now() >= until {
                warn!(
                    waiting = live.unrecorded().backlog.len(),
                    "statuses the store never took are lost"
                );
                return;
            }
            tokio::select! {
                () = self.cancel.cancelled() => return,
                () = tokio::time::sleep(SETTLE_EVERY) => {}
            }
        }
    }
}
