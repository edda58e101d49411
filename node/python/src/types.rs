//! Plain values handed to Python: [`Status`] (a pushed status, in words as the CLI shows it),
//! [`Output`], [`Endpoint`] (a verified endpoint record) and [`Receipt`] (a job's signed
//! receipt for one tunnel stream).

use horde_node::client::{VerifiedEndpoint, describe};
use horde_protocol::codec::{from_bytes_exact, to_bytes};
use horde_protocol::messages::{OutputLocation, OutputRef, StatusUpdate};
use horde_protocol::{JobReceipt, JobStatus, Signed};
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::errors::Failure;

/// One status pushed by the facilitator.
#[pyclass(module = "horde._native", frozen, get_all)]
#[derive(Debug, Clone)]
pub(crate) struct Status {
    /// Position in the job's history, from 0.
    seq: u32,
    /// When the facilitator stored it (milliseconds since the Unix epoch).
    at_ms: u64,
    /// The kind: `Received`, `Assigned`, `Accepted`, `ExecutorReady`, `EndpointReady`,
    /// `VolumesFetched`, `UploadDone`, `Completed`, `Rejected`, `Failed`, `HordeFailed`.
    name: String,
    /// The status in words, as `horde job run` prints it.
    text: String,
    /// Whether no status follows.
    terminal: bool,
    /// For `VolumesFetched`: the volume list's id.
    volume_msg_id: Option<u64>,
    /// For `Completed` (and `Failed` once the job had run): its exit code.
    exit_code: Option<i32>,
    /// For an ended job: the last bytes of its stdout.
    stdout_tail: Option<String>,
    /// For an ended job: the last bytes of its stderr.
    stderr_tail: Option<String>,
    /// Uploaded outputs (`UploadDone`) or the ended job's outputs and logs.
    outputs: Vec<Output>,
}

/// A file the job uploaded (or failed to upload: `storage` and `url` are then `None` and
/// `not_uploaded` says why).
#[pyclass(module = "horde._native", frozen, get_all)]
#[derive(Debug, Clone)]
pub(crate) struct Output {
    /// Its path relative to the output directory, or `stdout` / `stderr`.
    path: String,
    /// Its size in bytes.
    size: u64,
    /// Its BLAKE3 hash (hex).
    hash: String,
    /// The storage node holding it (`HOTKEY@IP:PORT`).
    storage: Option<String>,
    /// The URL it was PUT to.
    url: Option<String>,
    /// Why it was not uploaded.
    not_uploaded: Option<String>,
}

impl From<&OutputRef> for Output {
    fn from(output: &OutputRef) -> Self {
        let (storage, url, not_uploaded) = match &output.location {
            OutputLocation::Blob(node) => (Some(node.to_string()), None, None),
            OutputLocation::Url(url) => (None, Some(url.clone()), None),
            OutputLocation::NotUploaded { target, reason } => {
                (None, None, Some(format!("to {target}: {reason}")))
            }
            other => (None, None, Some(format!("{other:?}"))),
        };
        Self {
            path: output.path.to_string(),
            size: output.size,
            hash: output.hash.to_string(),
            storage,
            url,
            not_uploaded,
        }
    }
}

impl From<&StatusUpdate> for Status {
    fn from(update: &StatusUpdate) -> Self {
        let status = &update.status;
        let finished = match status {
            JobStatus::Completed(result) => Some(result),
            JobStatus::Failed(failure) => failure.result.as_ref(),
            _ => None,
        };
        let outputs = match (status, finished) {
            (JobStatus::UploadDone(done), _) => done.outputs.iter().map(Output::from).collect(),
            (_, Some(result)) => result.outputs.iter().map(Output::from).collect(),
            _ => Vec::new(),
        };
        Self {
            seq: update.seq,
            at_ms: update.at.0,
            name: describe::name(status),
            text: describe::status(status),
            terminal: status.is_terminal(),
            volume_msg_id: match status {
                JobStatus::VolumesFetched { volume_msg_id } => Some(*volume_msg_id),
                _ => None,
            },
            exit_code: finished.and_then(|r| r.exit_code),
            stdout_tail: finished.map(|r| r.stdout_tail.clone()),
            stderr_tail: finished.map(|r| r.stderr_tail.clone()),
            outputs,
        }
    }
}

#[pymethods]
impl Status {
    fn __repr__(&self) -> String {
        format!(
            "Status(#{} {})",
            self.seq,
            self.text.lines().next().unwrap_or_default()
        )
    }
}

/// A job endpoint record that verified against the miner the facilitator assigned.
#[pyclass(module = "horde._native", frozen, get_all)]
#[derive(Debug, Clone)]
pub(crate) struct Endpoint {
    /// `IP:PORT` of the job's QUIC endpoint.
    address: String,
    /// The pinned job key (SS58): the only key the connection accepts.
    job_key: String,
    /// The miner that signed the record (SS58).
    miner: String,
    /// When the record expires (milliseconds since the Unix epoch).
    expires_at_ms: u64,
}

#[pymethods]
impl Endpoint {
    fn __repr__(&self) -> String {
        format!(
            "Endpoint({}, job key {}, miner {})",
            self.address, self.job_key, self.miner
        )
    }
}

impl From<&VerifiedEndpoint> for Endpoint {
    fn from(endpoint: &VerifiedEndpoint) -> Self {
        Self {
            address: endpoint.address().to_string(),
            job_key: endpoint.job_key().to_string(),
            miner: endpoint.record.miner.to_string(),
            expires_at_ms: endpoint.record.expires_at.0,
        }
    }
}

/// A job's signed receipt for one tunnel stream, verified under the job key: what both sides
/// sent (BLAKE3 digests and byte counts). Evidence for [`report`](crate::job::Job::report).
#[pyclass(module = "horde._native", frozen)]
#[derive(Debug, Clone)]
pub(crate) struct Receipt {
    pub(crate) signed: Signed<JobReceipt>,
    pub(crate) content: JobReceipt,
}

impl Receipt {
    /// Verifies `signed` under `job_key`.
    pub(crate) fn verified(
        signed: Signed<JobReceipt>,
        job_key: &horde_protocol::Hotkey,
    ) -> Result<Self, Failure> {
        let content = signed
            .verify_by(job_key)
            .map_err(|e| Failure::Integrity(format!("receipt: {e}")))?;
        Ok(Self { signed, content })
    }
}

#[pymethods]
impl Receipt {
    /// The job id (hex).
    #[getter]
    fn job_id(&self) -> String {
        self.content.job_id.to_string()
    }

    /// The tunnel stream's QUIC id.
    #[getter]
    fn stream(&self) -> u64 {
        self.content.stream
    }

    /// Bytes the client sent on the stream.
    #[getter]
    fn bytes_in(&self) -> u64 {
        self.content.bytes_in
    }

    /// Bytes the job sent back.
    #[getter]
    fn bytes_out(&self) -> u64 {
        self.content.bytes_out
    }

    /// BLAKE3 of the bytes the client sent (hex).
    #[getter]
    fn digest_in(&self) -> String {
        hex_string(&self.content.digest_in)
    }

    /// BLAKE3 of the bytes the job sent back (hex).
    #[getter]
    fn digest_out(&self) -> String {
        hex_string(&self.content.digest_out)
    }

    /// The signed receipt's bytes (as `horde job report --receipt` takes them, hex-encoded).
    fn to_bytes<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &to_bytes(&self.signed))
    }

    /// A receipt from its bytes; verified again when used in a report.
    #[staticmethod]
    fn from_bytes(data: &[u8]) -> PyResult<Self> {
        let signed: Signed<JobReceipt> = from_bytes_exact(data)
            .map_err(|e| Failure::Protocol(format!("not a signed receipt: {e}")))?;
        let content = signed
            .verify()
            .map_err(|e| Failure::Integrity(format!("receipt: {e}")))?;
        Ok(Self { signed, content })
    }

    fn __repr__(&self) -> String {
        format!(
            "Receipt(stream {}, {} bytes in, {} out)",
            self.content.stream, self.content.bytes_in, self.content.bytes_out
        )
    }
}

fn hex_string(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
