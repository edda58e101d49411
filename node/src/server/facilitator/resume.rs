//! Jobs that outlive their facilitator: a restarted facilitator takes up, from its job store,
//! every job a previous run left running with a validator assigned.
//!
//! For each, it finds the validator again (configured, or discovered within [`RESUME_WAIT`]),
//! opens a new job stream to it with `Resume(job_id)`, and drives the job from there as before:
//! the validator sends the statuses it held while the facilitator was away, clients attach again
//! and get the history then live statuses, and their volume lists and terminate requests go down
//! the new stream. The validator keeps a job whose facilitator is away for
//! `validator::FACILITATOR_AWAY_MAX` (60 s); a facilitator that is down longer finds the job
//! ended, and records it `HordeFailed`. A job the previous run had not yet given a validator is
//! failed explicitly (`HordeFailed`, "restarted before the job was assigned").

use std::sync::Arc;
use std::time::Duration;

use horde_protocol::messages::RejectReason;
use horde_protocol::{DownMessage, Hotkey, JobId, JobSpec, JobStatus};
use horde_transport::{ALPN_CONTROL, open_session};
use tokio::sync::{broadcast, mpsc};
use tracing::{Instrument as _, info, info_span, warn};

use super::store::{JobRecord, JobStore, JobStoreError};
use super::{DOWN_QUEUE, Facilitator, LIVE_STATUS_BUFFER, LiveJob};
use crate::clock::now;
use crate::server::discovery::wait_for_records;

/// How long a restarted facilitator tries to reach a job's validator again: 55 s. With its kept
/// directory it dials known nodes at once and relearns the validator within a second or two; a
/// facilitator restarted without one (its state lost, or killed before its first write) dials
/// no one and waits for its peers to redial it, which after a crash they do only when their old
/// connection to it reaches discovery's idle timeout (45 s) plus the redial back-off (after a
/// graceful stop at once: the stopping node closed its connections). Within the validator's
/// `FACILITATOR_AWAY_MAX` (60 s).
pub(super) const RESUME_WAIT: Duration = Duration::from_secs(55);

/// A job the previous run left running with a validator.
#[derive(Debug)]
pub(super) struct Resumable {
    job_id: JobId,
    record: JobRecord,
    validator: Hotkey,
    miner: Hotkey,
    /// The statuses the previous run recorded: the validator sends again what it wrote to the
    /// old stream (it cannot know what arrived), and those already recorded are dropped.
    recorded: Vec<JobStatus>,
}

/// Sorts the jobs a previous run left unfinished: those with a validator assigned are returned
/// to be resumed, the others are failed explicitly.
pub(super) async fn recover(
    store: &JobStore,
    hop: &crate::server::relay::Hop,
) -> Result<Vec<Resumable>, JobStoreError> {
    let mut resumable = Vec::new();
    for job_id in store.unfinished().await? {
        let recorded: Vec<JobStatus> = store
            .history(job_id)
            .await?
            .into_iter()
            .map(|update| update.status)
            .collect();
        let assigned = recorded.iter().rev().find_map(|status| match status {
            JobStatus::Assigned { validator, miner } => Some((*validator, *miner)),
            _ => None,
        });
        match (assigned, store.job(job_id).await?) {
            (Some((validator, miner)), Some(record)) => resumable.push(Resumable {
                job_id,
                record,
                validator,
                miner,
                recorded,
            }),
            _ => {
                let failure = hop.failed(
                    "facilitator restarted before the job was assigned a validator; it never ran",
                );
                store
                    .append_status(job_id, JobStatus::HordeFailed(failure), now())
                    .await?;
                warn!(job = %job_id.fmt_short(), "failed job left unassigned by a previous run");
            }
        }
    }
    Ok(resumable)
}

impl Facilitator {
    /// Starts driving `job` again (see the module docs).
    pub(super) fn resume(self: &Arc<Self>, job: Resumable) {
        let Ok(spec) = job.record.spec.verify() else {
            warn!(job = %job.job_id.fmt_short(), "stored spec no longer verifies; not resumed");
            return;
        };
        let (statuses, _) = broadcast::channel(LIVE_STATUS_BUFFER);
        let (down, down_rx) = mpsc::channel(DOWN_QUEUE);
        let live = LiveJob {
            statuses,
            down,
            owner: job.record.owner,
            unrecorded: super::unrecorded::Unrecorded::shared(job.record.next_seq),
        };
        self.lock_live().insert(job.job_id, live.clone());
        info!(job = %job.job_id.fmt_short(), validator = %job.validator, "resuming a job left running by a previous run");
        let span = info_span!("job", job = %job.job_id.fmt_short());
        let driver = Arc::clone(self);
        let driving = async move {
            driver.drive_resumed(job, spec, live, down_rx).await;
        };
        let _ = self.lock_jobs().spawn(driving.instrument(span));
    }

    async fn drive_resumed(
        self: Arc<Self>,
        job: Resumable,
        spec: JobSpec,
        live: LiveJob,
        mut down_rx: mpsc::Receiver<DownMessage>,
    ) {
        let job_id = job.job_id;
        let driving = async {
            let Some(session) = self.reopen(&job).await else {
                return Some(JobStatus::HordeFailed(self.hop().failed(format!(
                    "facilitator restarted and could not reach validator {} again within {RESUME_WAIT:?}",
                    job.validator
                ))));
            };
            let leg = super::ValidatorLeg {
                validator: job.validator,
                miner: job.miner,
                session,
                recorded: job.recorded.clone(),
            };
            let status = self
                .relay_to_validator(job_id, &spec, &live, &mut down_rx, leg)
                .await;
            match status {
                Some(JobStatus::Rejected(RejectReason::UnknownJob)) => {
                    Some(JobStatus::HordeFailed(self.hop().failed(format!(
                        "validator {} no longer holds the job (it restarted since, or the job \
                         ended while the facilitator was away and the validator stopped waiting \
                         for it); its outcome is not known",
                        job.validator
                    ))))
                }
                other => other,
            }
        };
        let final_status = tokio::select! {
            biased;
            () = self.cancel.cancelled() => None,
            status = driving => status,
        };
        if let Some(status) = final_status {
            self.record(job_id, &live, status).await;
        }
        self.settle(job_id, &live).await;
        self.lock_live().remove(&job_id);
        info!("job session over");
    }

    /// A new job stream to the job's validator, opened with `Resume`, within [`RESUME_WAIT`].
    async fn reopen(&self, job: &Resumable) -> Option<horde_transport::JobSession> {
        let until = tokio::time::Instant::now() + RESUME_WAIT;
        loop {
            let left = until.saturating_duration_since(tokio::time::Instant::now());
            let validator = wait_for_records(self.validators.changes(), left, || {
                self.validators.find(&job.validator)
            })
            .await?;
            let attempt = async {
                let connection = self.peers.connect(&validator, ALPN_CONTROL).await?;
                Ok::<_, super::ValidatorLinkError>(
                    open_session(&connection, job.job_id, &DownMessage::Resume(job.job_id)).await?,
                )
            };
            match attempt.await {
                Ok(session) => return Some(session),
                Err(error) => {
                    warn!(validator = %job.validator, %error, "validator not reachable yet")
                }
            }
            if tokio::time::Instant::now() >= until {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}
