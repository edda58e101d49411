//! The validator's link to the facilitator for one job, which survives the facilitator.
//!
//! A facilitator restart (a crash, an upgrade, a graceful stop) breaks the job's stream to it,
//! but not the job: its tunnel and its miner do not go through the facilitator. So when the
//! stream breaks, the validator keeps driving the job and holds what it would have sent up (at
//! most [`AWAY_BUFFER`] messages), for at most [`FACILITATOR_AWAY_MAX`]. A facilitator that comes
//! back opens a new stream with `Resume(job_id)` ([`Resumes::offer`]): the held messages go up
//! it first, then the relay goes on as before. If none comes back in time, the link reports the
//! loss and the relay ends the job (its miner session aborted `CANCELLED`).
//!
//! A stream to a crashed facilitator accepts writes until the loss is noticed (a resume, or the
//! connection's idle timeout), so what was written to it is not known to have arrived: the link
//! keeps the messages written to its current stream and sends them again, first, on a resumed
//! one (the facilitator drops those it had recorded, `facilitator/resume.rs`). The job's last
//! message counts as delivered only once the facilitator acknowledged the finished stream; until
//! then (at most [`FACILITATOR_AWAY_MAX`]) the job stays open to a resume.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use horde_protocol::{ControlMessage, Hotkey, JobId, UpMessage};
use horde_transport::{ChannelError, JobSession};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::server::relay::Upstream;

/// How long a validator keeps driving a job whose facilitator is away, waiting for it to resume
/// the job: 60 s. A facilitator restarts in about a second and relearns its validators by
/// discovery within a record refresh (10 s by default); a minute also covers a slow restart.
pub const FACILITATOR_AWAY_MAX: Duration = Duration::from_secs(60);

/// Messages held for an away facilitator: 64, far more than one job's statuses (a job sends a
/// handful, plus one per volume list and upload); a job that sends more while its facilitator
/// is away is ended.
pub const AWAY_BUFFER: usize = 64;

/// Messages kept as written to the current stream but not known to have arrived: a job sends a
/// handful; beyond this the oldest (the likeliest to have arrived) are let go.
const UNCONFIRMED_MAX: usize = AWAY_BUFFER;

/// The jobs this validator drives that a facilitator may resume: job id → (the facilitator
/// that assigned it, where its new stream goes).
#[derive(Debug, Default)]
pub(super) struct Resumes {
    jobs: Mutex<HashMap<JobId, (Hotkey, mpsc::Sender<JobSession>)>>,
}

/// A resume that could not be handed over.
#[derive(Debug, thiserror::Error)]
pub(super) enum ResumeRefusal {
    #[error("this validator drives no such job")]
    UnknownJob,
    #[error("job assigned by another facilitator")]
    NotAssigner,
}

impl Resumes {
    /// Registers `job_id`, assigned by `facilitator` over `session`; the link ends the
    /// registration when it is dropped.
    pub(super) fn link(
        self: &Arc<Self>,
        job_id: JobId,
        facilitator: Hotkey,
        session: JobSession,
    ) -> FacilitatorLink {
        let (sender, resumed) = mpsc::channel(1);
        self.lock().insert(job_id, (facilitator, sender));
        FacilitatorLink {
            job_id,
            session: Some(session),
            held: VecDeque::new(),
            unconfirmed: VecDeque::new(),
            away_until: None,
            resumed,
            resumes: Arc::clone(self),
        }
    }

    /// Hands `session` (a new stream from `facilitator` that began with `Resume(job_id)`) to
    /// the job's link.
    pub(super) fn offer(
        &self,
        job_id: JobId,
        facilitator: &Hotkey,
        session: JobSession,
    ) -> Result<(), Box<(ResumeRefusal, JobSession)>> {
        let sender = match self.lock().get(&job_id) {
            Some((assigner, sender)) if assigner == facilitator => sender.clone(),
            Some(_) => return Err(Box::new((ResumeRefusal::NotAssigner, session))),
            None => return Err(Box::new((ResumeRefusal::UnknownJob, session))),
        };
        sender.try_send(session).map_err(|error| {
            let session = match error {
                mpsc::error::TrySendError::Full(session)
                | mpsc::error::TrySendError::Closed(session) => session,
            };
            Box::new((ResumeRefusal::UnknownJob, session))
        })
    }

    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<JobId, (Hotkey, mpsc::Sender<JobSession>)>> {
        self.jobs.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One job's link to its facilitator: the current stream, or the messages held while the
/// facilitator is away.
#[derive(Debug)]
pub(super) struct FacilitatorLink {
    job_id: JobId,
    session: Option<JobSession>,
    held: VecDeque<UpMessage>,
    /// Written to the current stream, in order; not known to have reached the facilitator.
    unconfirmed: VecDeque<UpMessage>,
    /// Set while the facilitator is away: when the link gives up.
    away_until: Option<Instant>,
    resumed: mpsc::Receiver<JobSession>,
    resumes: Arc<Resumes>,
}

impl Drop for FacilitatorLink {
    fn drop(&mut self) {
        self.resumes.lock().remove(&self.job_id);
    }
}

/// The facilitator stayed away longer than [`FACILITATOR_AWAY_MAX`], or more than
/// [`AWAY_BUFFER`] messages piled up meanwhile.
fn gone() -> ChannelError {
    ChannelError::Io(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        "facilitator away for too long",
    ))
}

impl FacilitatorLink {
    fn lose(&mut self, error: &dyn std::fmt::Display) {
        if self.session.take().is_some() {
            warn!(job = %self.job_id.fmt_short(), %error,
                "link to the facilitator lost; driving the job on and waiting for it to resume");
            self.away_until = Some(Instant::now() + FACILITATOR_AWAY_MAX);
            self.requeue_unconfirmed();
        }
    }

    /// What was written to a stream now gone goes up again, first, on the next one.
    fn requeue_unconfirmed(&mut self) {
        while let Some(message) = self.unconfirmed.pop_back() {
            self.held.push_front(message);
        }
    }

    fn written(&mut self, message: UpMessage) {
        if self.unconfirmed.len() == UNCONFIRMED_MAX {
            self.unconfirmed.pop_front();
        }
        self.unconfirmed.push_back(message);
    }

    /// Sends what is held up the current stream, in order; a failure loses the stream (and the
    /// held messages wait for the next resume). Cancel-safe between messages.
    async fn flush_held(&mut self) {
        while let Some(message) = self.held.front() {
            let Some(session) = &mut self.session else {
                return;
            };
            if let Err(error) = session.send_up(message).await {
                self.lose(&error);
                return;
            }
            if let Some(sent) = self.held.pop_front() {
                self.written(sent);
            }
        }
    }

    /// Waits (until the away deadline) for the facilitator to resume, and sends it what was
    /// held.
    async fn wait_for_resume(&mut self) -> Result<(), ChannelError> {
        let until = self.away_until.unwrap_or_else(Instant::now);
        let Ok(Some(session)) = tokio::time::timeout_at(until, self.resumed.recv()).await else {
            return Err(gone());
        };
        self.session = Some(session);
        self.away_until = None;
        let held = self.held.len();
        self.flush_held().await;
        if self.session.is_some() {
            info!(job = %self.job_id.fmt_short(), sent_again = held, "facilitator resumed the job");
        } else {
            warn!(job = %self.job_id.fmt_short(), "facilitator lost again while resuming");
        }
        Ok(())
    }

    /// Delivers `message` (the job's last) to the facilitator and finishes the stream, then
    /// waits (at most [`FACILITATOR_AWAY_MAX`]) until the facilitator acknowledged all of it;
    /// a facilitator that crashed meanwhile and resumes the job gets it all again.
    pub(super) async fn finish_with(&mut self, message: Option<UpMessage>) {
        if let Some(message) = message
            && let Err(error) = self.send(&message).await
        {
            warn!(%error, "could not report to the facilitator");
        }
        let give_up = Instant::now() + FACILITATOR_AWAY_MAX;
        loop {
            let Some(session) = &mut self.session else {
                if self.held.is_empty() {
                    return;
                }
                if let Err(error) = self.wait_for_resume().await {
                    warn!(%error, held = self.held.len(),
                        "the job's last statuses never reached the facilitator");
                    return;
                }
                continue;
            };
            if let Err(error) = session.finish() {
                self.lose(&error);
                continue;
            }
            let outcome = tokio::select! {
                delivered = session.delivered() => Ok(delivered),
                Some(resumed) = self.resumed.recv() => Err(resumed),
                () = tokio::time::sleep_until(give_up) => {
                    warn!(job = %self.job_id.fmt_short(),
                        "the facilitator never acknowledged the job's last statuses");
                    return;
                }
            };
            match outcome {
                Ok(Ok(())) => return,
                Ok(Err(error)) => self.lose(&error),
                Err(resumed) => self.take_over(resumed).await,
            }
        }
    }
}

impl FacilitatorLink {
    /// A facilitator that resumes the job while this link still has a stream to it: the old
    /// stream is dead even if nothing says so yet. A crashed facilitator is noticed only at the
    /// connection's idle timeout when it had dialed us (a QUIC client's handshake connection id
    /// carries no stateless-reset token), and until then the new stream would wait unread.
    /// What was written to the old stream, and what was held, goes up the new one first
    /// ([`Self::flush_held`]).
    async fn take_over(&mut self, session: JobSession) {
        if self.session.replace(session).is_some() {
            info!(job = %self.job_id.fmt_short(), sent_again = self.unconfirmed.len(),
                "facilitator resumed the job on a new stream; the old one is dropped");
        }
        self.away_until = None;
        self.requeue_unconfirmed();
        self.flush_held().await;
    }
}

impl Upstream for FacilitatorLink {
    async fn recv(&mut self) -> Result<Option<ControlMessage>, ChannelError> {
        loop {
            match &mut self.session {
                Some(session) => {
                    let received = tokio::select! {
                        received = session.recv() => Ok(received),
                        Some(resumed) = self.resumed.recv() => Err(resumed),
                    };
                    match received {
                        Ok(Ok(Some(message))) => return Ok(Some(message)),
                        // The facilitator never finishes its side while the job runs: it went
                        // away.
                        Ok(Ok(None)) => self.lose(&"stream finished"),
                        Ok(Err(error)) => self.lose(&error),
                        Err(resumed) => self.take_over(resumed).await,
                    }
                }
                None => self.wait_for_resume().await?,
            }
        }
    }

    async fn send(&mut self, message: &UpMessage) -> Result<(), ChannelError> {
        if self.session.is_some()
            && let Ok(resumed) = self.resumed.try_recv()
        {
            self.take_over(resumed).await;
        }
        if let Some(session) = &mut self.session {
            match session.send_up(message).await {
                Ok(()) => {
                    self.written(message.clone());
                    return Ok(());
                }
                Err(error) => self.lose(&error),
            }
        }
        if self.held.len() >= AWAY_BUFFER {
            return Err(gone());
        }
        self.held.push_back(message.clone());
        Ok(())
    }
}
