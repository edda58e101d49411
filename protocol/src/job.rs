//! The job specification a client signs, and the types it is made of: ids, executor classes,
//! staged deadlines, volumes (inputs) and uploads (outputs).

use std::fmt;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::keys::Hotkey;
use crate::signed::Signable;

#[cfg(test)]
use proptest_derive::Arbitrary;

/// A job id: 16 random bytes chosen by the client. Shown as 32 hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[cfg_attr(test, derive(Arbitrary))]
pub struct JobId(pub [u8; 16]);

impl JobId {
    /// A fresh random id.
    pub fn random() -> Self {
        let mut bytes = [0u8; 16];
        getrandom::fill(&mut bytes).expect("operating system random source unavailable");
        Self(bytes)
    }

    /// The first 4 bytes in hex, for logs.
    pub fn fmt_short(&self) -> String {
        hex::encode(&self.0[..4])
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "JobId({})", self.fmt_short())
    }
}

#[cfg(test)]
mod node_addr_tests {
    use super::*;

    #[test]
    fn node_addr_parses_and_displays() {
        let key = crate::keys::SecretKey::from_seed(&[5; 32]).hotkey();
        let text = format!("{key}@127.0.0.1:4000,127.0.0.2:5");
        let addr: NodeAddr = text.parse().unwrap();
        assert_eq!(addr.hotkey, key);
        assert_eq!(addr.addrs.len(), 2);
        assert_eq!(addr.to_string(), text);
        let hex = format!("0x{}@127.0.0.1:1", key.to_hex());
        assert_eq!(hex.parse::<NodeAddr>().unwrap().hotkey, key);
        assert!(matches!(
            "127.0.0.1:1".parse::<NodeAddr>(),
            Err(NodeAddrError::Shape(_))
        ));
        assert!(matches!(
            format!("{key}@nowhere").parse::<NodeAddr>(),
            Err(NodeAddrError::Address(_))
        ));
        assert!(matches!(
            "abc@127.0.0.1:1".parse::<NodeAddr>(),
            Err(NodeAddrError::Hotkey(_))
        ));
    }
}

impl std::str::FromStr for JobId {
    type Err = hex::FromHexError;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let mut bytes = [0u8; 16];
        hex::decode_to_slice(text.trim(), &mut bytes)?;
        Ok(Self(bytes))
    }
}

/// Milliseconds since the Unix epoch. The protocol has no clock: callers pass times in.
#[derive(
    Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Debug, Default,
)]
#[cfg_attr(test, derive(Arbitrary))]
pub struct UnixMillis(pub u64);

impl UnixMillis {
    /// `self + millis`, saturating.
    pub fn plus_millis(self, millis: u64) -> Self {
        Self(self.0.saturating_add(millis))
    }
}

/// The BLAKE3 hash of a blob.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[cfg_attr(test, derive(Arbitrary))]
pub struct BlobHash(pub [u8; 32]);

impl BlobHash {
    /// The hash of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Self(*blake3::hash(bytes).as_bytes())
    }

    /// The first 5 bytes in hex, for logs.
    pub fn fmt_short(&self) -> String {
        hex::encode(&self.0[..5])
    }
}

impl fmt::Display for BlobHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for BlobHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BlobHash({})", self.fmt_short())
    }
}

impl std::str::FromStr for BlobHash {
    type Err = hex::FromHexError;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(text.trim(), &mut bytes)?;
        Ok(Self(bytes))
    }
}

/// How to reach a node: its hotkey (the TLS identity to expect) and its QUIC addresses.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[cfg_attr(test, derive(Arbitrary))]
pub struct NodeAddr {
    /// The node's hotkey; the dialer requires the TLS certificate to carry it.
    pub hotkey: Hotkey,
    /// Addresses to try, in order.
    #[cfg_attr(test, proptest(strategy = "crate::arbitrary::socket_addrs()"))]
    pub addrs: Vec<SocketAddr>,
}

impl NodeAddr {
    /// A node at one address.
    pub fn new(hotkey: Hotkey, addr: SocketAddr) -> Self {
        Self {
            hotkey,
            addrs: vec![addr],
        }
    }
}

impl fmt::Display for NodeAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@", self.hotkey)?;
        for (i, addr) in self.addrs.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{addr}")?;
        }
        Ok(())
    }
}

/// A `HOTKEY@IP:PORT[,IP:PORT…]` string that does not parse.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum NodeAddrError {
    /// No `@` between hotkey and addresses.
    #[error("expected HOTKEY@IP:PORT, got {0:?}")]
    Shape(String),
    /// The hotkey part is not a hotkey.
    #[error("hotkey: {0}")]
    Hotkey(#[from] crate::keys::KeyError),
    /// An address part is not `IP:PORT`.
    #[error("address {0:?} is not IP:PORT")]
    Address(String),
}

impl std::str::FromStr for NodeAddr {
    type Err = NodeAddrError;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let text = text.trim();
        let (hotkey, addrs) = text
            .split_once('@')
            .ok_or_else(|| NodeAddrError::Shape(text.to_owned()))?;
        let hotkey: Hotkey = hotkey.parse()?;
        let addrs = addrs
            .split(',')
            .map(|a| {
                a.trim()
                    .parse()
                    .map_err(|_| NodeAddrError::Address(a.to_owned()))
            })
            .collect::<Result<Vec<SocketAddr>, _>>()?;
        Ok(Self { hotkey, addrs })
    }
}

/// A class of executor (hardware and runtime), e.g. `cpu-small` or `gpu-24gb`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, Serialize, Deserialize)]
#[cfg_attr(test, derive(Arbitrary))]
pub struct ExecutorClass(pub String);

impl fmt::Display for ExecutorClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What the executor runs.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[cfg_attr(test, derive(Arbitrary))]
#[non_exhaustive]
pub enum Program {
    /// A program on the executor's host, run as a child process.
    Command {
        /// The program path or name.
        program: String,
    },
    /// A container image (for container runners).
    Image {
        /// The image reference.
        reference: String,
    },
    /// A container image archive (the engine's `save` format) held as a blob on a horde
    /// storage node: fetched and verified by BLAKE3, loaded into the engine, and run.
    ImageBlob {
        /// The archive's BLAKE3 hash (verified while streaming).
        hash: BlobHash,
        /// Its size in bytes.
        size: u64,
        /// The storage node holding it.
        storage: NodeAddr,
    },
}

/// The staged deadlines of a job, in milliseconds. Each stage's overrun fails the job with
/// `Failed { stage, reason: Timeout }`.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[cfg_attr(test, derive(Arbitrary))]
pub struct Deadlines {
    /// Miner finds and reserves an executor.
    pub reservation_ms: u64,
    /// Executor reports ready after initial details.
    pub executor_startup_ms: u64,
    /// Initial volumes are fetched.
    pub volume_download_ms: u64,
    /// Job process answers its readiness probe.
    pub readiness_ms: u64,
    /// Job runs (from ready to exit or termination).
    pub execution_ms: u64,
    /// Outputs, stdout and stderr are uploaded.
    pub upload_ms: u64,
}

impl Default for Deadlines {
    fn default() -> Self {
        Self {
            reservation_ms: 10_000,
            executor_startup_ms: 30_000,
            volume_download_ms: 120_000,
            readiness_ms: 60_000,
            execution_ms: 600_000,
            upload_ms: 120_000,
        }
    }
}

/// The stages a job goes through; names the stage a failure happened in.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
#[cfg_attr(test, derive(Arbitrary))]
#[non_exhaustive]
pub enum Stage {
    /// Finding and reserving an executor.
    Reservation,
    /// Executor preparing the job directory.
    ExecutorStartup,
    /// Fetching volumes.
    VolumeDownload,
    /// Waiting for the job to answer its readiness probe.
    Readiness,
    /// Job running.
    Execution,
    /// Uploading outputs and logs.
    Upload,
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// How the executor decides the job is ready to serve.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[cfg_attr(test, derive(Arbitrary))]
#[non_exhaustive]
pub enum ReadinessProbe {
    /// `GET path` answers 2xx.
    Http {
        /// Request path, e.g. `/health`.
        path: String,
    },
    /// A TCP connection to the job port succeeds.
    Tcp,
    /// A WebSocket upgrade on `path` answers 101.
    WebSocket {
        /// Request path.
        path: String,
    },
}

impl Default for ReadinessProbe {
    fn default() -> Self {
        Self::Http {
            path: "/health".to_owned(),
        }
    }
}

/// A relative path inside the job's volume or output directory, as sent. Receivers validate it
/// before use (no `..`, no absolute paths, …); the wire type itself carries any string.
#[derive(Clone, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
#[cfg_attr(test, derive(Arbitrary))]
pub struct RelativePath(pub String);

impl fmt::Display for RelativePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where a volume's bytes come from.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[cfg_attr(test, derive(Arbitrary))]
#[non_exhaustive]
pub enum VolumeSource {
    /// A blob on a horde storage node.
    Blob {
        /// Its BLAKE3 hash (verified while streaming).
        hash: BlobHash,
        /// Its size in bytes.
        size: u64,
        /// The storage node holding it.
        storage: NodeAddr,
    },
    /// An HTTP(S) URL, fetched with Range resume and retries.
    Url {
        /// The URL.
        url: String,
        /// Expected size, checked when given.
        size: Option<u64>,
        /// Expected BLAKE3, checked when given.
        blake3: Option<BlobHash>,
    },
    /// Small content carried in the message itself.
    Inline {
        /// The bytes.
        bytes: Vec<u8>,
    },
}

/// One volume: a file placed at `path` under the job's volume directory.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[cfg_attr(test, derive(Arbitrary))]
pub struct VolumeSpec {
    /// Where the file goes, relative to the volume directory.
    pub path: RelativePath,
    /// Where it comes from.
    pub source: VolumeSource,
}

/// Where an output goes.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[cfg_attr(test, derive(Arbitrary))]
#[non_exhaustive]
pub enum UploadTarget {
    /// A horde storage node (the result is a blob hash).
    Blob {
        /// The storage node.
        storage: NodeAddr,
    },
    /// An HTTP PUT, e.g. a presigned S3 URL.
    HttpPut {
        /// The URL.
        url: String,
        /// Extra headers to send.
        headers: Vec<(String, String)>,
    },
}

/// One output: a file at `path` under the job's output directory, uploaded to `target`.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[cfg_attr(test, derive(Arbitrary))]
pub struct UploadSpec {
    /// The file, relative to the output directory.
    pub path: RelativePath,
    /// Where it goes.
    pub target: UploadTarget,
}

/// The whole job as the client asks for it. Signed by the client's account key; the signature
/// covers the job id, nonce and expiry, so a spec cannot be replayed under another id or later.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[cfg_attr(test, derive(Arbitrary))]
pub struct JobSpec {
    /// Random id chosen by the client; the facilitator refuses one it has seen.
    pub job_id: JobId,
    /// The executor class to run on.
    pub executor_class: ExecutorClass,
    /// What to run.
    pub program: Program,
    /// Arguments.
    pub args: Vec<String>,
    /// Environment variables.
    pub env: Vec<(String, String)>,
    /// Staged deadlines.
    pub deadlines: Deadlines,
    /// How readiness is probed.
    pub readiness: ReadinessProbe,
    /// Volumes fetched before the job starts.
    pub volumes: Vec<VolumeSpec>,
    /// Outputs uploaded when the job finishes.
    pub uploads: Vec<UploadSpec>,
    /// Where stdout and stderr go when the job ends (none: only truncated copies are reported).
    pub logs: Option<UploadTarget>,
    /// The per-job client key: the only certificate the job endpoint accepts.
    pub client_key: Hotkey,
    /// Run only on a miner the validator trusts (for cross-validation).
    pub on_trusted_miner: bool,
    /// 16 random bytes, part of what is signed.
    pub nonce: [u8; 16],
    /// When the client signed it.
    pub issued_at: UnixMillis,
    /// After this the spec is refused.
    pub expires_at: UnixMillis,
}

/// Tolerated clock skew between nodes: a spec, report or record dated this far in the future is
/// still taken (1 min: ample for NTP-synced hosts, short against specs signed ahead of time).
pub const MAX_CLOCK_SKEW_MS: u64 = 60_000;

impl JobSpec {
    /// Whether the spec is current at `now`: not expired, and not issued further in the future
    /// than clocks may disagree (`skew_ms`; a spec signed ahead of time would otherwise stay valid
    /// beyond the lifetime its expiry suggests). Facilitator and validator both check it.
    pub fn is_current(&self, now: UnixMillis, skew_ms: u64) -> bool {
        self.expires_at >= now && self.issued_at.0 <= now.0.saturating_add(skew_ms)
    }
}

impl Signable for JobSpec {
    const DOMAIN: &'static str = "horde/job-spec/v1";
}

/// A list of volumes to fetch and outputs to upload, sent mid-session. Signed by the client.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[cfg_attr(test, derive(Arbitrary))]
pub struct VolumeList {
    /// The job.
    pub job_id: JobId,
    /// Client-chosen id that comes back in `VolumesFetched` and `UploadDone`.
    pub volume_msg_id: u64,
    /// Files to fetch into the volume directory (paths unique per job).
    pub fetch: Vec<VolumeSpec>,
    /// Files to upload from the output directory when the job says they are ready.
    pub upload: Vec<UploadSpec>,
}

impl Signable for VolumeList {
    const DOMAIN: &'static str = "horde/volume-list/v1";
}

/// The client asks to end its job. Signed by the client.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[cfg_attr(test, derive(Arbitrary))]
pub struct TerminateRequest {
    /// The job.
    pub job_id: JobId,
    /// When it was asked.
    pub issued_at: UnixMillis,
}

impl Signable for TerminateRequest {
    const DOMAIN: &'static str = "horde/terminate/v1";
}
