//! Every versioned name and number horde puts on the wire, in one append-only table.
//!
//! | kind | name | value | where it is used |
//! |---|---|---|---|
//! | ALPN | [`ALPN_CONTROL`] | `horde/control/1` | job sessions, heartbeats, registration between nodes |
//! | ALPN | [`ALPN_BLOB`] | `horde/blob/1` | blob put/get/stat to and from storage |
//! | ALPN | [`ALPN_JOB`] | `horde/job/1` | client tunnels to a job endpoint |
//! | application error code | [`codes`] | `0`–`9` | closing a connection, stopping/resetting a stream |
//! | blob stop code | [`blob_stop`] | `0x10`–`0x12` | a blob receiver stopping its stream |
//! | discovery protocol | [`DISCOVERY_RECORDS`] | `/horde/records/2` | libp2p record exchange |
//! | discovery protocol | [`DISCOVERY_KAD`] | `/horde/kad/1` | horde's own Kademlia DHT; not spoken since nodes take their peers from the directory (reserved) |
//! | discovery protocol | [`DISCOVERY_IDENTIFY`] | `/horde/id/1` | libp2p identify version string; not spoken any more (reserved) |
//! | discovery protocol | [`DISCOVERY_GOSSIP`] | `/horde/meshsub` | gossipsub protocol prefix (`…/1.2.0` etc.) |
//! | gossip topic | [`DISCOVERY_GOSSIP_TOPIC`] | `horde/records/3` | signed node records (anonymous messages) |
//! | gossip topic | [`DISCOVERY_CAPACITY_TOPIC`] | `horde/capacity/1` | a miner's record re-signed for a capacity change, for the facilitator and validators only |
//! | signature domain tag | [`DOMAIN_TAGS`] | `horde/<purpose>/v1` | every signature (`tag ‖ exact bytes`) |
//!
//! # Changing the wire
//!
//! The table is **append-only**: a name or number, once released, keeps its meaning forever.
//! - A new field is a **new enum variant appended** at the end of its enum (postcard encodes the
//!   variant index, so old peers still decode every variant they know). Never add a field to an
//!   existing struct, never reorder or remove variants, never reuse a code.
//! - A change that cannot be expressed that way is a **new ALPN version** (`horde/control/1` →
//!   `horde/control/2`) served next to the old one for as long as peers speak it, with stored
//!   history (job records, receipts, blobs' outboards) still readable by the new code.
//! - A new signature purpose gets a new domain tag, listed in [`DOMAIN_TAGS`]; a changed meaning
//!   gets a new version suffix (`/v2`), never a reused tag.
//!
//! Signature domain tags stay beside their types ([`Signable::DOMAIN`]); [`DOMAIN_TAGS`] lists
//! them. A type whose tag is missing from that list cannot be signed or verified: the check is
//! made at compile time when [`Signed::sign`] or [`Signed::verify`] is instantiated for it.
//!
//! ```compile_fail,E0080
//! use horde_protocol::{SecretKey, Signable, Signed};
//!
//! #[derive(serde::Serialize, serde::Deserialize)]
//! struct Unlisted;
//! impl Signable for Unlisted {
//!     const DOMAIN: &'static str = "horde/unlisted/v1";
//! }
//! let _ = Signed::sign(&SecretKey::from_seed(&[1; 32]), &Unlisted);
//! ```
//!
//! [`Signable::DOMAIN`]: crate::Signable::DOMAIN
//! [`Signed::sign`]: crate::Signed::sign
//! [`Signed::verify`]: crate::Signed::verify

use crate::accounting::{AccountingReceipt, COUNTERSIGN_DOMAIN};
use crate::job::{JobSpec, TerminateRequest, VolumeList};
use crate::records::{ClientStreamSignature, EndpointRecord, JobReceipt, MinerReport, NodeRecord};
use crate::signed::Signable;

/// ALPN of job sessions, heartbeats and registration between nodes.
pub const ALPN_CONTROL: &[u8] = b"horde/control/1";
/// ALPN of blob transfers to and from storage.
pub const ALPN_BLOB: &[u8] = b"horde/blob/1";
/// ALPN of client tunnels to a job endpoint (certificate = the job key).
pub const ALPN_JOB: &[u8] = b"horde/job/1";

/// QUIC application error codes horde uses when it closes a connection or stops/resets a stream.
///
/// The numbers are part of the wire protocol: append new ones, never renumber. Transport wraps
/// them as `quinn::VarInt` (`horde_transport::codes`).
pub mod codes {
    /// Orderly shutdown: the node or the job is going away, nothing went wrong.
    pub const SHUTDOWN: u32 = 0;
    /// The peer sent something the protocol does not allow (bad frame, undecodable message,
    /// unexpected first message).
    pub const PROTOCOL_VIOLATION: u32 = 1;
    /// The peer announced a frame larger than the cap.
    pub const FRAME_TOO_LARGE: u32 = 2;
    /// The job this stream belonged to was cancelled or ended; the stream is no longer wanted.
    pub const CANCELLED: u32 = 3;
    /// The peer is authenticated but not allowed here (wrong role, wrong ALPN use).
    pub const NOT_ALLOWED: u32 = 4;
    /// The node is at capacity for this kind of work.
    pub const BUSY: u32 = 5;
    /// A local failure unrelated to the peer's behaviour.
    pub const INTERNAL: u32 = 6;
    /// The stream made no progress within its deadline: the peer sent nothing, or read nothing
    /// of what we sent, for that long. The stream is given up; its resources are released.
    pub const TIMED_OUT: u32 = 7;
    /// The node has no room for the data (disk full, quota or file size limit reached); the
    /// request itself was fine.
    pub const STORAGE_FULL: u32 = 8;
    /// The peer's key already holds its share of this node's connections
    /// (`max_connections_per_peer`); the extra connection is closed right after its handshake.
    /// Close one, or retry later.
    pub const TOO_MANY_CONNECTIONS: u32 = 9;

    /// Every code, in order: each is its index.
    pub const ALL: &[u32] = &[
        SHUTDOWN,
        PROTOCOL_VIOLATION,
        FRAME_TOO_LARGE,
        CANCELLED,
        NOT_ALLOWED,
        BUSY,
        INTERNAL,
        TIMED_OUT,
        STORAGE_FULL,
        TOO_MANY_CONNECTIONS,
    ];
}

/// Stop codes of a `horde/blob/1` receiver, apart from [`codes`] (from `0x10` on) so a stop
/// names what the receiver found wrong with the data.
pub mod blob_stop {
    /// The receiver found data that does not match the hash.
    pub const INTEGRITY: u32 = 0x10;
    /// The receiver refuses a blob larger than its limit.
    pub const TOO_LARGE: u32 = 0x11;
    /// The receiver no longer wants the data (cancelled, local failure).
    pub const CANCELLED: u32 = 0x12;

    /// Every blob stop code, in order.
    pub const ALL: &[u32] = &[INTEGRITY, TOO_LARGE, CANCELLED];
}

/// The libp2p record exchange protocol (request-response). `/2`: `NodeRecord` gained
/// `incarnation` (nodes of `/1` and `/2` do not exchange records; all nodes upgrade together).
pub const DISCOVERY_RECORDS: &str = "/horde/records/2";
/// horde's Kademlia protocol name (its own DHT, apart from any public one). Not spoken any more:
/// nodes take their gossip peers from the directory; kept so the name is never reused.
pub const DISCOVERY_KAD: &str = "/horde/kad/1";
/// The libp2p identify protocol version string. Not spoken any more (it fed Kademlia); kept so
/// the name is never reused.
pub const DISCOVERY_IDENTIFY: &str = "/horde/id/1";
/// horde's gossipsub protocol prefix (its own mesh, apart from any public one).
pub const DISCOVERY_GOSSIP: &str = "/horde/meshsub";
/// The gossip topic of signed node records. `/2` with `DISCOVERY_RECORDS`: a node of the old
/// version neither receives nor forwards records it could not decode, and is not penalised for
/// them. `/3`: record messages are anonymous (no gossipsub `from` or `seqno`; the record itself
/// is unchanged); a node of `/2` and one of `/3` would reject each other's messages, so they
/// do not share a topic.
pub const DISCOVERY_GOSSIP_TOPIC: &str = "horde/records/3";
/// The gossip topic of capacity changes: the same signed record messages, published by a miner
/// whose free executors changed, subscribed to only by the nodes that act on capacity (the
/// facilitator and the validators), so a change wakes those few instead of every node.
pub const DISCOVERY_CAPACITY_TOPIC: &str = "horde/capacity/1";

/// Every signature domain tag, one per signing purpose. The tags are defined beside their types
/// (`Signable::DOMAIN`) and in [`COUNTERSIGN_DOMAIN`]; this list is what makes them visible in
/// one place, and what [`is_listed_domain`] checks.
pub const DOMAIN_TAGS: &[&str] = &[
    JobSpec::DOMAIN,
    VolumeList::DOMAIN,
    TerminateRequest::DOMAIN,
    EndpointRecord::DOMAIN,
    NodeRecord::DOMAIN,
    ClientStreamSignature::DOMAIN,
    JobReceipt::DOMAIN,
    MinerReport::DOMAIN,
    AccountingReceipt::DOMAIN,
    COUNTERSIGN_DOMAIN,
];

/// Whether `tag` is one of [`DOMAIN_TAGS`] (usable in constants).
pub const fn is_listed_domain(tag: &str) -> bool {
    let mut index = 0;
    while index < DOMAIN_TAGS.len() {
        if bytes_equal(DOMAIN_TAGS[index].as_bytes(), tag.as_bytes()) {
            return true;
        }
        index += 1;
    }
    false
}

/// Returns `tag`, refusing (at compile time when used in a constant) one missing from
/// [`DOMAIN_TAGS`].
pub const fn listed_domain(tag: &'static str) -> &'static str {
    assert!(
        is_listed_domain(tag),
        "signature domain tag missing from horde_protocol::wire::DOMAIN_TAGS"
    );
    tag
}

const fn bytes_equal(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let mut index = 0;
    while index < a.len() {
        if a[index] != b[index] {
            return false;
        }
        index += 1;
    }
    true
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn every_signable_type_is_listed_once() {
        // Every `impl Signable` of this crate, by hand: adding one without listing it also fails
        // to compile as soon as it is signed (see `Signable::LISTED_DOMAIN`).
        let expected = [
            JobSpec::LISTED_DOMAIN,
            VolumeList::LISTED_DOMAIN,
            TerminateRequest::LISTED_DOMAIN,
            EndpointRecord::LISTED_DOMAIN,
            NodeRecord::LISTED_DOMAIN,
            ClientStreamSignature::LISTED_DOMAIN,
            JobReceipt::LISTED_DOMAIN,
            MinerReport::LISTED_DOMAIN,
            AccountingReceipt::LISTED_DOMAIN,
            listed_domain(COUNTERSIGN_DOMAIN),
        ];
        assert_eq!(DOMAIN_TAGS, expected);
        let unique: HashSet<_> = DOMAIN_TAGS.iter().collect();
        assert_eq!(unique.len(), DOMAIN_TAGS.len(), "duplicate domain tag");
        for tag in DOMAIN_TAGS {
            assert!(tag.starts_with("horde/"), "{tag}");
            let version = tag.rsplit_once("/v").map(|(_, v)| v);
            assert!(
                version.is_some_and(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit())),
                "{tag} does not end in /v<number>"
            );
        }
    }

    #[test]
    fn unlisted_tags_are_refused() {
        assert!(is_listed_domain("horde/job-spec/v1"));
        assert!(!is_listed_domain("horde/job-spec/v2"));
        assert!(!is_listed_domain("horde/job-spec/v"));
        assert!(!is_listed_domain(""));
    }

    #[test]
    fn codes_are_unique_and_dense() {
        for (index, code) in codes::ALL.iter().enumerate() {
            assert_eq!(
                *code as usize, index,
                "codes are numbered in order, none skipped"
            );
        }
        for code in blob_stop::ALL {
            assert!(
                !codes::ALL.contains(code),
                "blob stop code {code} reuses an error code"
            );
        }
        let unique: HashSet<_> = blob_stop::ALL.iter().collect();
        assert_eq!(unique.len(), blob_stop::ALL.len());
    }

    #[test]
    fn names_are_versioned_and_unique() {
        let alpns = [ALPN_CONTROL, ALPN_BLOB, ALPN_JOB];
        let discovery = [
            DISCOVERY_RECORDS,
            DISCOVERY_KAD,
            DISCOVERY_IDENTIFY,
            DISCOVERY_GOSSIP_TOPIC,
            DISCOVERY_CAPACITY_TOPIC,
        ];
        // gossipsub appends its own version (`/1.2.0`, …) to the prefix.
        assert!(DISCOVERY_GOSSIP.starts_with("/horde/") && !DISCOVERY_GOSSIP.ends_with('/'));
        let names: Vec<&[u8]> = alpns
            .into_iter()
            .chain(discovery.iter().map(|name| name.as_bytes()))
            .collect();
        let unique: HashSet<_> = names.iter().collect();
        assert_eq!(unique.len(), names.len());
        for name in names {
            let name = std::str::from_utf8(name).expect("ASCII names");
            let version = name.rsplit_once('/').map(|(_, v)| v).unwrap_or_default();
            assert!(
                !version.is_empty() && version.bytes().all(|b| b.is_ascii_digit()),
                "{name} does not end in /<version>"
            );
        }
    }
}
