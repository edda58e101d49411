//! Signed records: the miner's endpoint record, node records for discovery, the per-stream client
//! signature and job receipt of the tunnel, and miner reports for cross-validation.

use std::fmt;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::job::{ExecutorClass, JobId, UnixMillis};
use crate::keys::Hotkey;
use crate::signed::{Signable, Signed, VerifyError};

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

/// The capacity entry a storage node publishes in its record instead of executor classes:
/// `free` and `total` count MiB (free under the store's cap, and the cap: `[storage] max_bytes`,
/// or what it holds plus the disk's free space), so its record carries its space without a new
/// field.
pub const STORAGE_CAPACITY_CLASS: &str = "storage-mib";

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
    /// Its QUIC addresses (the node's own endpoint: jobs, blobs, control).
    #[cfg_attr(test, proptest(strategy = "crate::arbitrary::socket_addrs()"))]
    pub addrs: Vec<SocketAddr>,
    /// Its discovery (libp2p QUIC) addresses; the libp2p peer id is derived from `hotkey`.
    #[cfg_attr(test, proptest(strategy = "crate::arbitrary::socket_addrs()"))]
    pub p2p_addrs: Vec<SocketAddr>,
    /// Executor classes and free capacity (miners only).
    pub capacity: Vec<ClassCapacity>,
    /// Software version.
    pub version: String,
    /// Monotonic sequence number: the newest wins.
    pub seq: u64,
    /// After this the record is dropped.
    pub expires_at: UnixMillis,
    /// When the node's current run started (its discovery service, wall clock): a record with a
    /// later incarnation than the one held tells a peer the node restarted, so that the peer
    /// leaves the connections it still holds to the node's old run (dead: a restarted node
    /// cannot answer on them) instead of waiting for their idle timeout, and connects afresh.
    pub incarnation: UnixMillis,
}

impl Signable for NodeRecord {
    // v2: `incarnation` added (postcard is positional; a v1 record does not decode as v2).
    const DOMAIN: &'static str = "horde/node-record/v2";
}

/// One message of the record exchange (`/horde/records/2`): sent on every new discovery
/// connection, on every change of the sender's own record, and to pass on records new to the
/// sender. The answer is a `RecordSync` too.
#[derive(Clone, PartialEq, Eq, Debug, Default, Serialize, Deserialize)]
#[cfg_attr(test, derive(Arbitrary))]
pub struct RecordSync {
    /// The sender's own record: its hotkey must be the sender's libp2p identity.
    pub own: Option<Signed<NodeRecord>>,
    /// Records of other nodes the sender passes on (each signed by its own node).
    pub relayed: Vec<Signed<NodeRecord>>,
    /// Asks the receiver to answer with every record it holds.
    pub want_all: bool,
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

/// Why a miner report does not verify. The `Display` text starts with a stable phrase that names
/// the refusal; it is what `ReportVerdict::Refused` carries.
#[derive(Clone, PartialEq, Eq, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReportError {
    /// The reporter's signature over the report does not verify.
    #[error("bad reporter signature: {0}")]
    BadReporterSignature(VerifyError),
    /// The endpoint record is not signed by the miner it must come from.
    #[error("endpoint record not signed by the job's miner: {0}")]
    EndpointNotByMiner(VerifyError),
    /// The endpoint record names another miner than its signer.
    #[error("endpoint record not signed by the job's miner: it names {named}, signed by {signer}")]
    EndpointMinerMismatch {
        /// The miner the record names.
        named: Hotkey,
        /// Who signed it.
        signer: Hotkey,
    },
    /// The endpoint record is for another job.
    #[error("endpoint record for another job: {0}")]
    EndpointOtherJob(JobId),
    /// The receipt is not signed by the endpoint record's job key.
    #[error("receipt not signed by the job key: {0}")]
    BadReceipt(VerifyError),
    /// The receipt names another job.
    #[error("receipt for another job: {0}")]
    ReceiptOtherJob(JobId),
    /// The trusted job's receipt does not verify, or is for another request.
    #[error("bad trusted receipt: {0}")]
    BadTrustedReceipt(String),
}

/// A miner report whose whole chain verified: reporter signature, miner hotkey → endpoint record
/// → job key → receipt.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct VerifiedReport {
    /// Who signed the report.
    pub reporter: Hotkey,
    /// The report.
    pub report: MinerReport,
    /// The miner's endpoint record.
    pub endpoint: EndpointRecord,
    /// The disputed receipt.
    pub receipt: JobReceipt,
}

impl VerifiedReport {
    /// The miner the report is against.
    pub fn miner(&self) -> Hotkey {
        self.endpoint.miner
    }

    /// When the miner's exclusion ends: `exclusion_ms` after the report was made (never after
    /// `now` + `exclusion_ms`), so replaying an old report cannot extend it.
    pub fn exclusion_end(&self, exclusion_ms: u64, now: UnixMillis) -> UnixMillis {
        UnixMillis(self.report.reported_at.0.min(now.0)).plus_millis(exclusion_ms)
    }
}

/// Verifies a miner report's chain. `miner` is the miner the verifier knows ran the job (the
/// facilitator's assignment); `None` accepts the miner the record names, provided it signed it.
/// Ownership of the job and duplicates are the caller's to check.
pub fn verify_report(
    signed: &Signed<MinerReport>,
    miner: Option<&Hotkey>,
) -> Result<VerifiedReport, ReportError> {
    let report = signed.verify().map_err(ReportError::BadReporterSignature)?;
    let signer = report.endpoint.signer();
    let endpoint = report
        .endpoint
        .verify_by(miner.unwrap_or(signer))
        .map_err(ReportError::EndpointNotByMiner)?;
    if endpoint.miner != *report.endpoint.signer() {
        return Err(ReportError::EndpointMinerMismatch {
            named: endpoint.miner,
            signer: *report.endpoint.signer(),
        });
    }
    if endpoint.job_id != report.job_id {
        return Err(ReportError::EndpointOtherJob(endpoint.job_id));
    }
    let receipt = report
        .receipt
        .verify_by(&endpoint.job_key)
        .map_err(ReportError::BadReceipt)?;
    if receipt.job_id != report.job_id {
        return Err(ReportError::ReceiptOtherJob(receipt.job_id));
    }
    if let Some(trusted) = &report.trusted_receipt {
        let trusted = trusted
            .verify()
            .map_err(|e| ReportError::BadTrustedReceipt(e.to_string()))?;
        if trusted.job_id == report.job_id {
            return Err(ReportError::BadTrustedReceipt(
                "it is for the reported job itself".to_owned(),
            ));
        }
        if trusted.digest_in != receipt.digest_in {
            return Err(ReportError::BadTrustedReceipt(
                "the trusted job was sent a different request".to_owned(),
            ));
        }
    }
    Ok(VerifiedReport {
        reporter: *signed.signer(),
        report,
        endpoint,
        receipt,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::SecretKey;

    fn key(seed: u8) -> SecretKey {
        SecretKey::from_seed(&[seed; 32])
    }

    const JOB: JobId = JobId([1; 16]);

    fn receipt(job_key: &SecretKey, job_id: JobId, digest_in: [u8; 32]) -> Signed<JobReceipt> {
        Signed::sign(
            job_key,
            &JobReceipt {
                job_id,
                stream: 4,
                digest_in,
                digest_out: [2; 32],
                bytes_in: 10,
                bytes_out: 20,
            },
        )
    }

    fn endpoint(miner: &SecretKey, job_id: JobId, job_key: &SecretKey) -> Signed<EndpointRecord> {
        Signed::sign(
            miner,
            &EndpointRecord {
                job_id,
                miner: miner.hotkey(),
                address: "127.0.0.1:1".parse().unwrap(),
                job_key: job_key.hotkey(),
                expires_at: UnixMillis(1),
            },
        )
    }

    fn report(
        endpoint: Signed<EndpointRecord>,
        receipt: Signed<JobReceipt>,
        trusted: Option<Signed<JobReceipt>>,
    ) -> Signed<MinerReport> {
        Signed::sign(
            &key(9),
            &MinerReport {
                job_id: JOB,
                endpoint,
                receipt,
                request_digest: [0; 32],
                response_digest: [0; 32],
                trusted_receipt: trusted,
                details: "wrong".into(),
                reported_at: UnixMillis(5),
            },
        )
    }

    #[test]
    fn a_sound_chain_verifies() {
        let (miner, job_key) = (key(1), key(2));
        let trusted = receipt(&key(3), JobId([7; 16]), [1; 32]);
        let signed = report(
            endpoint(&miner, JOB, &job_key),
            receipt(&job_key, JOB, [1; 32]),
            Some(trusted),
        );
        let verified = verify_report(&signed, Some(&miner.hotkey())).unwrap();
        assert_eq!(verified.miner(), miner.hotkey());
        assert_eq!(verified.reporter, key(9).hotkey());
        assert!(verify_report(&signed, None).is_ok());
    }

    #[test]
    fn forged_receipt_is_refused() {
        let (miner, job_key) = (key(1), key(2));
        let signed = report(
            endpoint(&miner, JOB, &job_key),
            receipt(&key(5), JOB, [1; 32]),
            None,
        );
        assert!(matches!(
            verify_report(&signed, Some(&miner.hotkey())),
            Err(ReportError::BadReceipt(VerifyError::WrongSigner { .. }))
        ));
        // Right signer, tampered signature.
        let good = receipt(&job_key, JOB, [1; 32]);
        let forged = Signed::from_parts(
            good.bytes().to_vec(),
            *good.signer(),
            crate::Signature::from_bytes([0; 64]),
        );
        let signed = report(endpoint(&miner, JOB, &job_key), forged, None);
        assert!(matches!(
            verify_report(&signed, Some(&miner.hotkey())),
            Err(ReportError::BadReceipt(VerifyError::BadSignature { .. }))
        ));
    }

    #[test]
    fn receipt_of_another_job_is_refused() {
        let (miner, job_key) = (key(1), key(2));
        let signed = report(
            endpoint(&miner, JOB, &job_key),
            receipt(&job_key, JobId([3; 16]), [1; 32]),
            None,
        );
        assert!(matches!(
            verify_report(&signed, Some(&miner.hotkey())),
            Err(ReportError::ReceiptOtherJob(_))
        ));
    }

    #[test]
    fn endpoint_signed_by_another_miner_is_refused() {
        let (miner, job_key) = (key(1), key(2));
        let signed = report(
            endpoint(&key(6), JOB, &job_key),
            receipt(&job_key, JOB, [1; 32]),
            None,
        );
        assert!(matches!(
            verify_report(&signed, Some(&miner.hotkey())),
            Err(ReportError::EndpointNotByMiner(
                VerifyError::WrongSigner { .. }
            ))
        ));
        let other_job = report(
            endpoint(&miner, JobId([8; 16]), &job_key),
            receipt(&job_key, JOB, [1; 32]),
            None,
        );
        assert!(matches!(
            verify_report(&other_job, None),
            Err(ReportError::EndpointOtherJob(_))
        ));
    }

    #[test]
    fn trusted_receipt_must_be_for_the_same_request_on_another_job() {
        let (miner, job_key) = (key(1), key(2));
        let other_request = receipt(&key(3), JobId([7; 16]), [9; 32]);
        let signed = report(
            endpoint(&miner, JOB, &job_key),
            receipt(&job_key, JOB, [1; 32]),
            Some(other_request),
        );
        assert!(matches!(
            verify_report(&signed, None),
            Err(ReportError::BadTrustedReceipt(_))
        ));
    }
}
