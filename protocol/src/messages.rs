//! The messages of a job session and of the tunnel.
//!
//! A job session is one bidirectional QUIC stream per hop (`horde/control/1`). The side that opens
//! it (upstream: client, facilitator, validator, miner) writes [`DownMessage`]s; the side that
//! accepts it writes [`UpMessage`]s. Each hop relays down to the next hop's stream and up to the
//! previous one, verifying what it must. The client only ever receives
//! [`UpMessage::Status`]: every message up the chain becomes a [`JobStatus`] the facilitator
//! stores and pushes.
//!
//! Every enum here is append-only: new variants go at the end, existing ones never change.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::accounting::{AccountingReceipt, Countersignature};
use crate::job::{
    BlobHash, Deadlines, ExecutorClass, JobId, JobSpec, NodeAddr, Program, RelativePath, Stage,
    TerminateRequest, UnixMillis, VolumeList,
};
use crate::keys::Hotkey;
use crate::records::{ClientStreamSignature, EndpointRecord, JobReceipt, MinerReport, Role};
use crate::signed::Signed;

#[cfg(test)]
use proptest_derive::Arbitrary;

/// The first frame on a `horde/control/1` stream says what the stream is for.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[cfg_attr(test, derive(Arbitrary))]
#[non_exhaustive]
pub enum ControlMessage {
    /// Toward the executor on a job session.
    Down(DownMessage),
    /// Toward the client on a job session.
    Up(UpMessage),
    /// An executor registers with its miner (first frame on the executor's stream).
    RegisterExecutor(ExecutorRegistration),
    /// A miner report, client → facilitator → validators.
    Report(Signed<MinerReport>),
    /// The answer to a report.
    ReportVerdict(ReportVerdict),
    /// Validator → miner, first frame of a stream of its own: an accounting receipt to
    /// countersign. The miner answers with [`ControlMessage::ReceiptReply`] and ends the stream.
    Receipt(Signed<AccountingReceipt>),
    /// Miner → validator: the answer to [`ControlMessage::Receipt`].
    ReceiptReply(ReceiptReply),
}

/// Messages toward the executor.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[cfg_attr(test, derive(Arbitrary))]
#[non_exhaustive]
pub enum DownMessage {
    /// Client → facilitator: a new job.
    Submit(Signed<JobSpec>),
    /// Client → facilitator: re-attach to a job after reconnecting; its history is replayed.
    Attach(JobId),
    /// Facilitator → validator: run this job on this miner.
    Assign(Assignment),
    /// Validator → miner → executor: what is needed to reserve and prepare.
    InitialDetails(InitialJobDetails),
    /// Validator → miner → executor: the full, client-signed spec.
    FullDetails(JobDetails),
    /// Client → … → executor: volumes to fetch and outputs to upload.
    Volumes(Signed<VolumeList>),
    /// Client → … → executor: end the job.
    Terminate(Signed<TerminateRequest>),
    /// Facilitator → validator, first frame of a new stream: the facilitator restarted (or its
    /// link broke) and takes the job's session up again on this stream. The validator sends the
    /// messages it held meanwhile, then relays as before; a job it no longer drives is answered
    /// `Rejected(UnknownJob)`. (Appended: variants are append-only on the wire.)
    Resume(JobId),
    /// Facilitator → validator, the second frame of an `Assign` stream, sent once the
    /// validator's [`UpMessage::AssignmentReceived`] came in and `Assigned` was recorded: only
    /// now may the validator act on the assignment. A validator that is not told to proceed (the
    /// stream is reset, or nothing comes) drops the job without contacting the miner, so a
    /// facilitator that heard nothing may give the job to another validator without it ever
    /// running twice. (Appended.)
    Proceed,
}

/// Messages toward the client.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[cfg_attr(test, derive(Arbitrary))]
#[non_exhaustive]
pub enum UpMessage {
    /// Miner: an executor is reserved for the job.
    Accepted,
    /// Miner: the job is declined.
    Declined(DeclineReason),
    /// Executor (relayed by the miner): initial preparations are done.
    ExecutorReady,
    /// Executor → miner: the job is serving; the miner turns this into a signed record.
    EndpointReady(EndpointReady),
    /// Miner → validator → facilitator: the signed endpoint record.
    Endpoint(Signed<EndpointRecord>),
    /// Executor: a volume list was fetched.
    VolumesFetched {
        /// The list's id.
        volume_msg_id: u64,
    },
    /// Executor: outputs were uploaded.
    UploadDone(UploadDone),
    /// Executor: the job ended.
    Finished(JobFinished),
    /// Any hop: the job failed in a stage.
    Failed(JobFailure),
    /// Any hop: horde itself failed (a node died, a link broke).
    HordeFailed(HordeFailure),
    /// Facilitator → client: a stored status.
    Status(StatusUpdate),
    /// Facilitator → client: the job was refused.
    Rejected(RejectReason),
    /// Validator → facilitator, the first answer on an `Assign` stream, before anything else is
    /// done: the assignment arrived. The validator then waits for [`DownMessage::Proceed`].
    /// (Appended: variants are append-only on the wire.)
    AssignmentReceived,
}

/// Facilitator → validator.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[cfg_attr(test, derive(Arbitrary))]
pub struct Assignment {
    /// The client-signed spec.
    pub spec: Signed<JobSpec>,
    /// The miner the facilitator chose.
    pub miner: NodeAddr,
}

/// Validator → miner → executor: enough to reserve an executor and prepare.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[cfg_attr(test, derive(Arbitrary))]
pub struct InitialJobDetails {
    /// The job.
    pub job_id: JobId,
    /// Which executor class.
    pub executor_class: ExecutorClass,
    /// What will run (lets the executor pull an image early).
    pub program: Program,
    /// The staged deadlines.
    pub deadlines: Deadlines,
    /// The client's per-job key.
    pub client_key: Hotkey,
    /// The validator driving the job.
    pub validator: Hotkey,
}

/// Validator → miner → executor: the full spec as the client signed it.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[cfg_attr(test, derive(Arbitrary))]
pub struct JobDetails {
    /// The client-signed spec (the executor verifies it too).
    pub spec: Signed<JobSpec>,
}

/// Executor → miner: the job endpoint is up.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[cfg_attr(test, derive(Arbitrary))]
pub struct EndpointReady {
    /// The endpoint's address.
    #[cfg_attr(test, proptest(strategy = "crate::arbitrary::socket_addr()"))]
    pub address: SocketAddr,
    /// The job key (the endpoint's certificate key).
    pub job_key: Hotkey,
}

/// Why a miner declined a job.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[cfg_attr(test, derive(Arbitrary))]
#[non_exhaustive]
pub enum DeclineReason {
    /// Every executor of the class is busy.
    Busy,
    /// The miner has no executor of the class.
    NoExecutorForClass,
    /// The miner does not take jobs from this validator.
    ValidatorNotAllowed,
    /// The spec cannot be run here.
    InvalidSpec(String),
    /// An executor could not be started.
    ExecutorUnavailable(String),
}

/// Why the facilitator or validator refused a job.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[cfg_attr(test, derive(Arbitrary))]
#[non_exhaustive]
pub enum RejectReason {
    /// The spec's signature does not verify.
    BadSignature,
    /// The spec expired (or was issued in the future).
    Expired,
    /// The job id was used before.
    DuplicateJobId,
    /// The client's key is not allowed.
    ClientNotAllowed,
    /// No validator is available.
    NoValidator,
    /// No miner is available.
    NoMiner,
    /// The miner declined.
    Declined(DeclineReason),
    /// The spec is invalid.
    InvalidSpec(String),
    /// The miner is not one the validator knows or trusts.
    MinerNotAllowed,
    /// No such job (attach).
    UnknownJob,
    /// The caller does not own the job.
    NotOwner,
    /// The facilitator started recently and is still learning the network: it knows no miner of
    /// the job's class yet. Not stored: the same signed spec may be submitted again after
    /// `retry_after_ms` (clients do so within the spec's reservation deadline). (Appended:
    /// variants are append-only on the wire.)
    WarmingUp {
        /// When to try again, in milliseconds.
        retry_after_ms: u64,
    },
    /// Miners offer the class, but every executor of it is busy (as their records say).
    /// (Appended.)
    AllBusy {
        /// The class asked for.
        class: crate::job::ExecutorClass,
        /// How many executors of the class the known miners have in all.
        executors: u32,
    },
    /// The facilitator could not record the job (its store failed, e.g. a full disk): nothing
    /// runs; the same spec may be submitted again. (Appended.)
    StoreFailed(String),
}

/// Why a stage failed.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[cfg_attr(test, derive(Arbitrary))]
#[non_exhaustive]
pub enum FailureReason {
    /// The stage's deadline passed.
    Timeout,
    /// The job exited with a non-zero status.
    NonZeroExit(i32),
    /// The job was killed by a signal.
    Signal(i32),
    /// A volume could not be fetched.
    VolumeFetch(String),
    /// An output could not be uploaded.
    Upload(String),
    /// The job process could not be started.
    Spawn(String),
    /// The endpoint record did not verify.
    BadEndpointRecord(String),
    /// The job was killed for going over its executor class's memory limit. (Appended: enum
    /// variants are append-only on the wire.)
    OutOfMemory,
    /// The runner lost the job while it ran: it cannot say how the job ended (its container
    /// engine stopped answering, …). What of the job could be stopped was. (Appended.)
    Lost(String),
    /// The job was stopped for keeping more on the node's disk (its output directory and logs)
    /// than its executor class allows: bytes or files, as said. (Appended.)
    OverDiskLimit(String),
}

/// A job failure in one stage.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[cfg_attr(test, derive(Arbitrary))]
pub struct JobFailure {
    /// The stage.
    pub stage: Stage,
    /// Why.
    pub reason: FailureReason,
    /// The job's result so far (exit status, logs), when the job had started.
    pub result: Option<JobFinished>,
}

/// horde itself failed.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[cfg_attr(test, derive(Arbitrary))]
pub struct HordeFailure {
    /// Which role saw it.
    pub reported_by: Role,
    /// Which node saw it.
    pub reporter: Hotkey,
    /// What happened.
    pub reason: String,
}

/// Where an uploaded file ended up, or where it was to go and why it did not.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[cfg_attr(test, derive(Arbitrary))]
pub struct OutputRef {
    /// The file, relative to the output directory (or `stdout` / `stderr`).
    pub path: RelativePath,
    /// Its size.
    pub size: u64,
    /// Its BLAKE3.
    pub hash: BlobHash,
    /// Where it went (`blob` on a storage node, or the URL).
    pub location: OutputLocation,
}

/// Where an output went (or, appended last, that it went nowhere).
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[cfg_attr(test, derive(Arbitrary))]
#[non_exhaustive]
pub enum OutputLocation {
    /// A storage node.
    Blob(NodeAddr),
    /// An HTTP PUT target.
    Url(String),
    /// Nowhere: the upload failed. `size` and `hash` of its [`OutputRef`] are the file's when it
    /// could be read, else zero.
    NotUploaded {
        /// Where it was to go (`blob HOTKEY@ADDR`, or the URL).
        target: String,
        /// Why it did not.
        reason: String,
    },
}

impl OutputRef {
    /// Whether this output was not uploaded ([`OutputLocation::NotUploaded`]).
    pub fn not_uploaded(&self) -> bool {
        matches!(self.location, OutputLocation::NotUploaded { .. })
    }
}

/// Executor: outputs were uploaded.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[cfg_attr(test, derive(Arbitrary))]
pub struct UploadDone {
    /// The volume list that declared them, if any (none: the job's own `uploads`).
    pub volume_msg_id: Option<u64>,
    /// What was uploaded.
    pub outputs: Vec<OutputRef>,
}

/// How the job ended.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[cfg_attr(test, derive(Arbitrary))]
pub struct JobFinished {
    /// Exit code (none if killed by a signal).
    pub exit_code: Option<i32>,
    /// Whether it was ended by a terminate request.
    pub terminated: bool,
    /// Uploaded outputs, stdout and stderr, and those not uploaded
    /// ([`OutputLocation::NotUploaded`]).
    pub outputs: Vec<OutputRef>,
    /// The last bytes of stdout.
    pub stdout_tail: String,
    /// The last bytes of stderr.
    pub stderr_tail: String,
}

/// The statuses the facilitator stores and pushes to the client.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[cfg_attr(test, derive(Arbitrary))]
#[non_exhaustive]
pub enum JobStatus {
    /// The facilitator persisted the job.
    Received,
    /// A validator and miner were chosen.
    Assigned {
        /// The validator.
        validator: Hotkey,
        /// The miner.
        miner: Hotkey,
    },
    /// The miner reserved an executor.
    Accepted,
    /// The executor finished initial preparations.
    ExecutorReady,
    /// The job is serving: verified endpoint record.
    EndpointReady(Signed<EndpointRecord>),
    /// A volume list was fetched.
    VolumesFetched {
        /// The list's id.
        volume_msg_id: u64,
    },
    /// Outputs were uploaded.
    UploadDone(UploadDone),
    /// Terminal: the job ran to its end.
    Completed(JobFinished),
    /// Terminal: the job was refused.
    Rejected(RejectReason),
    /// Terminal: the job failed in a stage.
    Failed(JobFailure),
    /// Terminal: horde failed.
    HordeFailed(HordeFailure),
}

impl JobStatus {
    /// Whether no status follows this one.
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            JobStatus::Completed(_)
                | JobStatus::Rejected(_)
                | JobStatus::Failed(_)
                | JobStatus::HordeFailed(_)
        )
    }
}

/// One stored status, numbered.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[cfg_attr(test, derive(Arbitrary))]
pub struct StatusUpdate {
    /// The job.
    pub job_id: JobId,
    /// Position in the job's history, from 0.
    pub seq: u32,
    /// When the facilitator stored it.
    pub at: UnixMillis,
    /// The status.
    pub status: JobStatus,
}

/// An executor announcing itself to its miner.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[cfg_attr(test, derive(Arbitrary))]
pub struct ExecutorRegistration {
    /// The executor class it serves.
    pub class: ExecutorClass,
    /// The token the miner gave it when spawning (ties a child process to its slot).
    pub token: [u8; 16],
}

/// Facilitator's answer to a miner report.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[cfg_attr(test, derive(Arbitrary))]
#[non_exhaustive]
pub enum ReportVerdict {
    /// Verified and forwarded to this many validators.
    Accepted {
        /// Validators reached.
        forwarded_to: u32,
    },
    /// Refused.
    Refused(String),
}

/// A miner's answer to an accounting receipt.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[cfg_attr(test, derive(Arbitrary))]
#[non_exhaustive]
pub enum ReceiptReply {
    /// Checked, stored, and countersigned.
    Countersigned(Countersignature),
    /// Refused, with the reason.
    Refused(String),
}

/// One frame on a tunnel stream (`horde/job/1`).
///
/// The client sends `Data*` then `ClientEnd`; the endpoint sends `Data*` then `JobEnd`, the
/// receipt, before it finishes the stream.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[cfg_attr(test, derive(Arbitrary))]
#[non_exhaustive]
pub enum TunnelFrame {
    /// Bytes for the other side.
    Data(Vec<u8>),
    /// The client is done writing; its signature over what it sent.
    ClientEnd(Signed<ClientStreamSignature>),
    /// The job is done writing; its receipt.
    JobEnd(Signed<JobReceipt>),
}
/// A client message the path refuses: clients may only send their own job's volume lists and
/// terminate requests, signed by the job's owner.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ClientMessageError {
    /// Not signed by the job's owner.
    #[error("{0}")]
    Signature(#[from] crate::signed::VerifyError),
    /// A volume list naming another job.
    #[error("volume list for another job")]
    VolumesForAnotherJob,
    /// A terminate request naming another job.
    #[error("terminate for another job")]
    TerminateForAnotherJob,
    /// A message only nodes send.
    #[error("clients may not send {0}")]
    NotFromClients(&'static str),
}

impl ControlMessage {
    /// The variant's name (with the inner one for `Down`/`Up`), for logs and errors: a message
    /// can carry a whole job spec, which a log line should not.
    pub fn name(&self) -> &'static str {
        match self {
            ControlMessage::Down(down) => down.name(),
            ControlMessage::Up(up) => up.name(),
            ControlMessage::RegisterExecutor(_) => "RegisterExecutor",
            ControlMessage::Report(_) => "Report",
            ControlMessage::ReportVerdict(_) => "ReportVerdict",
            ControlMessage::Receipt(_) => "Receipt",
            ControlMessage::ReceiptReply(_) => "ReceiptReply",
        }
    }
}

impl UpMessage {
    /// The variant's name, for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            UpMessage::Accepted => "Accepted",
            UpMessage::Declined(_) => "Declined",
            UpMessage::ExecutorReady => "ExecutorReady",
            UpMessage::EndpointReady(_) => "EndpointReady",
            UpMessage::Endpoint(_) => "Endpoint",
            UpMessage::VolumesFetched { .. } => "VolumesFetched",
            UpMessage::UploadDone(_) => "UploadDone",
            UpMessage::Finished(_) => "Finished",
            UpMessage::Failed(_) => "Failed",
            UpMessage::HordeFailed(_) => "HordeFailed",
            UpMessage::Status(_) => "Status",
            UpMessage::Rejected(_) => "Rejected",
            UpMessage::AssignmentReceived => "AssignmentReceived",
        }
    }
}

impl DownMessage {
    /// The variant's name, for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            DownMessage::Submit(_) => "Submit",
            DownMessage::Attach(_) => "Attach",
            DownMessage::Assign(_) => "Assign",
            DownMessage::InitialDetails(_) => "InitialDetails",
            DownMessage::FullDetails(_) => "FullDetails",
            DownMessage::Volumes(_) => "Volumes",
            DownMessage::Terminate(_) => "Terminate",
            DownMessage::Resume(_) => "Resume",
            DownMessage::Proceed => "Proceed",
        }
    }

    /// Checks a message a client sent on job `job_id`'s session: only volume lists and terminate
    /// requests, for that job, signed by `owner`, pass. Facilitator and validator both check.
    pub fn check_from_owner(
        &self,
        job_id: JobId,
        owner: &Hotkey,
    ) -> Result<(), ClientMessageError> {
        match self {
            DownMessage::Volumes(list) => {
                if list.verify_by(owner)?.job_id != job_id {
                    return Err(ClientMessageError::VolumesForAnotherJob);
                }
            }
            DownMessage::Terminate(request) => {
                if request.verify_by(owner)?.job_id != job_id {
                    return Err(ClientMessageError::TerminateForAnotherJob);
                }
            }
            other => return Err(ClientMessageError::NotFromClients(other.name())),
        }
        Ok(())
    }
}

#[cfg(test)]
mod client_message_tests {
    use crate::{SecretKey, Signed, TerminateRequest, VolumeList};

    use super::*;

    /// Volume lists and terminate requests are the job owner's, for that job; nothing else
    /// passes from a client, whatever it is signed by.
    #[test]
    fn client_messages_must_be_the_owners_and_for_its_job() {
        let owner = SecretKey::from_seed(&[1; 32]);
        let other = SecretKey::from_seed(&[2; 32]);
        let job = JobId([7; 16]);
        let list = |job_id| VolumeList {
            job_id,
            volume_msg_id: 1,
            fetch: Vec::new(),
            upload: Vec::new(),
        };
        let terminate = |job_id| TerminateRequest {
            job_id,
            issued_at: UnixMillis(1),
        };
        let check = |message: DownMessage| {
            message
                .check_from_owner(job, &owner.hotkey())
                .map_err(|e| e.to_string())
        };
        assert!(check(DownMessage::Volumes(Signed::sign(&owner, &list(job)))).is_ok());
        assert!(
            check(DownMessage::Terminate(Signed::sign(
                &owner,
                &terminate(job)
            )))
            .is_ok()
        );

        let refused = [
            (
                "volumes by another key",
                DownMessage::Volumes(Signed::sign(&other, &list(job))),
            ),
            (
                "volumes for another job",
                DownMessage::Volumes(Signed::sign(&owner, &list(JobId([8; 16])))),
            ),
            (
                "terminate by another key",
                DownMessage::Terminate(Signed::sign(&other, &terminate(job))),
            ),
            (
                "terminate for another job",
                DownMessage::Terminate(Signed::sign(&owner, &terminate(JobId([8; 16])))),
            ),
            ("attach", DownMessage::Attach(job)),
        ];
        for (name, message) in refused {
            let reason = check(message).unwrap_err();
            assert!(!reason.is_empty(), "{name}");
        }
        assert_eq!(
            check(DownMessage::Volumes(Signed::sign(
                &owner,
                &list(JobId([8; 16]))
            ))),
            Err("volume list for another job".to_owned())
        );
        assert_eq!(
            check(DownMessage::Terminate(Signed::sign(
                &owner,
                &terminate(JobId([8; 16]))
            ))),
            Err("terminate for another job".to_owned())
        );
    }
}
