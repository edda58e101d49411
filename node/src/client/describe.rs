//! Statuses, refusals and failures in words, as `horde job` prints them (and the Python SDK
//! shows them).

use horde_protocol::JobStatus;
use horde_protocol::messages::{
    DeclineReason, FailureReason, JobFinished, OutputLocation, RejectReason,
};

/// The name of a status's kind (`Received`, `EndpointReady`, `Completed`, …).
pub fn name(status: &JobStatus) -> String {
    let shown = format!("{status:?}");
    shown
        .split(['(', ' ', '{'])
        .next()
        .unwrap_or_default()
        .to_owned()
}

/// A status as `horde job run` prints it: one line, or for an ended job its result and the tails
/// of its logs.
pub fn status(status: &JobStatus) -> String {
    match status {
        JobStatus::Received => "received".to_owned(),
        JobStatus::Assigned { validator, miner } => {
            format!("assigned: validator {validator}, miner {miner}")
        }
        JobStatus::Accepted => "accepted: executor reserved".to_owned(),
        JobStatus::ExecutorReady => "executor ready".to_owned(),
        JobStatus::EndpointReady(_) => "endpoint ready".to_owned(),
        JobStatus::VolumesFetched { volume_msg_id } => format!("volumes {volume_msg_id} fetched"),
        JobStatus::UploadDone(done) => {
            let files: Vec<String> = done
                .outputs
                .iter()
                .map(|o| format!("{} ({} bytes, blake3 {})", o.path, o.size, o.hash))
                .collect();
            format!("uploaded: {}", files.join(", "))
        }
        JobStatus::Completed(result) => format!(
            "completed: exit {:?}{}, {} outputs{}\n--- stdout (tail)\n{}--- stderr (tail)\n{}",
            result.exit_code,
            if result.terminated {
                " (terminated)"
            } else {
                ""
            },
            result.outputs.iter().filter(|o| !o.not_uploaded()).count(),
            not_uploaded(result),
            result.stdout_tail,
            result.stderr_tail
        ),
        JobStatus::Rejected(reason) => format!("rejected: {}", rejection(reason)),
        JobStatus::Failed(failed) => {
            let mut text = format!(
                "failed in stage {}: {}",
                failed.stage,
                failure(&failed.reason)
            );
            if let Some(result) = &failed.result {
                text.push_str(&format!(
                    "{}\n--- stdout (tail)\n{}--- stderr (tail)\n{}",
                    not_uploaded(result),
                    result.stdout_tail,
                    result.stderr_tail
                ));
            }
            text
        }
        JobStatus::HordeFailed(failure) => format!(
            "failed inside horde, reported by the {} {}: {}",
            failure.reported_by, failure.reporter, failure.reason
        ),
        other => format!("{other:?}"),
    }
}

/// One line per output, log or mid-session upload that was not uploaded: what, where to, why.
pub fn not_uploaded(result: &JobFinished) -> String {
    result
        .outputs
        .iter()
        .filter_map(|output| match &output.location {
            OutputLocation::NotUploaded { target, reason } => Some(format!(
                "\nnot uploaded: {} to {target}: {reason}",
                output.path
            )),
            _ => None,
        })
        .collect()
}

/// Why a job was refused, in words.
pub fn rejection(reason: &RejectReason) -> String {
    match reason {
        RejectReason::BadSignature => "the spec's signature does not verify".to_owned(),
        RejectReason::Expired => "the spec has expired (or is dated in the future)".to_owned(),
        RejectReason::DuplicateJobId => "this job id has been used before".to_owned(),
        RejectReason::ClientNotAllowed => {
            "the facilitator does not accept this account key".to_owned()
        }
        RejectReason::NoValidator => "no validator is available".to_owned(),
        RejectReason::NoMiner => "no miner has an executor of this class".to_owned(),
        RejectReason::Declined(decline) => format!(
            "the miner declined: {}",
            match decline {
                DeclineReason::Busy => "every executor of the class is busy".to_owned(),
                DeclineReason::NoExecutorForClass => "it has no executor of this class".to_owned(),
                DeclineReason::ValidatorNotAllowed =>
                    "it does not accept this validator".to_owned(),
                DeclineReason::InvalidSpec(why) => format!("invalid spec: {why}"),
                DeclineReason::ExecutorUnavailable(why) =>
                    format!("no executor could start: {why}"),
                other => format!("{other:?}"),
            }
        ),
        RejectReason::InvalidSpec(why) => format!("invalid spec: {why}"),
        RejectReason::MinerNotAllowed => "the chosen miner is not allowed".to_owned(),
        RejectReason::UnknownJob => "no such job".to_owned(),
        RejectReason::NotOwner => "the job belongs to another account".to_owned(),
        RejectReason::WarmingUp { retry_after_ms } => format!(
            "the facilitator is still learning the network (discovery warming up), retry in {} s",
            retry_after_ms.div_ceil(1000)
        ),
        RejectReason::AllBusy { class, executors } => {
            format!("all {executors} executors of class {class} are busy")
        }
        RejectReason::StoreFailed(why) => format!(
            "the facilitator could not record the job ({why}); nothing runs, submit it again"
        ),
        other => format!("{other:?}"),
    }
}

/// Why a job failed, in words.
pub fn failure(reason: &FailureReason) -> String {
    match reason {
        FailureReason::Timeout => "its deadline passed".to_owned(),
        FailureReason::NonZeroExit(code) => format!("the job exited with status {code}"),
        FailureReason::Signal(signal) => format!("the job was killed by signal {signal}"),
        FailureReason::VolumeFetch(why) => format!("fetching a volume failed: {why}"),
        FailureReason::Upload(why) => format!("an upload failed: {why}"),
        FailureReason::Spawn(why) => format!("the job could not start: {why}"),
        FailureReason::BadEndpointRecord(why) => format!("bad endpoint record: {why}"),
        FailureReason::OutOfMemory => {
            "the job was killed for going over its memory limit".to_owned()
        }
        FailureReason::Lost(why) => format!("the executor lost the job while it ran: {why}"),
        FailureReason::OverDiskLimit(why) => format!("the job was stopped: {why}"),
        other => format!("{other:?}"),
    }
}
