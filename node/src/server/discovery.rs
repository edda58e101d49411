//! Discovery: every node but executors runs a libp2p swarm beside its QUIC endpoint, joins
//! through its bootstrap peers, spreads signed [`NodeRecord`]s on gossipsub and fetches whole
//! directories over `/horde/records/2` (request-response) when it joins. Its gossip peers come
//! from the directory itself: every record names its node's discovery addresses, and a node dials
//! a few nodes it learned (`task::MESH_DIALS`), and once it has them it closes the connection it
//! dialed to its bootstrap peer (`task::LEAVE_PEERS`; dialed again when it is cut off).
//!
//! Identity: the libp2p key is the node's hotkey (same ed25519 secret), so a `PeerId` and a hotkey
//! name the same node and a bootstrap peer can be written `HOTKEY@IP:PORT`. Transport: libp2p's
//! QUIC (quinn + rustls with ring, like the rest of horde) on its own UDP port.
//!
//! Records: each node signs `NodeRecord {hotkey, role, QUIC addresses, discovery addresses,
//! executor capacity, version, seq, expires_at, incarnation}`, re-signs it with a higher `seq` 15 s before it
//! expires (`task::refresh_interval`) and (coalesced to one per 100 ms) when its capacity changes, and publishes it on
//! the gossip topic. Every gossiped record is judged before gossipsub forwards it (bad records are
//! rejected and their sender penalised, stale ones ignored); records from the record exchange pass
//! [`check_record`], and one sent as the sender's own must name the sender's `PeerId`. The newest
//! `seq` per hotkey wins; expired records are swept when the first of them runs out; the
//! directory is kept on disk for restarts. A record of a known node with a later `incarnation`
//! (a restarted node) closes the connections to its old run at once, and the node is connected
//! afresh (see `SwarmTask::restarted` in `task/connections.rs`); a node that stops closes its
//! connections first, so its peers learn at once.
//!
//! Threads: the swarm runs on a thread of its own (`discovery`) with a single-threaded runtime,
//! so that an idle node's packets and timers wake one thread (see [`Discovery::start`]).
//!
//! Layout: `discovery.rs` (config, identities, the swarm, the record exchange),
//! `discovery/task.rs` (the swarm task: publishing, judging, fetching, keeping on disk),
//! `discovery/gossip.rs` (the gossipsub settings and the record check of gossip messages),
//! `discovery/directory.rs` (the node-record directory: newest `seq` wins, expiry),
//! `discovery/socket.rs` (the listener's UDP receive buffer, which libp2p does not set).

mod directory;
mod gossip;
mod socket;
mod task;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use futures::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, StreamExt as _};
use horde_protocol::codec::{FRAME_HEADER_LEN, encode_frame, frame_len, from_bytes_exact};
use horde_protocol::{ClassCapacity, Hotkey, NodeAddr, NodeRecord, RecordSync, Role, SecretKey};
use libp2p::multiaddr::Protocol;
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{Multiaddr, PeerId, StreamProtocol, Swarm};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument as _, debug, info, info_span, warn};

pub use gossip::{
    MAX_RECORD_BYTES, behaviour as gossip_behaviour, capacity_topic as capacity_gossip_topic,
    encode as gossip_encode, message_id, score_thresholds, topic as gossip_topic,
};
pub use task::{CAPACITY_COALESCE, DIRECTORY_FILE, LATENCY_TARGET, refresh_interval};

pub use directory::{
    Directory, MAX_DIRECTORY_RECORDS, MAX_RECORD_ADDRS, MAX_RECORD_CLASSES, MAX_RECORD_LIFETIME_MS,
    Offer, RecordRejection, check_record, free_of, node_addr,
};

use crate::clock::now;

/// The record exchange protocol.
pub const PROTOCOL_RECORDS: StreamProtocol =
    StreamProtocol::new(horde_protocol::wire::DISCOVERY_RECORDS);

/// Largest encoded [`RecordSync`] accepted or sent.
pub const MAX_SYNC_BYTES: u32 = 1024 * 1024;
/// Most records one [`RecordSync`] carries (a full directory answer is cut to this).
pub const MAX_SYNC_RECORDS: usize = 1024;
/// Most streams a discovery peer may have open on one connection at once (libp2p's QUIC default:
/// 256). A connection carries gossipsub's one stream each way and a record exchange now and then;
/// quinn sets up the state of every stream the peer may open when the connection is made (two
/// hash-map entries each), ~21 KiB per connection at 256: a facilitator that 255 nodes join
/// through at once held 5.5 MiB of it (heaptrack, 2026-12-06, issue 17), and kept the arena it
/// took after the connections closed. A peer over the limit waits for a stream to close.
const MAX_STREAMS: u32 = 32;

/// Keep-alive of the discovery QUIC connections (libp2p's default: 5 s). At idle a connection
/// carries nothing else, and quinn pings when neither side sent for this long (a received packet
/// resets the timer), so each connection costs a PING and its ACK per interval: 0.13 packets/s
/// instead of 0.4 (see benches/RESULTS.md, "Idle cost at 256 nodes"); at 34 nodes idle this cut
/// the network's CPU by about a third (3.0–3.9 % to 2.1–2.4 % of a core). 15 s also keeps a NAT's
/// UDP binding alive (those last 30 s or more).
///
/// What makes the long idle timeout safe: a peer that is gone is noticed without it in both
/// ways a node goes. A node that stops closes its connections before it exits
/// (`SwarmTask::close_all`), so its peers leave them at once; a node killed (`kill -9`, a crash)
/// and started again makes itself known by its record's later `incarnation`, and each peer then
/// closes its whole session with the old run and connects afresh (`SwarmTask::restarted`). The
/// second is what a first try of 15 s / 45 s lacked
/// (`flow::facilitator_restart_keeps_the_record_and_the_job` failed once, and failed again when
/// traced): the facilitator, killed 0.3 s after the testnet converged, had kept only the miner
/// on disk; the miner, still holding a connection to the old run, never told the new run it was
/// on the record topic (gossipsub does so only on a peer's first connection), so the new run
/// published its record to nobody, and the validator and storage node learned of it only when
/// their dead connections reached the idle timeout (45 s; 10 s before). Now the test's restart
/// converges in under 2 s. Measured against 5 s / 10 s (`discovery-scale`, release builds, the
/// same session, 2026-12-06 06:33–06:39 UTC): 34 nodes, 30 s idle, network CPU 1.9 / 2.4 % of
/// a core → 1.4 / 1.6 %, loopback 180 → 125–140 B/s per node; 256 nodes, 60 s idle (one run
/// each), 10.5 % → 5.9 %, loopback 116 → 47 B/s per node; convergence and capacity latency
/// unchanged within the noise.
const GOSSIP_KEEP_ALIVE: Duration = Duration::from_secs(15);
/// Idle timeout of the discovery QUIC connections, in ms (libp2p's default: 10 s): three
/// keep-alives, so one lost PING does not close a connection. A vanished peer's connections close
/// within it (its record expires anyway); a stopped or restarted one's at once (see above).
const GOSSIP_IDLE_TIMEOUT_MS: u32 = 45_000;

/// Default record lifetime: a vanished node is forgotten within 2 minutes; records are re-signed
/// 15 s before it runs out (every 105 s), which keeps idle traffic low at 256 nodes (see the
/// README).
pub const DEFAULT_RECORD_TTL: Duration = Duration::from_secs(120);
/// Shortest record lifetime a config may set.
pub const MIN_RECORD_TTL: Duration = Duration::from_secs(2);

/// How long a connection without gossip (a record exchange of `horde nodes` or the harness)
/// stays open without traffic.
const IDLE_CONNECTION: Duration = Duration::from_secs(30);
/// How long one record exchange may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long start-up waits for the listener.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(10);

/// Discovery settings: the node config's `[discovery]` section.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DiscoveryConfig {
    /// Run discovery at all (off: static peers only, a closed deployment).
    pub enabled: bool,
    /// UDP address of the libp2p QUIC listener.
    pub listen: SocketAddr,
    /// Peers to join through.
    #[serde(with = "crate::server::config::text_list")]
    pub bootstrap: Vec<BootstrapPeer>,
    /// Lifetime of the records this node signs; re-signed every third of it.
    #[serde(rename = "record_ttl_secs", with = "crate::server::config::secs")]
    pub record_ttl: Duration,
}

impl Default for DiscoveryConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            bootstrap: Vec::new(),
            record_ttl: DEFAULT_RECORD_TTL,
        }
    }
}

impl DiscoveryConfig {
    /// Checks `[discovery]`.
    pub fn validate(&self) -> Result<(), crate::server::config::InvalidField> {
        let max = Duration::from_millis(MAX_RECORD_LIFETIME_MS);
        if self.record_ttl < MIN_RECORD_TTL || self.record_ttl > max {
            return Err(crate::server::config::InvalidField::new(
                "discovery.record_ttl_secs",
                format!("must be {} to {}", MIN_RECORD_TTL.as_secs(), max.as_secs()),
            ));
        }
        Ok(())
    }
}

/// A peer to join through: `HOTKEY@IP:PORT` (the libp2p QUIC address) or a full multiaddr
/// `/ip4/…/udp/…/quic-v1/p2p/…`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootstrapPeer {
    /// Its peer id.
    pub peer: PeerId,
    /// Its address (without the `/p2p/` part).
    pub addr: Multiaddr,
}

/// A bootstrap peer that cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BootstrapError {
    /// Neither `HOTKEY@IP:PORT` nor a multiaddr.
    #[error("bootstrap peer {0:?}: expected HOTKEY@IP:PORT or /ip4/…/udp/…/quic-v1/p2p/PEER_ID")]
    Shape(String),
    /// A multiaddr without its `/p2p/PEER_ID`.
    #[error("bootstrap peer {0:?}: the multiaddr must end in /p2p/PEER_ID")]
    NoPeerId(String),
    /// The address is not a QUIC (`udp/…/quic-v1`) address.
    #[error("bootstrap peer {0:?}: not a QUIC address (/udp/PORT/quic-v1)")]
    NotQuic(String),
    /// `HOTKEY@…` names exactly one address here.
    #[error("bootstrap peer {0:?}: give exactly one address")]
    Addresses(String),
}

impl std::str::FromStr for BootstrapPeer {
    type Err = BootstrapError;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let text = text.trim();
        if text.starts_with('/') {
            let mut addr: Multiaddr = text
                .parse()
                .map_err(|_| BootstrapError::Shape(text.to_owned()))?;
            let Some(Protocol::P2p(peer)) = addr.pop() else {
                return Err(BootstrapError::NoPeerId(text.to_owned()));
            };
            if socket_addr(&addr).is_none() {
                return Err(BootstrapError::NotQuic(text.to_owned()));
            }
            return Ok(Self { peer, addr });
        }
        let node: NodeAddr = text
            .parse()
            .map_err(|_| BootstrapError::Shape(text.to_owned()))?;
        let [addr] = node.addrs.as_slice() else {
            return Err(BootstrapError::Addresses(text.to_owned()));
        };
        Ok(Self {
            peer: peer_id(&node.hotkey),
            addr: quic_multiaddr(*addr),
        })
    }
}

impl std::fmt::Display for BootstrapPeer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (hotkey_of(&self.peer), socket_addr(&self.addr)) {
            (Some(hotkey), Some(addr)) => write!(f, "{hotkey}@{addr}"),
            _ => write!(f, "{}/p2p/{}", self.addr, self.peer),
        }
    }
}

/// The protobuf encoding of an ed25519 public key in libp2p (`KeyType` 1, then the 32 bytes):
/// these 4 bytes, then the key. A peer id of such a key is this encoding itself as an identity
/// multihash (code 0), since it is shorter than 42 bytes.
const ED25519_PROTOBUF_PREFIX: [u8; 4] = [0x08, 0x01, 0x12, 0x20];

/// The libp2p peer id of a hotkey.
///
/// Built from the key's bytes (libp2p's spec encoding, see `ED25519_PROTOBUF_PREFIX`) instead
/// of through libp2p's `PublicKey`, which decompresses the point again each time: the discovery
/// task asks this for every record it checks, and the hotkey was checked when it was decoded.
pub fn peer_id(hotkey: &Hotkey) -> PeerId {
    let mut encoded = [0u8; 36];
    encoded[..4].copy_from_slice(&ED25519_PROTOBUF_PREFIX);
    encoded[4..].copy_from_slice(hotkey.as_bytes());
    let built = libp2p::multihash::Multihash::<64>::wrap(0, &encoded)
        .ok()
        .and_then(|multihash| PeerId::from_multihash(multihash).ok());
    if let Some(peer) = built {
        return peer;
    }
    // 36 bytes always fit a 64-byte multihash, so this is not reached; it keeps the function
    // total without a panic path.
    match libp2p::identity::ed25519::PublicKey::try_from_bytes(hotkey.as_bytes()) {
        Ok(key) => libp2p::identity::PublicKey::from(key).to_peer_id(),
        Err(_) => PeerId::from_multihash(libp2p::multihash::Multihash::default())
            .unwrap_or_else(|_| PeerId::random()),
    }
}

/// The hotkey behind a peer id, when it is an ed25519 identity.
pub fn hotkey_of(peer: &PeerId) -> Option<Hotkey> {
    let multihash: &libp2p::multihash::Multihash<64> = peer.as_ref();
    // Code 0 is the identity hash: the digest is the protobuf-encoded public key itself.
    if multihash.code() != 0 {
        return None;
    }
    let digest = multihash.digest();
    // The encoding every ed25519 peer id has (`PublicKey::to_peer_id`): the key's bytes are read
    // directly, and checked by `Hotkey::from_bytes` (once per key, see `CHECKED_KEYS` in
    // horde-protocol).
    if let Some(key) = digest.strip_prefix(&ED25519_PROTOBUF_PREFIX[..])
        && let Ok(bytes) = <[u8; 32]>::try_from(key)
    {
        return Hotkey::from_bytes(bytes).ok();
    }
    let key = libp2p::identity::PublicKey::try_decode_protobuf(digest).ok()?;
    let key = key.try_into_ed25519().ok()?;
    Hotkey::from_bytes(key.to_bytes()).ok()
}

/// `/ip4|ip6/…/udp/PORT/quic-v1` for a socket address.
pub fn quic_multiaddr(addr: SocketAddr) -> Multiaddr {
    let ip = match addr.ip() {
        IpAddr::V4(ip) => Protocol::Ip4(ip),
        IpAddr::V6(ip) => Protocol::Ip6(ip),
    };
    Multiaddr::empty()
        .with(ip)
        .with(Protocol::Udp(addr.port()))
        .with(Protocol::QuicV1)
}

/// The socket address of a `/ip…/udp/…/quic-v1` multiaddr (a trailing `/p2p/…` is allowed).
pub fn socket_addr(addr: &Multiaddr) -> Option<SocketAddr> {
    let mut parts = addr.iter();
    let ip = match parts.next()? {
        Protocol::Ip4(ip) => IpAddr::V4(ip),
        Protocol::Ip6(ip) => IpAddr::V6(ip),
        _ => return None,
    };
    let Protocol::Udp(port) = parts.next()? else {
        return None;
    };
    let Protocol::QuicV1 = parts.next()? else {
        return None;
    };
    match parts.next() {
        None | Some(Protocol::P2p(_)) => Some(SocketAddr::new(ip, port)),
        Some(_) => None,
    }
}

/// Discovery could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DiscoveryError {
    /// The libp2p swarm could not be built.
    #[error("libp2p: {0}")]
    Swarm(String),
    /// A record exchange failed.
    #[error("record exchange: {0}")]
    Exchange(String),
    /// The listener could not be opened.
    #[error("discovery listen {addr}: {message}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        message: String,
    },
}

/// What the node says about itself.
#[derive(Debug, Clone)]
pub struct LocalNode {
    /// Its role.
    pub role: Role,
    /// Its QUIC endpoint addresses.
    pub addrs: Vec<SocketAddr>,
    /// Its executor capacity (miners): the latest value is published.
    pub capacity: Option<watch::Receiver<Vec<ClassCapacity>>>,
    /// Where the directory is kept between runs (the node's data dir); `None`: not kept.
    pub state_dir: Option<std::path::PathBuf>,
}

/// A running discovery service. Stops when its cancellation token is cancelled
/// ([`Discovery::stopped`] waits for that): it closes every connection first, so its peers
/// learn at once (see `SwarmTask::close_all` in `task/connections.rs`). [`Discovery::abort`]
/// stops it as a crash would.
#[derive(Debug)]
pub struct Discovery {
    directory: Arc<Directory>,
    listen: Vec<SocketAddr>,
    hotkey: Hotkey,
    /// Questions to the swarm task.
    queries: tokio::sync::mpsc::Sender<task::Query>,
    /// Cancelled by [`Discovery::abort`]: the task ends without closing its connections.
    abort: CancellationToken,
    /// Closed when the discovery thread has ended (its runtime, and with it the listener and
    /// every connection, dropped).
    done: tokio::sync::oneshot::Receiver<()>,
}

impl Discovery {
    /// Builds the swarm, opens the listener, dials the bootstrap peers and runs until `cancel`.
    ///
    /// The swarm runs on a thread of its own with a single-threaded runtime: libp2p's QUIC
    /// endpoint, its connections and the swarm task then wake one thread per packet or timer
    /// instead of handing each other work across the node's runtime workers (at idle, a node's
    /// CPU is mostly these wake-ups; see benches/RESULTS.md, "Discovery idle cost"), and job
    /// traffic on the node's runtime does not delay records. The thread inherits the network
    /// namespace of the caller's thread.
    pub async fn start(
        key: &SecretKey,
        local: LocalNode,
        config: &DiscoveryConfig,
        cancel: CancellationToken,
    ) -> Result<Self, DiscoveryError> {
        let directory = Arc::new(Directory::default());
        let hotkey = key.hotkey();
        let (queries, queries_rx) = tokio::sync::mpsc::channel(16);
        let (ready, started) = tokio::sync::oneshot::channel();
        let (finished, done) = tokio::sync::oneshot::channel::<()>();
        let span = info_span!("discovery", node = %hotkey.fmt_short());
        let abort = CancellationToken::new();
        let (key, config, shared) = (key.clone(), config.clone(), Arc::clone(&directory));
        let aborted = abort.clone();
        std::thread::Builder::new()
            .name("discovery".to_owned())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(error) => {
                        let _ = ready.send(Err(DiscoveryError::Swarm(format!("runtime: {error}"))));
                        return;
                    }
                };
                runtime.block_on(
                    async move {
                        match prepare(&key, local, &config, shared, queries_rx).await {
                            Ok((task, listen)) => {
                                // The caller may have given up waiting; the task still stops
                                // with `cancel`.
                                let _ = ready.send(Ok(listen));
                                task.run(cancel, aborted).await;
                            }
                            Err(error) => {
                                let _ = ready.send(Err(error));
                            }
                        }
                    }
                    .instrument(span),
                );
                drop(runtime);
                drop(finished);
            })
            .map_err(|e| DiscoveryError::Swarm(format!("discovery thread: {e}")))?;
        let listen = started
            .await
            .map_err(|_| DiscoveryError::Swarm("discovery thread ended at start".to_owned()))??;
        Ok(Self {
            directory,
            listen,
            hotkey,
            queries,
            abort,
            done,
        })
    }

    /// Waits until the service has stopped (its cancellation token was cancelled: its
    /// connections closed, the directory written) and its listener is closed.
    pub async fn stopped(self) {
        // Closed (never sent) when the discovery thread ends.
        let _ = self.done.await;
    }

    /// Stops the service at once, as a crash (`kill -9`) would as far as its peers can tell:
    /// its connections are dropped without a word, so a peer learns of it only when its own
    /// connection times out or the node's next run makes itself known (tests of what peers do
    /// then). The directory is still written. Waits until the thread has ended.
    pub async fn abort(self) {
        self.abort.cancel();
        self.stopped().await;
    }

    /// Asks the discovery task a question (`None`: the node stopped).
    async fn ask<T>(
        &self,
        query: impl FnOnce(tokio::sync::oneshot::Sender<T>) -> task::Query,
    ) -> Option<T> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.queries.send(query(reply)).await.ok()?;
        answer.await.ok()
    }

    /// The gossipsub score this node gives `peer` (`None`: not known, or the node stopped).
    pub async fn peer_score(&self, peer: &PeerId) -> Option<f64> {
        self.ask(|reply| task::Query::PeerScore(*peer, reply))
            .await
            .flatten()
    }

    /// How many connections this node dialed to its bootstrap peers are open: 0 once it left
    /// them for peers of its own (see `task::LEAVE_PEERS`) or stopped.
    pub async fn bootstrap_connections(&self) -> usize {
        self.ask(task::Query::BootstrapDials).await.unwrap_or(0)
    }

    /// Whether this node is connected to `peer` (a connection dialed by either side).
    pub async fn is_connected(&self, peer: &PeerId) -> bool {
        self.ask(|reply| task::Query::Connected(*peer, reply))
            .await
            .unwrap_or(false)
    }

    /// The validator this miner keeps a connection to for its capacity changes (its relay; see
    /// `task/backbone.rs`): `None` for other roles, and while a miner has none.
    pub async fn relay(&self) -> Option<PeerId> {
        self.ask(task::Query::Relay).await.flatten()
    }

    /// The records discovered so far.
    pub fn directory(&self) -> &Arc<Directory> {
        &self.directory
    }

    /// The discovery listener's addresses.
    pub fn listen_addrs(&self) -> &[SocketAddr] {
        &self.listen
    }

    /// How other nodes bootstrap from this one: `HOTKEY@IP:PORT`.
    pub fn bootstrap_addr(&self) -> String {
        match self.listen.first() {
            Some(addr) => format!("{}@{addr}", self.hotkey),
            None => self.hotkey.to_string(),
        }
    }
}

/// Builds the swarm, opens the listener and subscribes to the record topic (on the discovery
/// thread, so that libp2p's QUIC tasks run on its runtime); the task to run and the listener's
/// addresses.
async fn prepare(
    key: &SecretKey,
    local: LocalNode,
    config: &DiscoveryConfig,
    directory: Arc<Directory>,
    queries: tokio::sync::mpsc::Receiver<task::Query>,
) -> Result<(task::SwarmTask, Vec<SocketAddr>), DiscoveryError> {
    let mut swarm = build_swarm(key)?;
    let listen_addr = quic_multiaddr(config.listen);
    swarm
        .listen_on(listen_addr)
        .map_err(|e| DiscoveryError::Listen {
            addr: config.listen,
            message: e.to_string(),
        })?;
    let listen = wait_for_listener(&mut swarm, config.listen).await?;
    // libp2p bound the socket with the system's default receive buffer (see `socket`).
    for addr in &listen {
        match socket::enlarge_receive_buffer(*addr) {
            Ok(receive) => debug!(receive, "discovery socket receive buffer"),
            Err(error) => info!(
                %error,
                "discovery socket keeps the system's default receive buffer; a bootstrap peer \
                 of many joiners may drop datagrams"
            ),
        }
    }
    let bootstrap: Vec<BootstrapPeer> = config
        .bootstrap
        .iter()
        .filter(|peer| peer.peer != *swarm.local_peer_id())
        .cloned()
        .collect();
    swarm
        .behaviour_mut()
        .gossip
        .subscribe(&gossip::topic())
        .map_err(|e| DiscoveryError::Swarm(e.to_string()))?;
    if gossip::follows_capacity(local.role) {
        swarm
            .behaviour_mut()
            .gossip
            .subscribe(&gossip::capacity_topic())
            .map_err(|e| DiscoveryError::Swarm(e.to_string()))?;
    }
    let own = task::OwnRecord {
        key: key.clone(),
        role: local.role,
        addrs: local.addrs,
        p2p_addrs: listen.clone(),
        capacity: local
            .capacity
            .as_ref()
            .map(|rx| rx.borrow().clone())
            .unwrap_or_default(),
        seq: 0,
        ttl: config.record_ttl,
        incarnation: now(),
        signed: None,
    };
    let mut task = task::SwarmTask::new(
        swarm,
        directory,
        own,
        local.capacity,
        bootstrap,
        queries,
        local.state_dir,
    );
    task.own.refresh();
    Ok((task, listen))
}

/// One record exchange with a discovery peer, from a short-lived swarm of our own: sends `sync`,
/// returns the peer's answer (with every record it holds when `sync.want_all`). Used by
/// `horde nodes`.
pub async fn exchange(
    key: &SecretKey,
    peer: &BootstrapPeer,
    sync: RecordSync,
    timeout: Duration,
) -> Result<RecordSync, DiscoveryError> {
    Exchanger::new(key)?.exchange(peer, sync, timeout).await
}

/// A swarm of its own for record exchanges with many peers, one after another: its connections
/// stay open between exchanges (until idle for 30 s), so asking the same nodes again costs a
/// request, not a QUIC handshake each (the harness that waits for a network to converge asks
/// its observers every 100 ms). It joins no gossip.
pub struct Exchanger {
    swarm: Swarm<Behaviour>,
}

impl std::fmt::Debug for Exchanger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exchanger")
            .field("peer", self.swarm.local_peer_id())
            .finish()
    }
}

impl Exchanger {
    /// A swarm with the identity `key`.
    pub fn new(key: &SecretKey) -> Result<Self, DiscoveryError> {
        Ok(Self {
            swarm: build_swarm(key)?,
        })
    }

    /// Sends `sync` to `peer` and returns its answer (see [`exchange`]).
    pub async fn exchange(
        &mut self,
        peer: &BootstrapPeer,
        sync: RecordSync,
        timeout: Duration,
    ) -> Result<RecordSync, DiscoveryError> {
        let swarm = &mut self.swarm;
        let request = swarm.behaviour_mut().records.send_request_with_addresses(
            &peer.peer,
            sync,
            vec![peer.addr.clone()],
        );
        let wait = async {
            loop {
                match swarm.select_next_some().await {
                    SwarmEvent::Behaviour(BehaviourEvent::Records(
                        request_response::Event::Message {
                            message:
                                request_response::Message::Response {
                                    request_id,
                                    response,
                                },
                            ..
                        },
                    )) if request_id == request => return Ok(response),
                    SwarmEvent::Behaviour(BehaviourEvent::Records(
                        request_response::Event::OutboundFailure {
                            request_id, error, ..
                        },
                    )) if request_id == request => {
                        return Err(DiscoveryError::Exchange(format!("{peer}: {error}")));
                    }
                    _ => {}
                }
            }
        };
        tokio::time::timeout(timeout, wait).await.map_err(|_| {
            DiscoveryError::Exchange(format!("{peer}: no answer within {timeout:?}"))
        })?
    }
}

/// Every record a node holds, its own included, each verified (`horde nodes`).
pub async fn list_nodes(peer: &BootstrapPeer) -> Result<Vec<NodeRecord>, DiscoveryError> {
    let answer = exchange(
        &SecretKey::generate(),
        peer,
        RecordSync {
            own: None,
            relayed: Vec::new(),
            want_all: true,
        },
        REQUEST_TIMEOUT,
    )
    .await?;
    let now = now();
    let mut records = Vec::new();
    for signed in answer.own.iter().chain(answer.relayed.iter()) {
        match check_record(signed, now) {
            Ok(record) => records.push(record),
            Err(reason) => {
                warn!(signer = %signed.signer(), %reason, "record in the answer dropped")
            }
        }
    }
    records.sort_by(|a, b| (a.role.as_str(), a.hotkey).cmp(&(b.role.as_str(), b.hotkey)));
    Ok(records)
}

#[derive(NetworkBehaviour)]
struct Behaviour {
    records: request_response::Behaviour<RecordCodec>,
    gossip: libp2p::gossipsub::Behaviour,
}

/// A libp2p swarm with horde's identity, QUIC transport and behaviours.
fn build_swarm(key: &SecretKey) -> Result<Swarm<Behaviour>, DiscoveryError> {
    let mut seed = key.seed();
    let keypair = libp2p::identity::Keypair::ed25519_from_bytes(&mut seed[..])
        .map_err(|e| DiscoveryError::Swarm(e.to_string()))?;
    let swarm = libp2p::SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_quic_config(|mut config| {
            config.max_concurrent_stream_limit = MAX_STREAMS;
            config.keep_alive_interval = GOSSIP_KEEP_ALIVE;
            config.max_idle_timeout = GOSSIP_IDLE_TIMEOUT_MS;
            config
        })
        .with_behaviour(|_| {
            let records = request_response::Behaviour::with_codec(
                RecordCodec,
                [(PROTOCOL_RECORDS, ProtocolSupport::Full)],
                request_response::Config::default().with_request_timeout(REQUEST_TIMEOUT),
            );
            let gossip = gossip::behaviour()?;
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(Behaviour { records, gossip })
        })
        .map_err(|e| DiscoveryError::Swarm(e.to_string()))?
        // Connections between discovery nodes stay open (gossipsub holds a stream on each);
        // one that carries no gossip (a record exchange of `horde nodes`, the harness) closes
        // after IDLE_CONNECTION without traffic.
        .with_swarm_config(|c| c.with_idle_connection_timeout(IDLE_CONNECTION))
        .build();
    Ok(swarm)
}

async fn wait_for_listener(
    swarm: &mut Swarm<Behaviour>,
    wanted: SocketAddr,
) -> Result<Vec<SocketAddr>, DiscoveryError> {
    let wait = async {
        loop {
            match swarm.select_next_some().await {
                SwarmEvent::NewListenAddr { address, .. } => {
                    if let Some(addr) = socket_addr(&address) {
                        return Ok(vec![addr]);
                    }
                }
                SwarmEvent::ListenerError { error, .. } => {
                    return Err(DiscoveryError::Listen {
                        addr: wanted,
                        message: error.to_string(),
                    });
                }
                SwarmEvent::ListenerClosed { reason, .. } => {
                    return Err(DiscoveryError::Listen {
                        addr: wanted,
                        message: format!("listener closed: {reason:?}"),
                    });
                }
                _ => {}
            }
        }
    };
    tokio::time::timeout(LISTEN_TIMEOUT, wait)
        .await
        .map_err(|_| DiscoveryError::Listen {
            addr: wanted,
            message: "no listener within 10 s".to_owned(),
        })?
}

/// Length-prefixed postcard frames of [`RecordSync`], capped at [`MAX_SYNC_BYTES`].
#[derive(Debug, Clone, Copy, Default)]
struct RecordCodec;

async fn read_sync<T: AsyncRead + Unpin + Send>(io: &mut T) -> std::io::Result<RecordSync> {
    let mut header = [0u8; FRAME_HEADER_LEN];
    io.read_exact(&mut header).await?;
    let len = frame_len(header, MAX_SYNC_BYTES).map_err(std::io::Error::other)?;
    let mut body = vec![0u8; len];
    io.read_exact(&mut body).await?;
    // The body must be exactly one message: trailing bytes are refused.
    from_bytes_exact(&body).map_err(std::io::Error::other)
}

async fn write_sync<T: AsyncWrite + Unpin + Send>(
    io: &mut T,
    sync: &RecordSync,
) -> std::io::Result<()> {
    let frame = encode_frame(sync, MAX_SYNC_BYTES).map_err(std::io::Error::other)?;
    io.write_all(&frame).await?;
    io.close().await
}

#[async_trait::async_trait]
impl request_response::Codec for RecordCodec {
    type Protocol = StreamProtocol;
    type Request = RecordSync;
    type Response = RecordSync;

    async fn read_request<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> std::io::Result<RecordSync> {
        read_sync(io).await
    }

    async fn read_response<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> std::io::Result<RecordSync> {
        read_sync(io).await
    }

    async fn write_request<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        sync: RecordSync,
    ) -> std::io::Result<()> {
        write_sync(io, &sync).await
    }

    async fn write_response<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        sync: RecordSync,
    ) -> std::io::Result<()> {
        write_sync(io, &sync).await
    }
}

/// Looks for something in the peer records with `find`: now, then again at every change of
/// `changes` (a [`Directory::subscribe`] receiver, see [`KnownPeers::changes`]) until it is
/// there or `within` has passed. A record another node just published (a freed executor, a
/// newly known miner) reaches this node within milliseconds, and is looked at as it arrives.
/// Without `changes` (static peers only) nothing can change: `find` is asked once.
pub async fn wait_for_records<T>(
    mut changes: Option<watch::Receiver<u64>>,
    within: Duration,
    mut find: impl FnMut() -> Option<T>,
) -> Option<T> {
    let until = tokio::time::Instant::now() + within;
    loop {
        if let Some(found) = find() {
            return Some(found);
        }
        let changes = changes.as_mut()?;
        match tokio::time::timeout_at(until, changes.changed()).await {
            Ok(Ok(())) => {}
            // Out of time, or the directory is gone (the node is stopping).
            Ok(Err(_)) | Err(_) => return None,
        }
    }
}

/// The peers of one role a node may use: the ones in its config (static, for closed
/// deployments) and the ones discovered, static first, each hotkey once.
#[derive(Debug, Clone)]
pub struct KnownPeers {
    role: Role,
    configured: Vec<NodeAddr>,
    directory: Option<Arc<Directory>>,
}

impl KnownPeers {
    /// Peers of `role` from `configured` and, when discovery runs, from `directory`.
    pub fn new(role: Role, configured: Vec<NodeAddr>, directory: Option<Arc<Directory>>) -> Self {
        Self {
            role,
            configured,
            directory,
        }
    }

    /// A receiver of the directory's changes, for [`wait_for_records`]; `None` without
    /// discovery (static peers never change).
    pub fn changes(&self) -> Option<watch::Receiver<u64>> {
        self.directory
            .as_ref()
            .map(|directory| directory.subscribe())
    }

    /// Every peer of the role.
    pub fn list(&self) -> Vec<NodeAddr> {
        self.select(|_| true)
    }

    /// Peers offering a free executor of `class`: discovered miners whose record says so, and
    /// every configured one (a static peer publishes no capacity; it declines `Busy` itself).
    /// Each comes with what its record offers of the class: free executors and the record's
    /// sequence number (`None` for a configured peer).
    pub fn with_free_offers(
        &self,
        class: &horde_protocol::ExecutorClass,
    ) -> Vec<(NodeAddr, Option<(u32, u64)>)> {
        let mut peers: Vec<_> = self.configured.iter().map(|p| (p.clone(), None)).collect();
        if let Some(directory) = &self.directory {
            for record in directory.with_role(self.role, now()) {
                let free = free_of(&record, class);
                if free > 0 && !peers.iter().any(|(p, _)| p.hotkey == record.hotkey) {
                    peers.push((node_addr(&record), Some((free, record.seq))));
                }
            }
        }
        peers
    }

    /// The peer with this hotkey.
    pub fn find(&self, hotkey: &Hotkey) -> Option<NodeAddr> {
        if let Some(peer) = self.configured.iter().find(|p| p.hotkey == *hotkey) {
            return Some(peer.clone());
        }
        let record = self.directory.as_ref()?.get(hotkey, now())?;
        (record.role == self.role).then(|| node_addr(&record))
    }

    fn select(&self, keep: impl Fn(&NodeRecord) -> bool) -> Vec<NodeAddr> {
        let mut peers = self.configured.clone();
        if let Some(directory) = &self.directory {
            for record in directory.with_role(self.role, now()) {
                if keep(&record) && !peers.iter().any(|p| p.hotkey == record.hotkey) {
                    peers.push(node_addr(&record));
                }
            }
        }
        peers
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use horde_protocol::Signed;

    #[test]
    fn records_are_refreshed_fifteen_seconds_before_they_expire_or_at_two_fifths() {
        let secs = |s: u64| Duration::from_secs(s);
        assert_eq!(refresh_interval(DEFAULT_RECORD_TTL), secs(105));
        assert_eq!(refresh_interval(secs(600)), secs(585));
        // Short lifetimes keep two fifths: one lost refresh is survived.
        assert_eq!(refresh_interval(secs(20)), secs(8));
        assert_eq!(refresh_interval(MIN_RECORD_TTL), Duration::from_millis(800));
        for ttl in [
            MIN_RECORD_TTL,
            secs(10),
            secs(60),
            DEFAULT_RECORD_TTL,
            secs(600),
        ] {
            assert!(refresh_interval(ttl) < ttl, "{ttl:?}");
        }
    }

    /// Offers a miner record of `key` with `free` executors of class `cpu`.
    fn offer_miner(directory: &Directory, key: &SecretKey, free: u32, seq: u64) -> Offer {
        let record = NodeRecord {
            hotkey: key.hotkey(),
            role: Role::Miner,
            addrs: vec![([127, 0, 0, 1], 4000).into()],
            p2p_addrs: Vec::new(),
            capacity: vec![horde_protocol::ClassCapacity {
                class: horde_protocol::ExecutorClass("cpu".into()),
                free,
                total: 1,
            }],
            version: "test".into(),
            seq,
            expires_at: now().plus_millis(60_000),
            incarnation: horde_protocol::UnixMillis(1),
        };
        directory.offer(Signed::sign(key, &record), record)
    }

    #[tokio::test]
    async fn waiting_for_records_wakes_on_a_change_and_gives_up_in_time() {
        let directory = Arc::new(Directory::default());
        let miners = KnownPeers::new(Role::Miner, Vec::new(), Some(Arc::clone(&directory)));
        let class = horde_protocol::ExecutorClass("cpu".into());
        let key = SecretKey::generate();
        assert_eq!(offer_miner(&directory, &key, 0, 1), Offer::New);

        // The executor frees up 100 ms later: found as that record arrives.
        let freeing = tokio::spawn({
            let (directory, key) = (Arc::clone(&directory), key.clone());
            async move {
                tokio::time::sleep(Duration::from_millis(100)).await;
                offer_miner(&directory, &key, 1, 2)
            }
        });
        let started = std::time::Instant::now();
        let found = wait_for_records(miners.changes(), Duration::from_secs(20), || {
            miners.with_free_offers(&class).into_iter().next()
        })
        .await;
        assert_eq!(
            found.map(|(peer, offered)| (peer.hotkey, offered)),
            Some((key.hotkey(), Some((1, 2))))
        );
        let waited = started.elapsed();
        assert!(waited >= Duration::from_millis(100), "{waited:?}");
        assert!(waited < Duration::from_secs(10), "{waited:?}");
        assert_eq!(freeing.await.unwrap(), Offer::Updated);

        // Nothing turns up: None once the time is up.
        let started = std::time::Instant::now();
        let none: Option<()> =
            wait_for_records(miners.changes(), Duration::from_millis(100), || None).await;
        assert_eq!(none, None);
        assert!(started.elapsed() >= Duration::from_millis(100));

        // Static peers only: nothing can change, so `find` is asked once, and no time passes.
        let fixed = KnownPeers::new(Role::Miner, Vec::new(), None);
        let mut calls = 0;
        let started = std::time::Instant::now();
        let none: Option<()> = wait_for_records(fixed.changes(), Duration::from_secs(20), || {
            calls += 1;
            None
        })
        .await;
        assert_eq!((none, calls), (None, 1));
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn peer_ids_and_hotkeys_are_one_identity() {
        let key = SecretKey::generate();
        let peer = peer_id(&key.hotkey());
        assert_eq!(hotkey_of(&peer), Some(key.hotkey()));
        // The libp2p keypair built from the same seed has the same peer id.
        let mut seed = key.seed();
        let keypair = libp2p::identity::Keypair::ed25519_from_bytes(&mut seed[..]).unwrap();
        assert_eq!(keypair.public().to_peer_id(), peer);
        assert_eq!(hotkey_of(&PeerId::random()), None);
        // A digest of the ed25519 shape whose 32 bytes are no valid key has none either.
        let mut bad = [0u8; 36];
        bad[..4].copy_from_slice(&ED25519_PROTOBUF_PREFIX);
        bad[4] = 2;
        let bad = PeerId::from_multihash(libp2p::multihash::Multihash::wrap(0, &bad).unwrap());
        assert_eq!(bad.ok().and_then(|peer| hotkey_of(&peer)), None);
    }

    #[test]
    fn bootstrap_peers_parse_in_both_forms() {
        let key = SecretKey::generate();
        let short: BootstrapPeer = format!("{}@127.0.0.1:4001", key.hotkey()).parse().unwrap();
        assert_eq!(short.peer, peer_id(&key.hotkey()));
        assert_eq!(
            socket_addr(&short.addr),
            Some(([127, 0, 0, 1], 4001).into())
        );
        assert_eq!(
            short.to_string(),
            format!("{}@127.0.0.1:4001", key.hotkey())
        );
        let long: BootstrapPeer = format!("/ip4/127.0.0.1/udp/4001/quic-v1/p2p/{}", short.peer)
            .parse()
            .unwrap();
        assert_eq!(long, short);
        for bad in [
            "nothing".to_owned(),
            "/ip4/127.0.0.1/udp/4001/quic-v1".to_owned(),
            format!("/ip4/127.0.0.1/tcp/4001/p2p/{}", short.peer),
            format!("{}@127.0.0.1:1,127.0.0.1:2", key.hotkey()),
            "abc@127.0.0.1:1".to_owned(),
        ] {
            assert!(bad.parse::<BootstrapPeer>().is_err(), "{bad} parsed");
        }
    }

    #[test]
    fn oversized_and_garbage_sync_frames_are_refused() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        runtime.block_on(async {
            // A header announcing more than the cap is refused before any allocation.
            let mut too_big = futures::io::Cursor::new((MAX_SYNC_BYTES + 1).to_be_bytes().to_vec());
            assert!(read_sync(&mut too_big).await.is_err());
            // Garbage postcard.
            let mut garbage = 3u32.to_be_bytes().to_vec();
            garbage.extend_from_slice(&[0xff, 0xff, 0xff]);
            assert!(
                read_sync(&mut futures::io::Cursor::new(garbage))
                    .await
                    .is_err()
            );
            // Truncated body.
            let mut short = 10u32.to_be_bytes().to_vec();
            short.push(0);
            assert!(
                read_sync(&mut futures::io::Cursor::new(short))
                    .await
                    .is_err()
            );
            // A good frame round-trips.
            let mut buffer = futures::io::Cursor::new(Vec::new());
            let sync = RecordSync {
                own: None,
                relayed: Vec::new(),
                want_all: true,
            };
            write_sync(&mut buffer, &sync).await.unwrap();
            buffer.set_position(0);
            assert_eq!(read_sync(&mut buffer).await.unwrap(), sync);
            // The same message with a byte after it, inside the announced length, is refused.
            let good = buffer.into_inner();
            let mut trailing = u32::try_from(good.len() - FRAME_HEADER_LEN + 1)
                .unwrap()
                .to_be_bytes()
                .to_vec();
            trailing.extend_from_slice(&good[FRAME_HEADER_LEN..]);
            trailing.push(0);
            let error = read_sync(&mut futures::io::Cursor::new(trailing))
                .await
                .unwrap_err();
            assert!(error.to_string().contains("trailing"), "{error}");
        });
    }
}
