//! The miner's side of accounting: the jobs it tracks for their receipts, and the checks before
//! it countersigns a validator's receipt (see the role's docs).

use std::collections::HashMap;
use std::time::Duration;

use horde_protocol::messages::{InitialJobDetails, ReceiptReply};
use horde_protocol::{
    AccountingReceipt, AccountingRecord, ControlMessage, Countersignature, ExecutorClass, Hotkey,
    JobId, JobOutcome, ReceiptKind, Signed, verify_receipt,
};
use horde_transport::FramedSend;
use tracing::{info, warn};

use super::Miner;
use crate::clock::now;

/// How long after a job ends its receipts are still countersigned: the validator sends the last
/// one as the job ends, so ten minutes covers any slow link while bounding what is tracked.
pub const RECEIPT_WINDOW: Duration = Duration::from_secs(600);

/// Most jobs tracked for receipts at once (ended ones beyond [`RECEIPT_WINDOW`] are dropped
/// first). A tracked job is ~200 bytes, so this bounds the table near 3 MiB.
pub(super) const MAX_TRACKED_JOBS: usize = 16_384;

/// How long a `Started` receipt waits for its job's session, which travels on another stream
/// and may be read a moment later.
pub(super) const RECEIPT_JOB_WAIT: Duration = Duration::from_secs(3);

/// Tolerated difference between the validator's clock and ours for a receipt's `issued_at`.
pub(super) const RECEIPT_CLOCK_SKEW_MS: u64 = 60_000;

/// What the miner remembers of a job for its receipts.
#[derive(Debug)]
pub(super) struct TrackedJob {
    pub(super) validator: Hotkey,
    pub(super) class: ExecutorClass,
    pub(super) accepted: bool,
    /// How the miner reported the end: `Some(true)` for the executor's `Finished`,
    /// `Some(false)` for a failure; `None` while running.
    pub(super) completed: Option<bool>,
    pub(super) ended: Option<tokio::time::Instant>,
    /// Receipts countersigned so far: kind, digest of the validator-signed bytes, countersignature.
    pub(super) countersigned: Vec<(&'static str, [u8; 32], Countersignature)>,
}

/// Why the miner refuses to countersign a receipt; the text goes back to the validator in
/// `ReceiptReply::Refused`.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub(super) enum ReceiptRefusal {
    /// Not a valid receipt, or not between that validator and this miner.
    #[error(transparent)]
    Invalid(#[from] horde_protocol::ReceiptError),
    #[error("receipt issued in the future")]
    FromTheFuture,
    #[error("receipt too old")]
    TooOld,
    #[error("job {0} is unknown here")]
    UnknownJob(JobId),
    #[error("job {0} was sent here by another validator")]
    OtherValidator(JobId),
    #[error("the job ran as class {ran}, the receipt says {receipt}")]
    OtherClass {
        ran: ExecutorClass,
        receipt: ExecutorClass,
    },
    #[error("the job was not accepted here")]
    NotAccepted,
    #[error("the executor reported the job finished, the receipt says {0}")]
    OtherOutcome(JobOutcome),
    #[error("unknown receipt kind {0}")]
    UnknownKind(&'static str),
    #[error("a different {0} receipt for this job was already countersigned")]
    Conflicting(&'static str),
}

/// Whether `payload` (already verified as signed by `validator`, for this miner) is a receipt
/// the miner agrees with for `job`.
pub(super) fn check_receipt(
    job: &TrackedJob,
    validator: &Hotkey,
    payload: &AccountingReceipt,
) -> Result<(), ReceiptRefusal> {
    if job.validator != *validator {
        return Err(ReceiptRefusal::OtherValidator(payload.job_id));
    }
    if job.class != payload.executor_class {
        return Err(ReceiptRefusal::OtherClass {
            ran: job.class.clone(),
            receipt: payload.executor_class.clone(),
        });
    }
    match &payload.kind {
        ReceiptKind::Started => Ok(()),
        ReceiptKind::Accepted | ReceiptKind::Finished { .. } if !job.accepted => {
            Err(ReceiptRefusal::NotAccepted)
        }
        ReceiptKind::Accepted => Ok(()),
        ReceiptKind::Finished { outcome, .. } => {
            if job.completed == Some(true) && *outcome != JobOutcome::Completed {
                return Err(ReceiptRefusal::OtherOutcome(*outcome));
            }
            Ok(())
        }
        _ => Err(ReceiptRefusal::UnknownKind(payload.kind.name())),
    }
}

/// Marks a tracked job ended when its session is over, however it ends.
pub(super) struct JobTracking<'a> {
    miner: &'a Miner,
    job_id: JobId,
}

impl Drop for JobTracking<'_> {
    fn drop(&mut self) {
        self.miner.update_job(self.job_id, |job| {
            job.ended = Some(tokio::time::Instant::now());
        });
    }
}

impl Miner {
    pub(super) fn lock_jobs(&self) -> std::sync::MutexGuard<'_, HashMap<JobId, TrackedJob>> {
        self.jobs
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Starts tracking a job for its receipts (dropping jobs ended beyond the receipt window).
    pub(super) fn track_job(
        &self,
        details: &InitialJobDetails,
        validator: Hotkey,
    ) -> JobTracking<'_> {
        {
            let mut jobs = self.lock_jobs();
            let now = tokio::time::Instant::now();
            jobs.retain(|_, job| {
                job.ended
                    .is_none_or(|ended| now.duration_since(ended) < RECEIPT_WINDOW)
            });
            if jobs.len() >= MAX_TRACKED_JOBS {
                warn!("too many jobs tracked for receipts; this job's receipts will be refused");
            } else {
                jobs.entry(details.job_id).or_insert_with(|| TrackedJob {
                    validator,
                    class: details.executor_class.clone(),
                    accepted: false,
                    completed: None,
                    ended: None,
                    countersigned: Vec::new(),
                });
            }
        }
        self.jobs_changed.notify_waiters();
        JobTracking {
            miner: self,
            job_id: details.job_id,
        }
    }

    pub(super) fn update_job(&self, job_id: JobId, update: impl FnOnce(&mut TrackedJob)) {
        if let Some(job) = self.lock_jobs().get_mut(&job_id) {
            update(job);
        }
    }

    /// Waits (at most [`RECEIPT_JOB_WAIT`]) until `job_id` is tracked; whether it is.
    async fn wait_for_job(&self, job_id: JobId) -> bool {
        let deadline = tokio::time::Instant::now() + RECEIPT_JOB_WAIT;
        loop {
            let notified = self.jobs_changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.lock_jobs().contains_key(&job_id) {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return false;
            }
        }
    }

    /// Checks a validator's receipt, countersigns it and stores it (see the module docs).
    pub(super) async fn countersign(
        &self,
        validator: &Hotkey,
        receipt: &Signed<AccountingReceipt>,
    ) -> Result<Countersignature, ReceiptRefusal> {
        let payload = verify_receipt(receipt)?;
        payload.check_parties(payload.job_id, validator, &self.key.hotkey())?;
        let now = now();
        if payload.issued_at.0 > now.0.saturating_add(RECEIPT_CLOCK_SKEW_MS) {
            return Err(ReceiptRefusal::FromTheFuture);
        }
        let oldest = now.0.saturating_sub(
            (RECEIPT_WINDOW.as_millis() as u64).saturating_add(RECEIPT_CLOCK_SKEW_MS),
        );
        if payload.issued_at.0 < oldest {
            return Err(ReceiptRefusal::TooOld);
        }
        if !self.wait_for_job(payload.job_id).await {
            return Err(ReceiptRefusal::UnknownJob(payload.job_id));
        }
        let kind = payload.kind.name();
        let digest = receipt.digest();
        let countersignature = {
            let mut jobs = self.lock_jobs();
            let job = jobs
                .get_mut(&payload.job_id)
                .ok_or(ReceiptRefusal::UnknownJob(payload.job_id))?;
            check_receipt(job, validator, &payload)?;
            if let Some((_, seen, countersignature)) =
                job.countersigned.iter().find(|(seen, ..)| *seen == kind)
            {
                // The same receipt again (a retry): the same answer, stored once.
                return if *seen == digest {
                    Ok(*countersignature)
                } else {
                    Err(ReceiptRefusal::Conflicting(kind))
                };
            }
            let countersignature = Countersignature::sign(&self.key, receipt);
            job.countersigned.push((kind, digest, countersignature));
            countersignature
        };
        let record = AccountingRecord {
            receipt: receipt.clone(),
            countersignature: Some(countersignature),
        };
        if let Err(error) = self.receipts.append(record, None, now).await {
            warn!(kind, %error, "countersigned receipt not stored");
        }
        info!(kind, job = %payload.job_id.fmt_short(), "receipt countersigned");
        Ok(countersignature)
    }

    pub(super) async fn handle_receipt(
        &self,
        validator: Hotkey,
        mut send: FramedSend,
        receipt: Signed<AccountingReceipt>,
    ) {
        let reply = match self.countersign(&validator, &receipt).await {
            Ok(countersignature) => ReceiptReply::Countersigned(countersignature),
            Err(reason) => {
                info!(%validator, %reason, "receipt refused");
                ReceiptReply::Refused(reason.to_string())
            }
        };
        let _ = send.send(&ControlMessage::ReceiptReply(reply)).await;
        let _ = send.finish();
    }
}
