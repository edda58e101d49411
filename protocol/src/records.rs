//! Signed records: the miner's endpoint record, node records for discovery, the per-stream client
//! signature and job receipt of the tunnel, and miner reports for cross-validation.

use std::fmt;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::job::{ExecutorClass, JobId, UnixMillis};
use crate::keys::Hotkey;
use crate::signed::{Signable, Signed};

#[cfg(test)]
use proptest_derive::Arbitrary;

/// The role a node plays.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
#[cfg_attr(test, derive(Arbitrary))]
#[non_exhaustive]
pub enum Role {
    /// Entry point for clients.
    Facilitator,
    /// Drives jobs against miners.
    Validator,
    /// Owns executors.
    Miner,
    /// Runs one job at a time.
    Executor,
    /// Blob store.
    Storage,
    /// A client (not a node).
    Client,
}

impl Role {
    /// The lower-case name used on the command line and in config files.
    pub fn as_str(&self) -> &'static str {
        match self {
            Role::Facilitator => "facilitator",
            Role::Validator => "validator",
            Role::Miner => "miner",
            Role::Executor => "executor",
            Role::Storage => "storage",
            Role::Client => "client",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Ok(match text {
            "facilitator" => Role::Facilitator,
            "validator" => Role::Validator,
            "miner" => Role::Miner,
            "executor" => Role::Executor,
            "storage" => Role::Storage,
            other => {
                return Err(format!(
                    "unknown role {other:?}: expected facilitator, validator, miner, executor or storage"
                ));
            }
        })
    }
}

/// Where a running job can be reached, signed by the miner's hotkey. Validator, facilitator and
/// client each verify it against the miner the facilitator chose; the client then pins `job_key`.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[cfg_attr(test, derive(Arbitrary))]
pub struct EndpointRecord {
    /// The job.
    pub job_id: JobId,
    /// The miner vouching for the endpoint (must equal the signer).
    pub miner: Hotkey,
    /// Address of the job endpoint (QUIC, ALPN `horde/job/1`).
    #[cfg_attr(test, proptest(strategy = "crate::arbitrary::socket_addr()"))]
    pub address: SocketAddr,
    /// The job's key: the endpoint's TLS certificate key and the key signing receipts.
    pub job_key: Hotkey,
    /// After this the record is not to be trusted.
    pub expires_at: UnixMillis,
}

impl Signable for EndpointRecord {
    const DOMAIN: &'static str = "horde/endpoint/v1";
}

/// Free capacity of one executor class on a miner.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[cfg_attr(test, derive(Arbitrary))]
pub struct ClassCapacity {
    /// The class.
    pub class: ExecutorClass,
    /// Executors of the class free now.
    pub free: u32,
    /// Executors of the class in all.
    pub total: u32,
}

/// What a node publishes about itself for discovery, signed by its hotkey.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[cfg_attr(test, derive(Arbitrary))]
pub struct NodeRecord {
    /// The node's hotkey (must equal the signer).
    pub hotkey: Hotkey,
    /// Its role.
    pub role: Role,
    /// Its QUIC addresses.
    #[cfg_attr(test, proptest(strategy = "crate::arbitrary::socket_addrs()"))]
    pub addrs: Vec<SocketAddr>,
    /// Executor classes and free capacity (miners only).
    pub capacity: Vec<ClassCapacity>,
    /// Software version.
    pub version: String,
    /// Monotonic sequence number: the newest wins.
    pub seq: u64,
    /// After this the record is dropped.
    pub expires_at: UnixMillis,
}

impl Signable for NodeRecord {
    const DOMAIN: &'static str = "horde/node-record/v1";
}

/// The client's signature over what it sent on one tunnel stream: sent in the client's `End`.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[cfg_attr(test, derive(Arbitrary))]
pub struct ClientStreamSignature {
    /// The job.
    pub job_id: JobId,
    /// The QUIC stream id of the tunnel stream.
    pub stream: u64,
    /// BLAKE3 of every byte the client sent to the job on this stream.
    pub digest_in: [u8; 32],
}

impl Signable for ClientStreamSignature {
    const DOMAIN: &'static str = "horde/stream-client/v1";
}

/// The job's receipt for one tunnel stream, signed with the job key: what went in and what came
/// out. The client keeps it; with the endpoint record it proves what the miner's job answered.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[cfg_attr(test, derive(Arbitrary))]
pub struct JobReceipt {
    /// The job.
    pub job_id: JobId,
    /// The QUIC stream id of the tunnel stream.
    pub stream: u64,
    /// BLAKE3 of the bytes the client sent.
    pub digest_in: [u8; 32],
    /// BLAKE3 of the bytes the job sent back.
    pub digest_out: [u8; 32],
    /// Bytes in, bytes out.
    pub bytes_in: u64,
    /// Bytes the job sent back.
    pub bytes_out: u64,
}

impl Signable for JobReceipt {
    const DOMAIN: &'static str = "horde/job-receipt/v1";
}

/// A report that a miner's job answered wrongly, signed by a validator hotkey acting as client.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[cfg_attr(test, derive(Arbitrary))]
pub struct MinerReport {
    /// The job that answered wrongly.
    pub job_id: JobId,
    /// The miner's endpoint record for that job.
    pub endpoint: Signed<EndpointRecord>,
    /// The job's receipt for the disputed stream.
    pub receipt: Signed<JobReceipt>,
    /// BLAKE3 of the request sent.
    pub request_digest: [u8; 32],
    /// BLAKE3 of the response received.
    pub response_digest: [u8; 32],
    /// The trusted job's receipt for the same request, if one was run.
    pub trusted_receipt: Option<Signed<JobReceipt>>,
    /// Free-form explanation.
    pub details: String,
    /// When it was reported.
    pub reported_at: UnixMillis,
}

impl Signable for MinerReport {
    const DOMAIN: &'static str = "horde/miner-report/v1";
}
