//! The dialer: [`ConnectionCache`], one live connection per peer hotkey and ALPN, shared by
//! every caller.
//!
//! - **One dial at a time per key.** The first caller for a key dials; callers arriving while
//!   it does wait for that dial and get its outcome, its failure included (as the same
//!   `Arc<ConnectError>`), rather than each dialing in turn.
//! - **Failures are not cached.** Once a dial has failed, the next call dials again.
//! - **Closed connections are redialed**, and [`ConnectionCache::forget`] drops one the caller
//!   found dead before quinn noticed (a peer that restarted).
//! - **Cancel-safe.** A dialing caller that is dropped gives the dial up; the callers waiting for
//!   it dial afresh (one of them, the others wait for that one).
//! - **Bounded.** At most `max_peers` keys; a new key first evicts closed connections, then
//!   the least recently used live one (which stays open for whoever holds it).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use horde_protocol::{Hotkey, NodeAddr};
use quinn::VarInt;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::endpoint::{ConnectError, HordeEndpoint};

/// Default bound of a [`ConnectionCache`]: far above the peers a node talks to (a facilitator
/// reaches the validators and miners of one subnet, 256 nodes), small enough that a flood of
/// distinct keys cannot grow it without limit.
pub const DEFAULT_MAX_PEERS: usize = 1024;

/// Why [`ConnectionCache::connect`] returned no connection.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum DialError {
    /// The dial failed (shared by every caller that waited for it).
    #[error(transparent)]
    Connect(Arc<ConnectError>),
    /// Every slot of the cache holds a dial in flight.
    #[error("{0} dials are in flight already")]
    TooManyDials(usize),
}

/// What one dial produced, as its waiters see it.
type Outcome = Result<quinn::Connection, Arc<ConnectError>>;

/// The cache entry of one (hotkey, ALPN).
#[derive(Debug)]
enum Slot {
    /// A dial in flight; the value turns `Some` when it ends.
    Dialing(watch::Receiver<Option<Outcome>>),
    /// A connection, and when it was last handed out.
    Ready(quinn::Connection, Instant),
}

type Key = (Hotkey, Vec<u8>);

/// Live connections by peer hotkey and ALPN, dialed with one endpoint. Cheap to clone: clones
/// share the cache.
#[derive(Debug, Clone)]
pub struct ConnectionCache {
    endpoint: Arc<HordeEndpoint>,
    slots: Arc<Mutex<HashMap<Key, Slot>>>,
    max_peers: usize,
}

/// What a caller does after looking at the cache.
enum Step {
    Done(quinn::Connection),
    Wait(watch::Receiver<Option<Outcome>>),
    Dial(DialGuard),
}

impl ConnectionCache {
    /// A cache dialing with `endpoint`, holding at most [`DEFAULT_MAX_PEERS`] keys.
    pub fn new(endpoint: Arc<HordeEndpoint>) -> Self {
        Self::with_max_peers(endpoint, DEFAULT_MAX_PEERS)
    }

    /// A cache holding at most `max_peers` keys (at least one).
    pub fn with_max_peers(endpoint: Arc<HordeEndpoint>, max_peers: usize) -> Self {
        Self {
            endpoint,
            slots: Arc::default(),
            max_peers: max_peers.max(1),
        }
    }

    /// The endpoint dials go out from.
    pub fn endpoint(&self) -> &Arc<HordeEndpoint> {
        &self.endpoint
    }

    /// A live connection to `node` on `alpn`: the cached one, the outcome of the dial in flight,
    /// or a new dial over the node's addresses in turn.
    pub async fn connect(
        &self,
        node: &NodeAddr,
        alpn: &[u8],
    ) -> Result<quinn::Connection, DialError> {
        let key = (node.hotkey, alpn.to_vec());
        loop {
            match self.step(&key)? {
                Step::Done(connection) => return Ok(connection),
                Step::Dial(guard) => {
                    let outcome = self
                        .endpoint
                        .connect_node(node, alpn)
                        .await
                        .map_err(Arc::new);
                    guard.finish(outcome.clone());
                    return outcome.map_err(DialError::Connect);
                }
                Step::Wait(mut outcome) => match outcome.wait_for(Option::is_some).await {
                    Ok(outcome) => {
                        if let Some(outcome) = outcome.as_ref() {
                            return outcome.clone().map_err(DialError::Connect);
                        }
                    }
                    // The dialing caller was dropped: dial again (or wait for who does).
                    Err(_) => continue,
                },
            }
        }
    }

    /// Looks `key` up: a live connection, a dial to wait for, or a dial this caller makes.
    fn step(&self, key: &Key) -> Result<Step, DialError> {
        let mut slots = self.lock();
        match slots.get_mut(key) {
            Some(Slot::Ready(connection, used)) if connection.close_reason().is_none() => {
                *used = Instant::now();
                return Ok(Step::Done(connection.clone()));
            }
            Some(Slot::Dialing(outcome)) => return Ok(Step::Wait(outcome.clone())),
            Some(Slot::Ready(..)) => {
                slots.remove(key);
            }
            None => {}
        }
        if slots.len() >= self.max_peers {
            evict(&mut slots, self.max_peers)?;
        }
        let (sender, receiver) = watch::channel(None);
        slots.insert(key.clone(), Slot::Dialing(receiver.clone()));
        Ok(Step::Dial(DialGuard {
            slots: Arc::clone(&self.slots),
            key: key.clone(),
            receiver,
            sender: Some(sender),
        }))
    }

    /// Drops `connection` from the cache if it is the one held (a caller found it dead before
    /// quinn did), so the next [`Self::connect`] dials afresh.
    pub fn forget(&self, connection: &quinn::Connection) {
        self.lock().retain(|_, slot| match slot {
            Slot::Ready(held, _) => held.stable_id() != connection.stable_id(),
            Slot::Dialing(_) => true,
        });
    }

    /// Closes every cached connection with `code` and `reason` and empties the cache (dials in
    /// flight go on; their callers get their outcome).
    pub fn close_all(&self, code: VarInt, reason: &[u8]) {
        for connection in self.take_all() {
            connection.close(code, reason);
        }
    }

    /// Empties the cache and returns its connections, still open, for a caller that closes
    /// them and waits until their closes have left ([`crate::close_promptly`]). Dials in flight
    /// go on; their callers get their outcome.
    pub fn take_all(&self) -> Vec<quinn::Connection> {
        let mut taken = Vec::new();
        self.lock().retain(|_, slot| match slot {
            Slot::Ready(connection, _) => {
                taken.push(connection.clone());
                false
            }
            Slot::Dialing(_) => true,
        });
        taken
    }

    /// Keys held: live or closed connections, and dials in flight.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether the cache holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Slot>> {
        self.slots.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Makes room for one more key: drops closed connections, then the least recently used live
/// one. Dials in flight stay.
fn evict(slots: &mut HashMap<Key, Slot>, max: usize) -> Result<(), DialError> {
    slots.retain(|_, slot| match slot {
        Slot::Ready(connection, _) => connection.close_reason().is_none(),
        Slot::Dialing(_) => true,
    });
    if slots.len() < max {
        return Ok(());
    }
    let oldest = slots
        .iter()
        .filter_map(|(key, slot)| match slot {
            Slot::Ready(_, used) => Some((*used, key.clone())),
            Slot::Dialing(_) => None,
        })
        .min_by_key(|(used, _)| *used)
        .map(|(_, key)| key);
    match oldest {
        Some(key) => {
            slots.remove(&key);
            Ok(())
        }
        None => Err(DialError::TooManyDials(slots.len())),
    }
}

/// The dialing caller's claim on a key: publishes the outcome to the waiters, or, dropped
/// before that (the caller was cancelled), removes the claim so a waiter dials instead.
struct DialGuard {
    slots: Arc<Mutex<HashMap<Key, Slot>>>,
    key: Key,
    receiver: watch::Receiver<Option<Outcome>>,
    sender: Option<watch::Sender<Option<Outcome>>>,
}

impl DialGuard {
    fn finish(mut self, outcome: Outcome) {
        let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        if self.is_ours(&slots) {
            match &outcome {
                Ok(connection) => {
                    slots.insert(
                        self.key.clone(),
                        Slot::Ready(connection.clone(), Instant::now()),
                    );
                }
                // Not cached: the next call dials again.
                Err(_) => {
                    slots.remove(&self.key);
                }
            }
        }
        drop(slots);
        if let Some(sender) = self.sender.take() {
            sender.send_replace(Some(outcome));
        }
    }

    /// Whether the key's slot is still this dial (not evicted and replaced meanwhile).
    fn is_ours(&self, slots: &HashMap<Key, Slot>) -> bool {
        matches!(slots.get(&self.key), Some(Slot::Dialing(receiver)) if receiver.same_channel(&self.receiver))
    }
}

impl Drop for DialGuard {
    fn drop(&mut self) {
        if self.sender.is_none() {
            return;
        }
        let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        if self.is_ours(&slots) {
            slots.remove(&self.key);
        }
        // Dropping the sender wakes the waiters, who dial again.
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::time::Duration;

    use horde_protocol::SecretKey;

    use super::*;
    use crate::codes;
    use crate::endpoint::IncomingConnection;
    use crate::test_utils::{localhost_endpoint, seeded_key};
    use crate::tls::{ALPN_BLOB, ALPN_CONTROL};

    /// A listening endpoint that accepts (and keeps) every connection; returns its address
    /// and a count of the connections accepted.
    fn server(key: &SecretKey) -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
        let endpoint = localhost_endpoint(key);
        let addr = endpoint.local_addr().unwrap();
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = Arc::clone(&accepted);
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Some(next) = endpoint.accept().await {
                if let Ok(IncomingConnection { connection, .. }) = next {
                    count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    held.push(connection);
                }
            }
        });
        (addr, accepted)
    }

    fn node(key: &SecretKey, addr: SocketAddr) -> NodeAddr {
        NodeAddr {
            hotkey: key.hotkey(),
            addrs: vec![addr],
        }
    }

    fn cache() -> ConnectionCache {
        ConnectionCache::new(Arc::new(localhost_endpoint(&seeded_key(60))))
    }

    #[tokio::test]
    async fn concurrent_callers_share_one_dial_and_one_connection() {
        let key = seeded_key(61);
        let (addr, accepted) = server(&key);
        let cache = cache();
        let target = node(&key, addr);
        let (a, b, c) = tokio::join!(
            cache.connect(&target, ALPN_CONTROL),
            cache.connect(&target, ALPN_CONTROL),
            cache.connect(&target, ALPN_CONTROL),
        );
        let (a, b, c) = (a.unwrap(), b.unwrap(), c.unwrap());
        assert_eq!(a.stable_id(), b.stable_id());
        assert_eq!(a.stable_id(), c.stable_id());
        // Another ALPN is another connection.
        let blob = cache.connect(&target, ALPN_BLOB).await.unwrap();
        assert_ne!(blob.stable_id(), a.stable_id());
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 2);
        assert_eq!(cache.len(), 2);
    }

    #[tokio::test]
    async fn waiters_share_a_failed_dial_and_the_next_call_dials_again() {
        let key = seeded_key(62);
        let (addr, _) = server(&key);
        let cache = cache();
        // The server presents `key`, not the hotkey we ask for: every dial fails its check.
        let impostor = NodeAddr {
            hotkey: seeded_key(63).hotkey(),
            addrs: vec![addr],
        };
        let (a, b) = tokio::join!(
            cache.connect(&impostor, ALPN_CONTROL),
            cache.connect(&impostor, ALPN_CONTROL),
        );
        let (DialError::Connect(a), DialError::Connect(b)) = (a.unwrap_err(), b.unwrap_err())
        else {
            panic!("expected dial failures");
        };
        assert!(Arc::ptr_eq(&a, &b), "one dial, its failure shared");
        assert!(cache.is_empty(), "a failure is not cached");

        // The same hotkey with no address fails at once; with one, the next call connects.
        let (addr, _) = server(&seeded_key(63));
        let mut target = node(&seeded_key(63), addr);
        target.addrs.clear();
        let error = cache.connect(&target, ALPN_CONTROL).await.unwrap_err();
        assert!(matches!(&error, DialError::Connect(e) if matches!(**e, ConnectError::NoAddress)));
        target.addrs.push(addr);
        cache.connect(&target, ALPN_CONTROL).await.unwrap();
    }

    #[tokio::test]
    async fn a_closed_or_forgotten_connection_is_redialed() {
        let key = seeded_key(64);
        let (addr, accepted) = server(&key);
        let cache = cache();
        let target = node(&key, addr);
        let first = cache.connect(&target, ALPN_CONTROL).await.unwrap();
        first.close(codes::SHUTDOWN, b"done");
        let second = cache.connect(&target, ALPN_CONTROL).await.unwrap();
        assert_ne!(first.stable_id(), second.stable_id());
        cache.forget(&second);
        let third = cache.connect(&target, ALPN_CONTROL).await.unwrap();
        assert_ne!(second.stable_id(), third.stable_id());
        assert_eq!(
            cache
                .connect(&target, ALPN_CONTROL)
                .await
                .unwrap()
                .stable_id(),
            third.stable_id()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn the_cache_is_bounded_and_evicts_the_least_recently_used() {
        let endpoint = Arc::new(localhost_endpoint(&seeded_key(60)));
        let cache = ConnectionCache::with_max_peers(endpoint, 2);
        let keys = [seeded_key(65), seeded_key(66), seeded_key(67)];
        let targets: Vec<NodeAddr> = keys.iter().map(|key| node(key, server(key).0)).collect();
        let first = cache.connect(&targets[0], ALPN_CONTROL).await.unwrap();
        let second = cache.connect(&targets[1], ALPN_CONTROL).await.unwrap();
        // Using the first makes the second the least recently used.
        tokio::time::sleep(Duration::from_millis(5)).await;
        cache.connect(&targets[0], ALPN_CONTROL).await.unwrap();
        cache.connect(&targets[2], ALPN_CONTROL).await.unwrap();
        assert_eq!(cache.len(), 2);
        assert_eq!(
            cache
                .connect(&targets[0], ALPN_CONTROL)
                .await
                .unwrap()
                .stable_id(),
            first.stable_id()
        );
        // The evicted connection still works for whoever holds it.
        assert!(second.close_reason().is_none());
        cache.close_all(codes::SHUTDOWN, b"bye");
        assert!(cache.is_empty());
        assert!(first.close_reason().is_some());
    }

    #[tokio::test]
    async fn a_cancelled_dial_leaves_no_claim_behind() {
        // A UDP socket that never answers: the dial hangs until it is dropped.
        let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let target = node(&seeded_key(68), silent.local_addr().unwrap());
        let cache = cache();
        let dial = tokio::time::timeout(
            Duration::from_millis(100),
            cache.connect(&target, ALPN_CONTROL),
        );
        assert!(dial.await.is_err(), "still dialing");
        assert!(cache.is_empty(), "the abandoned dial's claim is gone");
    }
}
