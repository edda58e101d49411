//! [`PeerQuota`]: a per-hotkey share of a shared limit, so one authenticated key cannot take all
//! of it (the endpoint's connections, a storage node's transfer slots).
//!
//! A [`PeerPermit`] counts one use by one peer until it is dropped. The table holds an entry only
//! for peers holding at least one permit: an entry is removed when its count drops to zero, so it
//! never holds more entries than permits are out, and the caller bounds those with its own total
//! cap.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use horde_protocol::Hotkey;

/// Counts what each peer holds of a shared limit and refuses a peer past `max_per_peer`.
#[derive(Debug)]
pub struct PeerQuota {
    max_per_peer: usize,
    held: Mutex<HashMap<Hotkey, usize>>,
}

impl PeerQuota {
    /// A quota allowing each peer `max_per_peer` permits at once (0 refuses everyone).
    pub fn new(max_per_peer: usize) -> Self {
        Self {
            max_per_peer,
            held: Mutex::new(HashMap::new()),
        }
    }

    /// Permits each peer may hold at once.
    pub fn max_per_peer(&self) -> usize {
        self.max_per_peer
    }

    /// One more permit for `peer`, `None` when it already holds its share.
    pub fn try_acquire(self: &Arc<Self>, peer: Hotkey) -> Option<PeerPermit> {
        let mut held = self.lock();
        if held.get(&peer).copied().unwrap_or(0) >= self.max_per_peer {
            return None;
        }
        *held.entry(peer).or_insert(0) += 1;
        Some(PeerPermit {
            quota: Arc::clone(self),
            peer,
        })
    }

    /// Permits `peer` holds now.
    pub fn held_by(&self, peer: &Hotkey) -> usize {
        self.lock().get(peer).copied().unwrap_or(0)
    }

    /// Peers holding at least one permit: the size of the table.
    pub fn peers(&self) -> usize {
        self.lock().len()
    }

    fn release(&self, peer: &Hotkey) {
        let mut held = self.lock();
        if let Some(count) = held.get_mut(peer) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                held.remove(peer);
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Hotkey, usize>> {
        // The counts stay consistent under a panic elsewhere: every update is one statement.
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One use of a [`PeerQuota`] by one peer; dropping it gives the use back.
#[derive(Debug)]
pub struct PeerPermit {
    quota: Arc<PeerQuota>,
    peer: Hotkey,
}

impl PeerPermit {
    /// The peer this permit counts against.
    pub fn peer(&self) -> Hotkey {
        self.peer
    }
}

impl Drop for PeerPermit {
    fn drop(&mut self) {
        self.quota.release(&self.peer);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_utils::seeded_key;

    #[test]
    fn each_peer_gets_its_share_and_the_table_empties() {
        let quota = Arc::new(PeerQuota::new(2));
        let (a, b) = (seeded_key(1).hotkey(), seeded_key(2).hotkey());
        let first = quota.try_acquire(a).unwrap();
        let second = quota.try_acquire(a).unwrap();
        assert!(quota.try_acquire(a).is_none(), "a third for one peer");
        assert_eq!(quota.held_by(&a), 2);
        let other = quota
            .try_acquire(b)
            .expect("another peer still gets its share");
        assert_eq!(other.peer(), b);
        assert_eq!(quota.peers(), 2);

        drop(first);
        assert_eq!(quota.held_by(&a), 1);
        let again = quota
            .try_acquire(a)
            .expect("a released permit can be taken again");
        drop((second, again, other));
        assert_eq!(quota.held_by(&a), 0);
        assert_eq!(quota.peers(), 0, "peers holding nothing leave the table");
    }

    #[test]
    fn a_zero_share_refuses_without_keeping_an_entry() {
        let quota = Arc::new(PeerQuota::new(0));
        assert!(quota.try_acquire(seeded_key(1).hotkey()).is_none());
        assert_eq!(quota.peers(), 0);
    }
}
