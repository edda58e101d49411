//! Admission that favours known peers: an endpoint with [`AdmissionLimits`] bounds what keys it
//! does not know (see [`KnownKeys`]) can hold of its connection slots, so a flood of fresh
//! self-signed keys cannot lock out its peers and users.
//!
//! - **Per source address**, before the handshake: one IP address has at most
//!   `max_unknown_per_address` connections handshaking or held by unknown keys at once; more are
//!   refused (`CONNECTION_REFUSED`) before any handshake work. A known key's connection gives its
//!   address slot back as soon as its handshake has named the key.
//! - **In total**, after the handshake: unknown keys together hold at most `max_unknown`
//!   connections. One more is admitted all the same, and makes room: the unknown connections
//!   whose keys have become known since their handshake (an account with a job in flight now)
//!   leave the share, and if none did, one connection of the source address that holds the most
//!   of the share (its oldest) is closed with [`codes::BUSY`]. A new client is thus never turned
//!   away by connections that were there before it (refusing the newcomer, as this did until
//!   2026-12-08, let four addresses that each hold their 8 with a stream open lock every new
//!   user out for as long as they liked), and a flood's connections push out each other before
//!   they push out a client from an address of its own: to reach it, a flood must hold no more
//!   than one connection per address, from as many addresses as the share has slots (32 by
//!   default), and then pushes it out only after that many newer handshakes (a client whose
//!   connection is closed tries once more on a new one). Addresses count one by one, also
//!   IPv6 ones, of which one host may hold a whole /64: an endpoint facing IPv6 clients is
//!   weaker here.
//! - **Idle**: an unknown key's connection that has opened no stream `first_stream_timeout` after
//!   its handshake is closed with [`codes::TIMED_OUT`] (every horde client opens its first stream
//!   at once; keep-alives would otherwise hold an idle one open for ever).
//!
//! Defaults ([`AdmissionLimits::for_max_connections`]) are derived from the connection cap, and
//! so from memory (`RECEIVE_BUFFER_BUDGET / RECEIVE_WINDOW`): unknown keys share a quarter of the
//! slots (32 of the default 128, 1 GiB of worst-case receive buffering), one address a quarter of
//! that (8), so the other three quarters stay for known peers and no single address can take
//! even the unknown share.
//!
//! [`codes::BUSY`]: crate::codes::BUSY
//! [`codes::TIMED_OUT`]: crate::codes::TIMED_OUT

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use horde_protocol::Hotkey;

/// Which keys an endpoint knows (its discovered peers, keys with jobs in flight, …). Asked once
/// per connection, right after the handshake.
pub trait KnownKeys: Send + Sync + std::fmt::Debug {
    /// Whether `key` is known.
    fn is_known(&self, key: &Hotkey) -> bool;
}

/// The share of the connection slots unknown keys hold together: 1/4.
pub const UNKNOWN_SHARE_DIVISOR: usize = 4;

/// The share of the unknown keys' slots one source address may hold: 1/4 of them.
pub const UNKNOWN_PER_ADDRESS_DIVISOR: usize = 4;

/// How long an unknown key's connection may stay without opening a stream: 5 s. A horde client
/// opens its first stream right after its handshake (milliseconds); five seconds leaves room for
/// a slow, lossy link.
pub const FIRST_STREAM_TIMEOUT: Duration = Duration::from_secs(5);

/// What unknown keys may hold of an endpoint's connections.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdmissionLimits {
    /// Connections unknown keys hold together.
    pub max_unknown: usize,
    /// Connections one source address holds while handshaking or as an unknown key.
    pub max_unknown_per_address: usize,
    /// How long an unknown key's connection may stay without opening a stream.
    pub first_stream_timeout: Duration,
}

impl AdmissionLimits {
    /// The defaults for an endpoint of `max_connections` slots (see the module docs); at least
    /// one connection each.
    pub fn for_max_connections(max_connections: usize) -> Self {
        let max_unknown = (max_connections / UNKNOWN_SHARE_DIVISOR).max(1);
        Self {
            max_unknown,
            max_unknown_per_address: (max_unknown / UNKNOWN_PER_ADDRESS_DIVISOR).max(1),
            first_stream_timeout: FIRST_STREAM_TIMEOUT,
        }
    }
}

#[derive(Debug, Default)]
struct Counts {
    /// The connections unknown keys hold, by admission number: oldest first.
    unknown: BTreeMap<u64, Held>,
    /// The next admission number.
    next: u64,
    per_address: HashMap<IpAddr, usize>,
}

/// How an unknown key's connection is closed to make room for a newer one.
pub(crate) trait Evict: Send + Sync + std::fmt::Debug {
    fn evict(&self);
}

impl Evict for quinn::Connection {
    fn evict(&self) {
        self.close(
            crate::codes::BUSY,
            b"unknown keys hold their share of connections; one of the address holding the most makes room",
        );
    }
}

/// One connection an unknown key holds.
#[derive(Debug)]
struct Held {
    key: Hotkey,
    address: IpAddr,
    connection: Box<dyn Evict>,
}

impl Counts {
    /// The connection to evict for a newcomer: the oldest of the address holding the most.
    fn eviction_candidate(&self) -> Option<u64> {
        let mut per_address: HashMap<IpAddr, usize> = HashMap::new();
        for held in self.unknown.values() {
            *per_address.entry(held.address).or_insert(0) += 1;
        }
        let most = per_address.values().copied().max()?;
        self.unknown
            .iter()
            .find(|(_, held)| per_address.get(&held.address) == Some(&most))
            .map(|(number, _)| *number)
    }
}

/// The endpoint's admission state: the limits, the known keys (set once the role that knows
/// them has started) and what unknown keys hold now.
#[derive(Debug)]
pub(crate) struct Admission {
    limits: AdmissionLimits,
    known: OnceLock<Arc<dyn KnownKeys>>,
    counts: Mutex<Counts>,
}

impl Admission {
    pub(crate) fn new(limits: AdmissionLimits) -> Self {
        Self {
            limits,
            known: OnceLock::new(),
            counts: Mutex::new(Counts::default()),
        }
    }

    pub(crate) fn limits(&self) -> &AdmissionLimits {
        &self.limits
    }

    /// Sets the known keys; `false` if they were set already.
    pub(crate) fn set_known(&self, known: Arc<dyn KnownKeys>) -> bool {
        self.known.set(known).is_ok()
    }

    /// Whether `key` is known (no known keys set yet: none is).
    pub(crate) fn is_known(&self, key: &Hotkey) -> bool {
        self.known.get().is_some_and(|known| known.is_known(key))
    }

    /// A slot of `address`'s share, taken before the handshake; `None` when it holds its share.
    pub(crate) fn try_address(self: &Arc<Self>, address: IpAddr) -> Option<AddressSlot> {
        let mut counts = self.lock();
        let held = counts.per_address.get(&address).copied().unwrap_or(0);
        if held >= self.limits.max_unknown_per_address {
            return None;
        }
        *counts.per_address.entry(address).or_insert(0) += 1;
        Some(AddressSlot {
            admission: Arc::clone(self),
            address,
        })
    }

    /// A slot of the unknown keys' share for `key`'s `connection` from `address`. When they
    /// hold all of it, the connections whose keys are known by now leave it, and if none did,
    /// the oldest connection of the address holding the most is evicted (closed with `BUSY`);
    /// whether one was.
    pub(crate) fn admit_unknown(
        self: &Arc<Self>,
        key: Hotkey,
        address: IpAddr,
        connection: Box<dyn Evict>,
    ) -> (UnknownSlot, bool) {
        let full = |counts: &Counts| counts.unknown.len() >= self.limits.max_unknown;
        // Asked without the lock held (the known keys are the role's, behind locks of its own),
        // oldest first, up to the first known: one connection leaving makes the room needed.
        let snapshot: Vec<(u64, Hotkey)> = {
            let counts = self.lock();
            if full(&counts) {
                counts
                    .unknown
                    .iter()
                    .map(|(n, held)| (*n, held.key))
                    .collect()
            } else {
                Vec::new()
            }
        };
        let known_now = snapshot
            .into_iter()
            .find(|(_, key)| self.is_known(key))
            .map(|(number, _)| number);
        let (number, evicted) = {
            let mut counts = self.lock();
            if let Some(number) = known_now {
                counts.unknown.remove(&number);
            }
            let evicted = if full(&counts) {
                counts
                    .eviction_candidate()
                    .and_then(|number| counts.unknown.remove(&number))
                    .map(|held| held.connection)
            } else {
                None
            };
            let number = counts.next;
            counts.next += 1;
            counts.unknown.insert(
                number,
                Held {
                    key,
                    address,
                    connection,
                },
            );
            (number, evicted)
        };
        let was_evicted = evicted.is_some();
        if let Some(connection) = evicted {
            connection.evict();
        }
        (
            UnknownSlot {
                admission: Arc::clone(self),
                number,
            },
            was_evicted,
        )
    }

    /// Connections unknown keys hold now, in total and from `address` (with handshakes).
    pub(crate) fn held(&self, address: IpAddr) -> (usize, usize) {
        let counts = self.lock();
        (
            counts.unknown.len(),
            counts.per_address.get(&address).copied().unwrap_or(0),
        )
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Counts> {
        // Every update is one statement: the counts stay consistent under a panic elsewhere.
        self.counts.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One connection of a source address (handshaking, or held by an unknown key); dropping it
/// gives the slot back.
#[derive(Debug)]
pub(crate) struct AddressSlot {
    admission: Arc<Admission>,
    address: IpAddr,
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut counts = self.admission.lock();
        if let Some(held) = counts.per_address.get_mut(&self.address) {
            *held = held.saturating_sub(1);
            if *held == 0 {
                counts.per_address.remove(&self.address);
            }
        }
    }
}

/// One connection held by an unknown key; dropping it gives the slot back.
#[derive(Debug)]
pub(crate) struct UnknownSlot {
    admission: Arc<Admission>,
    number: u64,
}

impl Drop for UnknownSlot {
    fn drop(&mut self) {
        // Gone already when it was evicted, or left the share once its key became known.
        let held = self.admission.lock().unknown.remove(&self.number);
        drop(held);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_follow_the_connection_cap() {
        let limits = AdmissionLimits::for_max_connections(128);
        assert_eq!(limits.max_unknown, 32);
        assert_eq!(limits.max_unknown_per_address, 8);
        let tiny = AdmissionLimits::for_max_connections(1);
        assert_eq!((tiny.max_unknown, tiny.max_unknown_per_address), (1, 1));
    }

    /// A connection of the tests: evicting it sets its flag.
    #[derive(Debug, Default)]
    struct TestConnection(Arc<std::sync::atomic::AtomicBool>);

    impl Evict for TestConnection {
        fn evict(&self) {
            self.0.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }

    /// Known keys of the tests: those listed.
    #[derive(Debug, Default)]
    struct Listed(Mutex<Vec<Hotkey>>);

    impl KnownKeys for Listed {
        fn is_known(&self, key: &Hotkey) -> bool {
            self.0.lock().unwrap().contains(key)
        }
    }

    /// Test key number `n` (the same key for the same number in one test run).
    fn key(n: u8) -> Hotkey {
        static KEYS: OnceLock<Vec<Hotkey>> = OnceLock::new();
        KEYS.get_or_init(|| {
            (0..8)
                .map(|_| horde_protocol::SecretKey::generate().hotkey())
                .collect()
        })[usize::from(n)]
    }

    fn test_connection() -> (Box<dyn Evict>, Arc<std::sync::atomic::AtomicBool>) {
        let evicted = Arc::new(std::sync::atomic::AtomicBool::new(false));
        (Box::new(TestConnection(Arc::clone(&evicted))), evicted)
    }

    #[test]
    fn slots_are_bounded_per_address_and_given_back() {
        let admission = Arc::new(Admission::new(AdmissionLimits {
            max_unknown: 3,
            max_unknown_per_address: 2,
            first_stream_timeout: FIRST_STREAM_TIMEOUT,
        }));
        let a: IpAddr = [127, 0, 0, 2].into();
        let b: IpAddr = [127, 0, 0, 1].into();
        let first = admission.try_address(a).unwrap();
        let _second = admission.try_address(a).unwrap();
        assert!(admission.try_address(a).is_none());
        let _other = admission.try_address(b).unwrap();
        drop(first);
        assert!(admission.try_address(a).is_some());
        let unknown: Vec<_> = (0..3)
            .map(|n| admission.admit_unknown(key(n), a, test_connection().0).0)
            .collect();
        assert_eq!(admission.held(b), (3, 1));
        drop(unknown);
        assert_eq!(admission.held(b), (0, 1));
    }

    /// A newcomer past the unknown share is admitted: keys known since their handshake leave
    /// the share first; otherwise the oldest connection of the address holding the most is
    /// evicted, never the newcomer, and never a lone connection of an address of its own while
    /// another address holds more.
    #[test]
    fn a_full_share_makes_room_for_a_newcomer() {
        let admission = Arc::new(Admission::new(AdmissionLimits {
            max_unknown: 4,
            max_unknown_per_address: 4,
            first_stream_timeout: FIRST_STREAM_TIMEOUT,
        }));
        let known = Arc::new(Listed::default());
        assert!(admission.set_known(Arc::clone(&known) as Arc<dyn KnownKeys>));
        let (flood, user): (IpAddr, IpAddr) = ([127, 0, 0, 2].into(), [127, 0, 0, 1].into());
        let mut held = Vec::new();
        let mut flags: Vec<Arc<std::sync::atomic::AtomicBool>> = Vec::new();
        let mut admit = |n: u8, address: IpAddr, flags: &mut Vec<_>| {
            let (connection, evicted) = test_connection();
            let (slot, made_room) = admission.admit_unknown(key(n), address, connection);
            held.push(slot);
            flags.push(evicted);
            made_room
        };
        // The user first (number 0), then the flood fills the share.
        assert!(!admit(0, user, &mut flags));
        for n in 1..4 {
            assert!(!admit(n, flood, &mut flags));
        }
        // Key 2 has a job in flight now: it leaves the share, nobody is evicted.
        known.0.lock().unwrap().push(key(2));
        assert!(!admit(4, flood, &mut flags));
        // Full of unknown keys: the flood's oldest (1, then 3, then 4) makes room each time,
        // never the user's older lone connection, never the newcomer.
        for (n, evicted) in [(5u8, vec![1usize]), (6, vec![1, 3]), (7, vec![1, 3, 4])] {
            assert!(admit(n, flood, &mut flags));
            let gone: Vec<usize> = (0..flags.len())
                .filter(|i| flags[*i].load(std::sync::atomic::Ordering::SeqCst))
                .collect();
            assert_eq!(gone, evicted);
        }
        assert!(!flags[0].load(std::sync::atomic::Ordering::SeqCst));
        assert_eq!(admission.held(elsewhere()).0, 4);
        // Dropping every slot, evicted ones included, gives the share back once.
        drop(held);
        assert_eq!(admission.held(elsewhere()).0, 0);
    }

    /// An address holding nothing.
    fn elsewhere() -> IpAddr {
        [127, 0, 0, 9].into()
    }
}
