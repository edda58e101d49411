//! The directory of node records a node has discovered: each checked before it is kept, the
//! newest `seq` per hotkey wins, expired records are dropped.

use std::collections::HashMap;
use std::sync::Mutex;

use horde_protocol::{ExecutorClass, Hotkey, NodeAddr, NodeRecord, Role, Signed, UnixMillis};

/// The longest lifetime a record may claim: a record signed to live longer is refused, so a
/// leaked record cannot keep a dead node listed for long.
pub const MAX_RECORD_LIFETIME_MS: u64 = 10 * 60 * 1000;

/// How far a record's `expires_at` may exceed `now + MAX_RECORD_LIFETIME_MS` for clock skew.
const CLOCK_SKEW_MS: u64 = 60 * 1000;

/// Most addresses of each kind one record may list.
pub const MAX_RECORD_ADDRS: usize = 16;

/// Most executor classes one record may list.
pub const MAX_RECORD_CLASSES: usize = 64;

/// Most records a directory holds; records of unknown nodes beyond this are refused.
pub const MAX_DIRECTORY_RECORDS: usize = 4096;

/// Why a record was not kept.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RecordRejection {
    /// The signature does not verify, or the record does not decode.
    #[error("bad signature or encoding")]
    BadSignature,
    /// Signed by one key, naming another as the node.
    #[error("signed by {signer} but names {named}")]
    SignerMismatch {
        /// Who signed.
        signer: Hotkey,
        /// Whom the record names.
        named: Hotkey,
    },
    /// Presented as the sender's own record, but the sender's libp2p identity is another key.
    #[error("sent as its own by peer {peer} but names {named}")]
    PeerIdMismatch {
        /// The sending peer's hotkey (from its libp2p identity), or the peer id when it is not an
        /// ed25519 key.
        peer: String,
        /// Whom the record names.
        named: Hotkey,
    },
    /// `expires_at` is in the past.
    #[error("expired")]
    Expired,
    /// `expires_at` is further out than [`MAX_RECORD_LIFETIME_MS`].
    #[error("claims a lifetime beyond {MAX_RECORD_LIFETIME_MS} ms")]
    LifetimeTooLong,
    /// Too many addresses or classes.
    #[error("too large: {0}")]
    TooLarge(&'static str),
    /// A role that does not take part in discovery.
    #[error("role {0} is not published")]
    Role(Role),
}

/// Checks a record's signature, binding and limits; returns the record.
pub fn check_record(
    signed: &Signed<NodeRecord>,
    now: UnixMillis,
) -> Result<NodeRecord, RecordRejection> {
    let record = signed.verify().map_err(|_| RecordRejection::BadSignature)?;
    if record.hotkey != *signed.signer() {
        return Err(RecordRejection::SignerMismatch {
            signer: *signed.signer(),
            named: record.hotkey,
        });
    }
    if record.expires_at <= now {
        return Err(RecordRejection::Expired);
    }
    if record.expires_at.0 > now.0 + MAX_RECORD_LIFETIME_MS + CLOCK_SKEW_MS {
        return Err(RecordRejection::LifetimeTooLong);
    }
    if record.addrs.len() > MAX_RECORD_ADDRS {
        return Err(RecordRejection::TooLarge("addrs"));
    }
    if record.p2p_addrs.len() > MAX_RECORD_ADDRS {
        return Err(RecordRejection::TooLarge("p2p_addrs"));
    }
    if record.capacity.len() > MAX_RECORD_CLASSES {
        return Err(RecordRejection::TooLarge("capacity"));
    }
    match record.role {
        Role::Facilitator | Role::Validator | Role::Miner | Role::Storage => Ok(record),
        other => Err(RecordRejection::Role(other)),
    }
}

/// What became of an offered record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offer {
    /// A node not known before.
    New,
    /// A newer record of a known node.
    Updated,
    /// Not newer than the one held.
    Stale,
    /// The directory is full.
    Full,
}

#[derive(Debug, Clone)]
struct Entry {
    signed: Signed<NodeRecord>,
    record: NodeRecord,
}

/// The records a node knows. Shared by the discovery task (which fills it) and the roles
/// (which choose peers from it, and may wait for a change with [`Directory::subscribe`]).
#[derive(Debug, Default)]
pub struct Directory {
    entries: Mutex<HashMap<Hotkey, Entry>>,
    /// Counts the changes: a new or newer record kept, or records dropped on expiry.
    changes: tokio::sync::watch::Sender<u64>,
}

impl Directory {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Hotkey, Entry>> {
        self.entries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A receiver told of every change from now on (a record kept by [`offer`](Self::offer),
    /// records dropped by [`expire`](Self::expire)).
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn changed(&self) {
        self.changes.send_modify(|count| *count += 1);
    }

    /// Keeps a checked record if it is newer than the one held.
    pub fn offer(&self, signed: Signed<NodeRecord>, record: NodeRecord) -> Offer {
        let offer = self.offer_locked(signed, record);
        if matches!(offer, Offer::New | Offer::Updated) {
            self.changed();
        }
        offer
    }

    fn offer_locked(&self, signed: Signed<NodeRecord>, record: NodeRecord) -> Offer {
        let mut entries = self.lock();
        let full = entries.len() >= MAX_DIRECTORY_RECORDS;
        match entries.get_mut(&record.hotkey) {
            Some(held) if held.record.seq >= record.seq => Offer::Stale,
            Some(held) => {
                *held = Entry { signed, record };
                Offer::Updated
            }
            None if full => Offer::Full,
            None => {
                entries.insert(record.hotkey, Entry { signed, record });
                Offer::New
            }
        }
    }

    /// The `seq` of the record held for `hotkey` (expired or not).
    pub fn seq_of(&self, hotkey: &Hotkey) -> Option<u64> {
        self.lock().get(hotkey).map(|e| e.record.seq)
    }

    /// Whether the record held for `signed`'s signer is exactly `signed` (the same signed bytes):
    /// a copy of a record already held, known stale without decoding it. Most records of a
    /// directory answer are such copies (a joining node pulls the whole directory several
    /// times), and a byte comparison costs less than decoding the record for its `seq`.
    pub fn holds(&self, signed: &Signed<NodeRecord>) -> bool {
        self.lock()
            .get(signed.signer())
            .is_some_and(|held| held.signed.bytes() == signed.bytes())
    }

    /// The `incarnation` of the record held for `hotkey` (expired or not).
    pub fn incarnation_of(&self, hotkey: &Hotkey) -> Option<UnixMillis> {
        self.lock().get(hotkey).map(|e| e.record.incarnation)
    }

    /// How many records are held (expired ones not yet swept included).
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no record is held.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// Drops records expired at `now`; returns them.
    pub fn expire(&self, now: UnixMillis) -> Vec<NodeRecord> {
        let mut expired = Vec::new();
        self.lock().retain(|_, entry| {
            let live = entry.record.expires_at > now;
            if !live {
                expired.push(entry.record.clone());
            }
            live
        });
        if !expired.is_empty() {
            self.changed();
        }
        expired
    }

    /// When the first held record expires (`None`: none held). The discovery task sleeps until
    /// then instead of sweeping on a tick.
    pub fn next_expiry(&self) -> Option<UnixMillis> {
        self.lock().values().map(|e| e.record.expires_at).min()
    }

    /// The live record of `hotkey`.
    pub fn get(&self, hotkey: &Hotkey, now: UnixMillis) -> Option<NodeRecord> {
        self.lock()
            .get(hotkey)
            .filter(|e| e.record.expires_at > now)
            .map(|e| e.record.clone())
    }

    /// Every live record of `role`, ordered by hotkey (a stable order for round-robin choice).
    pub fn with_role(&self, role: Role, now: UnixMillis) -> Vec<NodeRecord> {
        let mut records: Vec<NodeRecord> = self
            .lock()
            .values()
            .filter(|e| e.record.role == role && e.record.expires_at > now)
            .map(|e| e.record.clone())
            .collect();
        records.sort_by_key(|r| r.hotkey);
        records
    }

    /// Every live signed record except `except`'s (for passing on).
    pub fn signed_records(&self, except: &Hotkey, now: UnixMillis) -> Vec<Signed<NodeRecord>> {
        self.lock()
            .values()
            .filter(|e| e.record.hotkey != *except && e.record.expires_at > now)
            .map(|e| e.signed.clone())
            .collect()
    }

    /// The first discovery address of every live record (the nodes a node may dial for its
    /// gossip mesh).
    pub fn p2p_addrs(&self, now: UnixMillis) -> Vec<(Hotkey, std::net::SocketAddr)> {
        self.lock()
            .values()
            .filter(|e| e.record.expires_at > now)
            .filter_map(|e| Some((e.record.hotkey, *e.record.p2p_addrs.first()?)))
            .collect()
    }

    /// How many live records of each role are held.
    pub fn count(&self, role: Role, now: UnixMillis) -> usize {
        self.lock()
            .values()
            .filter(|e| e.record.role == role && e.record.expires_at > now)
            .count()
    }
}

/// A discovered node as a peer address (hotkey and its QUIC addresses).
pub fn node_addr(record: &NodeRecord) -> NodeAddr {
    NodeAddr {
        hotkey: record.hotkey,
        addrs: record.addrs.clone(),
    }
}

/// How many free executors of `class` a miner's record offers.
pub fn free_of(record: &NodeRecord, class: &ExecutorClass) -> u32 {
    record
        .capacity
        .iter()
        .filter(|c| c.class == *class)
        .fold(0, |sum, c| sum.saturating_add(c.free))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use horde_protocol::{ClassCapacity, SecretKey, Signature};

    fn record(key: &SecretKey, role: Role, seq: u64, expires_at: u64) -> NodeRecord {
        NodeRecord {
            hotkey: key.hotkey(),
            role,
            addrs: vec![([127, 0, 0, 1], 4000).into()],
            p2p_addrs: vec![([127, 0, 0, 1], 5000).into()],
            capacity: vec![ClassCapacity {
                class: ExecutorClass("cpu".into()),
                free: 1,
                total: 2,
            }],
            version: "test".into(),
            seq,
            expires_at: UnixMillis(expires_at),
            incarnation: UnixMillis(1),
        }
    }

    const NOW: UnixMillis = UnixMillis(1_000_000);

    #[test]
    fn subscribers_hear_of_kept_and_expired_records_only() {
        let directory = Directory::default();
        let mut changes = directory.subscribe();
        let key = SecretKey::generate();
        let offer = |seq, expires_at| {
            let record = record(&key, Role::Miner, seq, expires_at);
            directory.offer(Signed::sign(&key, &record), record)
        };
        assert_eq!(directory.next_expiry(), None);
        assert_eq!(offer(2, NOW.0 + 5000), Offer::New);
        assert_eq!(directory.next_expiry(), Some(UnixMillis(NOW.0 + 5000)));
        assert!(changes.has_changed().unwrap());
        changes.mark_unchanged();
        assert_eq!(offer(1, NOW.0 + 5000), Offer::Stale);
        assert!(!changes.has_changed().unwrap());
        assert_eq!(offer(3, NOW.0 + 5000), Offer::Updated);
        assert!(changes.has_changed().unwrap());
        changes.mark_unchanged();
        assert!(directory.expire(NOW).is_empty());
        assert!(!changes.has_changed().unwrap());
        assert_eq!(directory.expire(UnixMillis(NOW.0 + 5000)).len(), 1);
        assert_eq!(directory.next_expiry(), None);
        assert!(changes.has_changed().unwrap());
    }

    #[test]
    fn a_copy_of_the_held_record_is_known_by_its_bytes() {
        let directory = Directory::default();
        let key = SecretKey::generate();
        let first = record(&key, Role::Miner, 2, NOW.0 + 5000);
        let signed = Signed::sign(&key, &first);
        assert!(!directory.holds(&signed));
        assert_eq!(directory.offer(signed.clone(), first), Offer::New);
        assert!(directory.holds(&signed));
        // Another record of the same node (newer or older) is not the one held.
        for seq in [1, 3] {
            assert!(!directory.holds(&Signed::sign(
                &key,
                &record(&key, Role::Miner, seq, NOW.0 + 5000)
            )));
        }
        // Nor is the same record of another node.
        let other = SecretKey::generate();
        assert!(!directory.holds(&Signed::sign(
            &other,
            &record(&other, Role::Miner, 2, NOW.0 + 5000)
        )));
    }

    #[test]
    fn a_good_record_passes() {
        let key = SecretKey::generate();
        let signed = Signed::sign(&key, &record(&key, Role::Miner, 1, NOW.0 + 5000));
        assert_eq!(check_record(&signed, NOW).unwrap().seq, 1);
    }

    #[test]
    fn forged_and_malformed_records_are_refused_with_their_reason() {
        let key = SecretKey::generate();
        let other = SecretKey::generate();
        // Signed by another key than the one it names.
        let signed = Signed::sign(&other, &record(&key, Role::Miner, 1, NOW.0 + 5000));
        assert!(matches!(
            check_record(&signed, NOW),
            Err(RecordRejection::SignerMismatch { .. })
        ));
        // A flipped signature bit.
        let good = Signed::sign(&key, &record(&key, Role::Miner, 1, NOW.0 + 5000));
        let mut sig = *good.signature().as_bytes();
        sig[7] ^= 1;
        let tampered = Signed::from_parts(
            good.bytes().to_vec(),
            key.hotkey(),
            Signature::from_bytes(sig),
        );
        assert_eq!(
            check_record(&tampered, NOW),
            Err(RecordRejection::BadSignature)
        );
        // Expired, and too long-lived.
        let old = Signed::sign(&key, &record(&key, Role::Miner, 1, NOW.0));
        assert_eq!(check_record(&old, NOW), Err(RecordRejection::Expired));
        let eternal = Signed::sign(&key, &record(&key, Role::Miner, 1, u64::MAX));
        assert_eq!(
            check_record(&eternal, NOW),
            Err(RecordRejection::LifetimeTooLong)
        );
        // Roles that are not published.
        let executor = Signed::sign(&key, &record(&key, Role::Executor, 1, NOW.0 + 5000));
        assert_eq!(
            check_record(&executor, NOW),
            Err(RecordRejection::Role(Role::Executor))
        );
        // Too many addresses.
        let mut big = record(&key, Role::Miner, 1, NOW.0 + 5000);
        big.addrs = vec![([127, 0, 0, 1], 1).into(); MAX_RECORD_ADDRS + 1];
        assert_eq!(
            check_record(&Signed::sign(&key, &big), NOW),
            Err(RecordRejection::TooLarge("addrs"))
        );
    }

    #[test]
    fn newest_seq_wins_and_expired_records_go() {
        let directory = Directory::default();
        let key = SecretKey::generate();
        let offer = |seq: u64, expires: u64| {
            let r = record(&key, Role::Miner, seq, expires);
            directory.offer(Signed::sign(&key, &r), r)
        };
        assert_eq!(offer(5, NOW.0 + 1000), Offer::New);
        assert_eq!(offer(5, NOW.0 + 9000), Offer::Stale);
        assert_eq!(offer(4, NOW.0 + 9000), Offer::Stale);
        assert_eq!(offer(6, NOW.0 + 2000), Offer::Updated);
        assert_eq!(directory.get(&key.hotkey(), NOW).unwrap().seq, 6);
        assert_eq!(directory.with_role(Role::Miner, NOW).len(), 1);
        assert!(directory.with_role(Role::Validator, NOW).is_empty());
        // Not listed once expired, even before the sweep; then swept.
        let later = UnixMillis(NOW.0 + 2000);
        assert!(directory.get(&key.hotkey(), later).is_none());
        assert_eq!(directory.count(Role::Miner, later), 0);
        assert_eq!(directory.expire(later).len(), 1);
        assert_eq!(offer(7, NOW.0 + 9000), Offer::New);
    }

    #[test]
    fn the_directory_is_bounded() {
        let directory = Directory::default();
        for _ in 0..MAX_DIRECTORY_RECORDS {
            let key = SecretKey::generate();
            let r = record(&key, Role::Miner, 1, NOW.0 + 1000);
            assert_eq!(directory.offer(Signed::sign(&key, &r), r), Offer::New);
        }
        let key = SecretKey::generate();
        let r = record(&key, Role::Miner, 1, NOW.0 + 1000);
        assert_eq!(directory.offer(Signed::sign(&key, &r), r), Offer::Full);
    }

    #[test]
    fn free_capacity_is_per_class() {
        let key = SecretKey::generate();
        let mut r = record(&key, Role::Miner, 1, NOW.0 + 1000);
        assert_eq!(free_of(&r, &ExecutorClass("cpu".into())), 1);
        assert_eq!(free_of(&r, &ExecutorClass("gpu".into())), 0);
        r.capacity[0].free = 0;
        assert_eq!(free_of(&r, &ExecutorClass("cpu".into())), 0);
    }
}
