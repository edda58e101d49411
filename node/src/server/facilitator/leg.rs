//! The validator leg of a job on the facilitator: the hand-over (`Assign`, the validator's
//! `AssignmentReceived`, `Proceed` once `Assigned` is recorded) and the relay between the job's
//! clients and its validator until the job ends.
//!
//! Why the hand-over has two steps: a validator killed with `kill -9` leaves this side's QUIC
//! connection to it looking open until the idle timeout. An `Assign` sent on it goes nowhere, and
//! with a single message the job was recorded `Assigned` and then lost (`HordeFailed`, link
//! lost, measured from outside: one job in twelve on a 34-node network). With the answer and
//! `Proceed`, a job the validator did not answer for within [`ASSIGN_ANSWER_TIMEOUT`] goes to the
//! next validator; the validator acts only on `Proceed`, so the job runs at most once.

use std::time::Duration;

use horde_protocol::messages::{Assignment, RejectReason};
use horde_protocol::{
    ControlMessage, DownMessage, Hotkey, JobId, JobSpec, JobStatus, NodeAddr, Signed, UpMessage,
};
use horde_transport::{ALPN_CONTROL, ChannelError, JobSession, codes, open_session};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::{Facilitator, LiveJob, ValidatorLinkError, total_deadline};
use crate::clock::now;
use crate::server::relay::{
    Hop, Relay, RelayPolicy, Step, Upstream, bad_endpoint_record, endpoint_record_holds,
};

/// How long a validator has to answer an `Assign` with `AssignmentReceived` before the job is
/// taken back and given to the next validator. The answer is sent before any check or dial, so
/// it costs one round trip on a live link; 3 s is far above that under the 256-node load runs
/// (capacity updates p99 under 1 s there) and is what a job given to a dead validator waits.
pub(super) const ASSIGN_ANSWER_TIMEOUT: Duration = Duration::from_secs(3);

/// Maps a message from the validator to the status the client sees.
pub(super) fn status_of(message: &UpMessage) -> Option<JobStatus> {
    Some(match message {
        UpMessage::Accepted => JobStatus::Accepted,
        UpMessage::Declined(reason) => JobStatus::Rejected(RejectReason::Declined(reason.clone())),
        UpMessage::ExecutorReady => JobStatus::ExecutorReady,
        UpMessage::Endpoint(record) => JobStatus::EndpointReady(record.clone()),
        UpMessage::VolumesFetched { volume_msg_id } => JobStatus::VolumesFetched {
            volume_msg_id: *volume_msg_id,
        },
        UpMessage::UploadDone(done) => JobStatus::UploadDone(done.clone()),
        UpMessage::Finished(finished) => JobStatus::Completed(finished.clone()),
        UpMessage::Failed(failure) => JobStatus::Failed(failure.clone()),
        UpMessage::HordeFailed(failure) => JobStatus::HordeFailed(failure.clone()),
        UpMessage::Rejected(reason) => JobStatus::Rejected(reason.clone()),
        UpMessage::EndpointReady(_) | UpMessage::Status(_) | UpMessage::AssignmentReceived => {
            return None;
        }
        _ => return None,
    })
}

/// The facilitator's relay policy: the validator's messages become the client's statuses, the
/// endpoint record must be the chosen miner's, and a validator that does not end the job within
/// all its stage deadlines plus `validator_silence_ms` fails it.
#[derive(Debug)]
pub(super) struct ValidatorSilence {
    hop: Hop,
    job_id: JobId,
    miner: Hotkey,
    validator: Hotkey,
    limit: Duration,
    deadline: tokio::time::Instant,
    /// Statuses a previous run recorded (a resumed job): each, sent again, is dropped once.
    recorded: Vec<JobStatus>,
}

/// The validator side of a job: who drives it, its stream, and what a previous run recorded.
#[derive(Debug)]
pub(super) struct ValidatorLeg {
    pub(super) validator: Hotkey,
    pub(super) miner: Hotkey,
    pub(super) session: JobSession,
    pub(super) recorded: Vec<JobStatus>,
}

impl RelayPolicy for ValidatorSilence {
    fn on_up(&mut self, message: UpMessage) -> Step {
        if let Some(status) = status_of(&message)
            && let Some(at) = self.recorded.iter().position(|held| *held == status)
        {
            self.recorded.remove(at);
            debug!("a status sent again by the validator was recorded before the restart; dropped");
            return Step::Drop;
        }
        match message {
            UpMessage::EndpointReady(_) | UpMessage::Status(_) | UpMessage::AssignmentReceived => {
                warn!("validator sent a message clients never see; ignored");
                Step::Drop
            }
            UpMessage::Endpoint(record) => {
                if endpoint_record_holds(&record, self.job_id, &self.miner, now()) {
                    Step::Up(UpMessage::Endpoint(record))
                } else {
                    bad_endpoint_record()
                }
            }
            other => Step::Up(other),
        }
    }

    /// Checked against the job's owner when the client sent it ([`Facilitator::serve_client`]).
    fn on_down(&mut self, message: DownMessage) -> Step {
        Step::Down(message)
    }

    fn deadline(&self) -> Option<tokio::time::Instant> {
        Some(self.deadline)
    }

    fn on_deadline(&mut self) -> Step {
        Step::Fail {
            code: codes::CANCELLED,
            message: self.hop.failed_up(format!(
                "validator {} did not end the job within its deadlines ({:?})",
                self.validator, self.limit
            )),
        }
    }
}

/// The client's side of a job on the facilitator: client messages come from the job's queue,
/// statuses go to the store and to attached clients.
struct ClientSide<'a> {
    facilitator: &'a Facilitator,
    job_id: JobId,
    live: &'a LiveJob,
    down: &'a mut mpsc::Receiver<DownMessage>,
}

impl Upstream for ClientSide<'_> {
    async fn recv(&mut self) -> Result<Option<ControlMessage>, ChannelError> {
        Ok(self.down.recv().await.map(ControlMessage::Down))
    }

    async fn send(&mut self, message: &UpMessage) -> Result<(), ChannelError> {
        match status_of(message) {
            Some(status) => {
                self.facilitator
                    .record(self.job_id, self.live, status)
                    .await;
            }
            None => warn!("validator sent a message clients never see; ignored"),
        }
        Ok(())
    }
}

impl Facilitator {
    /// Relays the job between its clients and its validator's `session` until it ends; returns
    /// the terminal status to record if the session itself did not deliver one.
    pub(super) async fn relay_to_validator(
        &self,
        job_id: JobId,
        spec: &JobSpec,
        live: &LiveJob,
        down_rx: &mut mpsc::Receiver<DownMessage>,
        leg: ValidatorLeg,
    ) -> Option<JobStatus> {
        let (validator, miner) = (leg.validator, leg.miner);
        let limit = total_deadline(&spec.deadlines)
            + Duration::from_millis(self.config.validator_silence_ms);
        let mut policy = ValidatorSilence {
            job_id,
            miner,
            validator,
            limit,
            deadline: tokio::time::Instant::now() + limit,
            hop: self.hop(),
            recorded: leg.recorded,
        };
        let mut client = ClientSide {
            facilitator: self,
            job_id,
            live,
            down: down_rx,
        };
        let relay = Relay::new(
            self.hop(),
            format!("validator {validator}"),
            "client",
            leg.session,
            &self.cancel,
        );
        relay
            .run(&mut client, &mut policy)
            .await
            .as_ref()
            .and_then(status_of)
    }

    /// Hands the job to `validator`: `Assign` on a new stream, then the validator's
    /// `AssignmentReceived` within [`ASSIGN_ANSWER_TIMEOUT`]. The validator does nothing with the
    /// job until it is sent `Proceed` (the caller sends it once `Assigned` is recorded), so when
    /// no answer comes — a validator killed while this side's connection to it still looks
    /// open — the stream is reset and the job may go to another validator: it is not lost, and
    /// it cannot run twice.
    pub(super) async fn hand_over(
        &self,
        validator: &NodeAddr,
        job_id: JobId,
        signed: &Signed<JobSpec>,
        miner: &NodeAddr,
    ) -> Result<JobSession, ValidatorLinkError> {
        let connection = self.peers.connect(validator, ALPN_CONTROL).await?;
        let assignment = Assignment {
            spec: signed.clone(),
            miner: miner.clone(),
        };
        let mut session =
            open_session(&connection, job_id, &DownMessage::Assign(assignment)).await?;
        match tokio::time::timeout(ASSIGN_ANSWER_TIMEOUT, session.recv()).await {
            Ok(Ok(Some(ControlMessage::Up(UpMessage::AssignmentReceived)))) => Ok(session),
            Ok(Ok(other)) => {
                session.abort(codes::PROTOCOL_VIOLATION);
                let what = other
                    .as_ref()
                    .map_or("the end of the stream", ControlMessage::name);
                Err(ValidatorLinkError::Unexpected(what.to_owned()))
            }
            Ok(Err(error)) => Err(ValidatorLinkError::Channel(error)),
            Err(_) => {
                session.abort(codes::CANCELLED);
                Err(ValidatorLinkError::NoAnswer(ASSIGN_ANSWER_TIMEOUT))
            }
        }
    }
}
