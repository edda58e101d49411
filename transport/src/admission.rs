//! Admission that favours known peers: an endpoint with [`AdmissionLimits`] bounds what keys it
//! does not know (see [`KnownKeys`]) can hold of its connection slots, so a flood of fresh
//! self-signed keys cannot lock out its peers and users.
//!
//! - **Per source address**, before the handshake: one IP address has at most
//!   `max_unknown_per_address` connections handshaking or held by unknown keys at once; more are
//!   refused (`CONNECTION_REFUSED`) before any handshake work. A known key's connection gives its
//!   address slot back as soon as its handshake has named the key.
//! - **In total**, after the handshake: unknown keys together hold at most `max_unknown`
//!   connections; one more is closed with [`codes::BUSY`].
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

use std::collections::HashMap;
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
    unknown: usize,
    per_address: HashMap<IpAddr, usize>,
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

    /// A slot of the unknown keys' share; `None` when they hold all of it.
    pub(crate) fn try_unknown(self: &Arc<Self>) -> Option<UnknownSlot> {
        let mut counts = self.lock();
        if counts.unknown >= self.limits.max_unknown {
            return None;
        }
        counts.unknown += 1;
        Some(UnknownSlot {
            admission: Arc::clone(self),
        })
    }

    /// Connections unknown keys hold now, in total and from `address` (with handshakes).
    pub(crate) fn held(&self, address: IpAddr) -> (usize, usize) {
        let counts = self.lock();
        (
            counts.unknown,
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
}

impl Drop for UnknownSlot {
    fn drop(&mut self) {
        let mut counts = self.admission.lock();
        counts.unknown = counts.unknown.saturating_sub(1);
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

    #[test]
    fn slots_are_bounded_per_address_and_in_total_and_given_back() {
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
        let unknown: Vec<_> = (0..3).map(|_| admission.try_unknown().unwrap()).collect();
        assert!(admission.try_unknown().is_none());
        drop(unknown);
        assert_eq!(admission.held(b), (0, 1));
        assert!(admission.try_unknown().is_some());
    }
}
