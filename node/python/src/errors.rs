//! The exception hierarchy: [`HordeError`] at the root, one subclass per failure the Rust client
//! tells apart, and [`Failure`], the clonable form a failure is kept in (a job's actor keeps its
//! ending for every later caller) until it is raised.
//!
//! ```text
//! HordeError
//! ├── RejectedError, JobFailedError, HordeFailedError   (all JobEndedError: the job's end)
//! ├── UnreachableError        no connection to the facilitator, job or storage node
//! ├── TooManyConnectionsError the facilitator's per-key connection cap
//! ├── TimedOutError           no answer in time (facilitator, QUIC idle, stalled transfer)
//! ├── IntegrityError          a signature, receipt, endpoint record or blob hash that fails
//! ├── InvalidSpecError        a spec or volume list refused before anything is sent
//! ├── ConnectionLostError     a stream or connection broke mid-way
//! └── ProtocolError           an answer the client cannot use (bad HTTP, unexpected message)
//! ```

use horde_node::client::blob::TransferError;
use horde_node::client::{ClientError, describe};
use horde_protocol::JobStatus;
use horde_transport::blob::BlobError;
use horde_transport::tunnel::TunnelError;
use horde_transport::{ChannelError, ConnectError};
use pyo3::exceptions::{PyException, PyOSError};
use pyo3::prelude::*;

pyo3::create_exception!(
    horde,
    HordeError,
    PyException,
    "Base class of every horde failure."
);
pyo3::create_exception!(
    horde,
    JobEndedError,
    HordeError,
    "The job ended (or was refused) before what was awaited; `status` is its final status in words."
);
pyo3::create_exception!(
    horde,
    RejectedError,
    JobEndedError,
    "The job was refused; `reason` says why."
);
pyo3::create_exception!(
    horde,
    JobFailedError,
    JobEndedError,
    "The job failed; `stage` is the stage it failed in and `reason` why."
);
pyo3::create_exception!(
    horde,
    HordeFailedError,
    JobEndedError,
    "horde itself failed; `role` and `node` name the hop that reported it, `reason` what happened."
);
pyo3::create_exception!(
    horde,
    UnreachableError,
    HordeError,
    "The facilitator, the job endpoint or a storage node could not be reached."
);
pyo3::create_exception!(
    horde,
    TooManyConnectionsError,
    HordeError,
    "The facilitator admits no more connections from this account key."
);
pyo3::create_exception!(horde, TimedOutError, HordeError, "No answer in time.");
pyo3::create_exception!(
    horde,
    IntegrityError,
    HordeError,
    "A signature, receipt, endpoint record or blob hash did not verify: the data is refused."
);
pyo3::create_exception!(
    horde,
    InvalidSpecError,
    HordeError,
    "A job spec or volume list was refused before anything was sent."
);
pyo3::create_exception!(
    horde,
    ConnectionLostError,
    HordeError,
    "A stream or connection broke before the operation finished."
);
pyo3::create_exception!(
    horde,
    ProtocolError,
    HordeError,
    "An answer the client cannot use (malformed HTTP, an unexpected message)."
);

/// A failure, kept until raised.
#[derive(Debug, Clone)]
pub(crate) enum Failure {
    /// The job's final status, not the one awaited.
    Ended(String),
    /// Refused.
    Rejected {
        reason: String,
    },
    /// Failed in a stage.
    JobFailed {
        stage: String,
        reason: String,
        text: String,
    },
    /// horde failed at a hop.
    HordeFailed {
        role: String,
        node: String,
        reason: String,
    },
    Unreachable(String),
    TooManyConnections(String),
    TimedOut(String),
    Integrity(String),
    InvalidSpec(String),
    ConnectionLost(String),
    Protocol(String),
    /// A local file failed.
    Io(String),
}

impl Failure {
    /// The failure a terminal `status` is when something else was awaited.
    pub(crate) fn ended(status: &JobStatus) -> Self {
        match status {
            JobStatus::Rejected(reason) => Self::Rejected {
                reason: describe::rejection(reason),
            },
            JobStatus::Failed(failure) => Self::JobFailed {
                stage: failure.stage.to_string(),
                reason: describe::failure(&failure.reason),
                text: describe::status(status),
            },
            JobStatus::HordeFailed(failure) => Self::HordeFailed {
                role: failure.reported_by.to_string(),
                node: failure.reporter.to_string(),
                reason: failure.reason.clone(),
            },
            other => Self::Ended(describe::status(other)),
        }
    }
}

fn connect_failure(error: &ConnectError) -> Failure {
    match error {
        ConnectError::TimedOut(_) => Failure::TimedOut(error.to_string()),
        ConnectError::Identity(_) | ConnectError::TlsRejected { .. } => {
            Failure::Integrity(error.to_string())
        }
        _ => Failure::Unreachable(error.to_string()),
    }
}

fn quinn_failure(error: &quinn::ConnectionError) -> Failure {
    match error {
        quinn::ConnectionError::TimedOut => Failure::TimedOut(error.to_string()),
        _ => Failure::ConnectionLost(error.to_string()),
    }
}

fn channel_failure(error: &ChannelError) -> Failure {
    match error {
        ChannelError::Frame(_) => Failure::Protocol(error.to_string()),
        _ => Failure::ConnectionLost(error.to_string()),
    }
}

impl From<ClientError> for Failure {
    fn from(error: ClientError) -> Self {
        let text = error.to_string();
        match error {
            ClientError::Connect(error) => connect_failure(&error),
            ClientError::Unreachable(_) => Self::Unreachable(text),
            ClientError::TooManyConnections => Self::TooManyConnections(text),
            ClientError::NoAnswer(_) => Self::TimedOut(text),
            ClientError::JobEnded(status) => Self::ended(&status),
            ClientError::BadEndpoint(_) => Self::Integrity(text),
            ClientError::InvalidSpec(_) => Self::InvalidSpec(text),
            ClientError::Tunnel(error) => error.into(),
            ClientError::Channel(error) => channel_failure(&error),
            ClientError::Session(_) | ClientError::StreamClosed => Self::ConnectionLost(text),
            _ => Self::Protocol(text),
        }
    }
}

impl From<TunnelError> for Failure {
    fn from(error: TunnelError) -> Self {
        let text = error.to_string();
        match error {
            TunnelError::BadReceipt(_)
            | TunnelError::MissingReceipt
            | TunnelError::WrongJobKey { .. }
            | TunnelError::BadClientSignature(_) => Self::Integrity(text),
            TunnelError::Connection(error) => quinn_failure(&error),
            TunnelError::Http(_) | TunnelError::Frame(_) | TunnelError::UnexpectedFrame(_) => {
                Self::Protocol(text)
            }
            TunnelError::Local(_) => Self::Io(text),
            _ => Self::ConnectionLost(text),
        }
    }
}

impl From<TransferError> for Failure {
    fn from(error: TransferError) -> Self {
        let text = error.to_string();
        match error {
            TransferError::NoAddress(_) | TransferError::Unreachable { .. } => {
                Self::Unreachable(text)
            }
            TransferError::Connect(error) => connect_failure(&error),
            TransferError::HashMismatch { .. } | TransferError::SizeMismatch { .. } => {
                Self::Integrity(text)
            }
            TransferError::Io(_) => Self::Io(text),
            TransferError::Blob(error) => match error {
                BlobError::Integrity { .. } => Self::Integrity(text),
                BlobError::Stalled { .. } => Self::TimedOut(text),
                BlobError::Connection(error) => quinn_failure(&error),
                BlobError::Read(_) | BlobError::Write(_) | BlobError::Channel(_) => {
                    Self::ConnectionLost(text)
                }
                BlobError::Io(_) => Self::Io(text),
                _ => Self::Protocol(text),
            },
            _ => Self::Protocol(text),
        }
    }
}

impl From<Failure> for PyErr {
    fn from(failure: Failure) -> Self {
        Python::attach(|py| {
            let (error, attributes): (PyErr, Vec<(&str, String)>) = match failure {
                Failure::Ended(text) => (
                    JobEndedError::new_err(format!("job ended: {text}")),
                    vec![("status", text)],
                ),
                Failure::Rejected { reason } => (
                    RejectedError::new_err(format!("rejected: {reason}")),
                    vec![
                        ("status", format!("rejected: {reason}")),
                        ("reason", reason),
                    ],
                ),
                Failure::JobFailed {
                    stage,
                    reason,
                    text,
                } => (
                    JobFailedError::new_err(format!("failed in stage {stage}: {reason}")),
                    vec![("status", text), ("stage", stage), ("reason", reason)],
                ),
                Failure::HordeFailed { role, node, reason } => {
                    let text =
                        format!("failed inside horde, reported by the {role} {node}: {reason}");
                    (
                        HordeFailedError::new_err(text.clone()),
                        vec![
                            ("status", text),
                            ("role", role),
                            ("node", node),
                            ("reason", reason),
                        ],
                    )
                }
                Failure::Unreachable(text) => (UnreachableError::new_err(text), vec![]),
                Failure::TooManyConnections(text) => {
                    (TooManyConnectionsError::new_err(text), vec![])
                }
                Failure::TimedOut(text) => (TimedOutError::new_err(text), vec![]),
                Failure::Integrity(text) => (IntegrityError::new_err(text), vec![]),
                Failure::InvalidSpec(text) => (InvalidSpecError::new_err(text), vec![]),
                Failure::ConnectionLost(text) => (ConnectionLostError::new_err(text), vec![]),
                Failure::Protocol(text) => (ProtocolError::new_err(text), vec![]),
                Failure::Io(text) => (PyOSError::new_err(text), vec![]),
            };
            for (name, value) in attributes {
                if let Err(failed) = error.value(py).setattr(name, value) {
                    return failed;
                }
            }
            error
        })
    }
}

/// Adds the exception classes to the module.
pub(crate) fn register(module: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = module.py();
    module.add("HordeError", py.get_type::<HordeError>())?;
    module.add("JobEndedError", py.get_type::<JobEndedError>())?;
    module.add("RejectedError", py.get_type::<RejectedError>())?;
    module.add("JobFailedError", py.get_type::<JobFailedError>())?;
    module.add("HordeFailedError", py.get_type::<HordeFailedError>())?;
    module.add("UnreachableError", py.get_type::<UnreachableError>())?;
    module.add(
        "TooManyConnectionsError",
        py.get_type::<TooManyConnectionsError>(),
    )?;
    module.add("TimedOutError", py.get_type::<TimedOutError>())?;
    module.add("IntegrityError", py.get_type::<IntegrityError>())?;
    module.add("InvalidSpecError", py.get_type::<InvalidSpecError>())?;
    module.add("ConnectionLostError", py.get_type::<ConnectionLostError>())?;
    module.add("ProtocolError", py.get_type::<ProtocolError>())?;
    Ok(())
}
