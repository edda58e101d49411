//! The discovery task: owns the swarm, publishes the node's own record on gossip (re-signed every
//! [`refresh_interval`] and, coalesced, on capacity changes), judges the records gossip brings,
//! fetches whole directories over the record exchange when joining, answers such fetches, sweeps
//! expired records and keeps the directory on disk.
//!
//! Layout: `task/upkeep.rs` (the directory kept on disk, bootstrap redials and leaving, mesh
//! dials), `task/backbone.rs` (the facilitator and validators as direct peers, each miner's
//! relay validator: capacity in two hops), `task/exchange.rs` (the record exchange: join
//! fetches, pulls and refetches asked and answered), `task/connections.rs` (connections by
//! peer: a restarted peer connected afresh, every connection closed when the node stops),
//! `task/announce.rs` (the own record published: first and second announcement).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;
use horde_protocol::codec::{from_bytes_exact, to_bytes};
use horde_protocol::{ClassCapacity, NodeRecord, RecordSync, Role, SecretKey, Signed, UnixMillis};
use libp2p::gossipsub::{self, MessageAcceptance, PublishError};
use libp2p::request_response;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{ConnectionId, SwarmEvent};
use libp2p::{PeerId, Swarm};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::gossip::{self, Verdict};
use super::{
    Behaviour, BehaviourEvent, BootstrapPeer, Directory, MAX_DIRECTORY_RECORDS, MAX_SYNC_RECORDS,
    Offer, RecordRejection, check_record, hotkey_of, peer_id, quic_multiaddr, socket_addr,
};
use crate::clock::now;

mod announce;
mod backbone;
mod connections;
mod exchange;
mod upkeep;

use connections::Session;

/// How many nodes of its directory a node keeps connections to that it dialed itself (besides
/// its bootstrap peers), for its gossip mesh: gossipsub meshes `mesh_n` = 3 of the connected
/// peers, at least 1 of them dialed by the node (`mesh_outbound_min`, `gossip.rs`); 4 dialed here and ~4
/// dialed by others give every node ~8 connections whatever the network's size, so a node's
/// connections (QUIC state, a send queue, keep-alives each) do not grow with the network.
/// Peers come from the directory (every record names its node's discovery addresses, signed):
/// the Kademlia walks that found them before opened some 20 connections per walk, and at 256
/// nodes starting together thousands within seconds, which starved the machine (see
/// benches/RESULTS.md, "Start-up at 256 nodes"). A connection gossipsub holds stays open
/// (it keeps a stream on it), so these few are never trimmed.
pub(super) const MESH_DIALS: usize = 4;
/// A node closes the connections it dialed to its bootstrap peers once it is connected to this
/// many other nodes on the record topic, its join is done (whole directory fetched, second
/// announcement made) and its directory holds a live record of every bootstrap peer (gossip
/// reaches them through the mesh). Held for the whole run, these connections made the bootstrap
/// peer (the facilitator) a hub of one connection per node: at 256 nodes 255 connections, each
/// with QUIC state, a gossipsub send queue and keep-alives; leaving them cut the idle
/// facilitator's CPU from 0.97 to 0.13 % of a core (see benches/RESULTS.md, "256 nodes on a
/// quiet machine"). A network too small to give a node this many other peers keeps them.
pub(super) const LEAVE_PEERS: usize = MESH_DIALS;
/// How long after those conditions first hold the bootstrap connections are closed (checked
/// again then): the second announcement and a pull under way have gone out by then.
const LEAVE_DELAY: Duration = Duration::from_secs(5);
/// A node that left its bootstrap peers dials them again when it has fewer than this many other
/// peers on the record topic, or when the record of a bootstrap peer expires in its directory
/// (nothing of it arrived for a record's lifetime: a partition). It then keeps that connection
/// for the rest of its run: its mesh may lie wholly on its side of a partition, and the bootstrap
/// connection is the bridge that lets the halves find each other when it heals.
pub(super) const REJOIN_PEERS: usize = 2;
/// How soon after a change (a node learned, a dialed connection lost or a dial failed) the node
/// dials towards [`MESH_DIALS`]: the records of one fetch make one round of dials.
const FILL_DELAY: Duration = Duration::from_millis(500);
/// How soon a bootstrap peer whose connection was lost (or whose dial failed) is dialed again;
/// each failure in a row doubles the wait, up to [`REDIAL_MAX`], so a bootstrap peer that is
/// down (or too busy to answer) is not hammered by every node of the network at once.
const REDIAL_INTERVAL: Duration = Duration::from_secs(2);
/// The longest wait between redials of a bootstrap peer: a node cut off from it (a partition, a
/// restart) is back within this long after it is reachable again.
const REDIAL_MAX: Duration = Duration::from_secs(8);
/// Capacity changes are published at most this often (changes in between are coalesced into
/// the next record).
pub const CAPACITY_COALESCE: Duration = Duration::from_millis(100);
/// How often the directory is written to disk when only records of known nodes changed (a
/// restart loads it; a record kept from up to this long ago is still valid for most of its life).
const SAVE_INTERVAL: Duration = Duration::from_secs(15);
/// How soon it is written when a node joined or left (so a restart knows every member).
const SAVE_MEMBERS_DELAY: Duration = Duration::from_secs(1);
/// How many nodes of a loaded directory are dialed at start, each asked for its whole directory
/// once connected (a fresh copy at once, also for a node without bootstrap peers).
const DIAL_LOADED: usize = 3;
/// How soon after a change the message counters are logged (target
/// `horde_node::server::discovery::stats`, level debug; at most one line per interval, none
/// while nothing changes).
const STATS_INTERVAL: Duration = Duration::from_secs(5);
/// How long after the first whole directory it received (its join fetch or a pull answered; a
/// node without bootstrap peers: after its first announcement) a node announces its record
/// once more: by then it has dialed its mesh peers
/// (`MESH_DIALS`, [`FILL_DELAY`] after it learned them) and the meshes of a network starting
/// together have formed, so this copy reaches every node, where a first copy sent while the
/// node knew only its bootstrap peer may have reached part of the network (the same signed
/// record once more, checked only by the nodes that lack it: `gossip::encode_again`). Timed from the first announcement instead, a node whose join fetch waited on
/// a busy bootstrap peer announced again before it had any other peer: at 256 nodes such a
/// record stayed unknown to half the network until its refresh, 90 s later. Convergence waits
/// for this copy: 3 s made 34 nodes converge in 3.47–3.53 s on a quiet machine, 2 s in 2.33–2.37 s
/// (its mesh dials go out 0.5 s after the fetch, and the next 1 s heartbeat grafts them).
const SETTLE_DELAY: Duration = Duration::from_secs(2);
/// How long after its join fetch a node pulls the whole directory again (plus up to
/// [`PULL_SPREAD_MS`], by hotkey, so a network starting together does not pull at once): the
/// join fetch holds only the nodes that joined before it, and gossip copies of the rest may have
/// been dropped on a machine busy starting them. Records not newer than the held ones cost a
/// decode, no signature check.
const PULL_FIRST: Duration = Duration::from_secs(3);
const PULL_SPREAD_MS: u64 = 2000;
/// A pull is repeated after [`PULL_WAIT`], at most [`MAX_PULLS`] times after one join, until
/// [`EMPTY_PULLS`] in a row brought no node this node did not know (gossip alone from then on).
/// Each asks another peer chosen at random: one pull from a peer that lacked the same record
/// used to end the pulls, and at 256 nodes left records unknown to some nodes until their
/// refresh. While a network starts, each pull costs its node the decode of one directory.
const PULL_WAIT: Duration = Duration::from_secs(3);
const EMPTY_PULLS: u32 = 3;
const MAX_PULLS: u32 = 20;
/// At most this many ids of first announcements are awaited (`SwarmTask::exchanged`): an
/// announcement arrives within milliseconds of the exchange that brought its record, or had
/// arrived before it (then no id is kept), so only a join storm keeps hundreds at once.
const MAX_EXCHANGED: usize = 1024;
/// The log target of the record-latency lines (level debug): "capacity published" (a miner's
/// wait from a capacity change to signing it) and "record kept" (how long after signing a record
/// was kept; a record's `seq` is its signing time in ms).
pub const LATENCY_TARGET: &str = "horde_node::server::discovery::latency";
/// The file, in the node's state directory, that holds the directory between runs.
pub const DIRECTORY_FILE: &str = "discovery-directory.bin";
/// How long before its record expires a node re-signs it, at most: time for the refresh to
/// reach every node before the old copy expires. A copy is forwarded within 10 s or dropped
/// (`forward_queue_duration`), and a lost one is repaired by IHAVE/IWANT within the 5 heartbeats
/// gossipsub keeps it (`history_length`), so 15 s covers both; a refresh still missing after
/// that is not repaired at all (an idle network does not pull), whatever the margin. 15 s
/// instead of 30 s re-signs every 105 s instead of 90 s: 14 % fewer records, and 14 % less of
/// the traffic and signature checks that the records cost an idle network.
pub(super) const REFRESH_MARGIN: Duration = Duration::from_secs(15);

/// How often a node re-signs its record: [`REFRESH_MARGIN`] before it expires (105 s for the
/// default 120 s lifetime), but never less often than two fifths of its lifetime, so that short
/// lifetimes (tests) still survive one lost refresh. Every refresh costs the whole network a
/// message per node and a signature check per node, so the idle cost falls with the interval:
/// 256 nodes re-signing every 105 s send 2.4 records/s network-wide (every 90 s: 2.8; every
/// 48 s: 5.3).
pub fn refresh_interval(ttl: Duration) -> Duration {
    (ttl * 2 / 5)
        .max(ttl.saturating_sub(REFRESH_MARGIN))
        .max(Duration::from_millis(500))
}

/// A question to the running task.
pub(super) enum Query {
    /// The gossipsub score of a peer.
    PeerScore(PeerId, oneshot::Sender<Option<f64>>),
    /// How many connections this node dialed to its bootstrap peers are open.
    BootstrapDials(oneshot::Sender<usize>),
    /// Whether a peer is connected (by either side's dial).
    Connected(PeerId, oneshot::Sender<bool>),
    /// A miner's relay validator (`backbone.rs`).
    Relay(oneshot::Sender<Option<PeerId>>),
}

/// The node's own record, re-signed on every change.
pub(super) struct OwnRecord {
    pub(super) key: SecretKey,
    pub(super) role: Role,
    pub(super) addrs: Vec<std::net::SocketAddr>,
    pub(super) p2p_addrs: Vec<std::net::SocketAddr>,
    pub(super) capacity: Vec<ClassCapacity>,
    pub(super) seq: u64,
    pub(super) ttl: Duration,
    /// When this run started (see `NodeRecord::incarnation`).
    pub(super) incarnation: UnixMillis,
    pub(super) signed: Option<Signed<NodeRecord>>,
}

impl OwnRecord {
    /// Signs the current state with a higher `seq` and a fresh expiry.
    pub(super) fn refresh(&mut self) -> Signed<NodeRecord> {
        let now = now();
        // Milliseconds since the epoch keep `seq` rising across restarts without a stored
        // counter; +1 keeps it rising within one millisecond.
        self.seq = (self.seq + 1).max(now.0);
        let ttl_ms = u64::try_from(self.ttl.as_millis()).unwrap_or(u64::MAX);
        let record = NodeRecord {
            hotkey: self.key.hotkey(),
            role: self.role,
            addrs: self.addrs.clone(),
            p2p_addrs: self.p2p_addrs.clone(),
            capacity: self.capacity.clone(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            seq: self.seq,
            expires_at: now.plus_millis(ttl_ms),
            incarnation: self.incarnation,
        };
        let signed = Signed::sign(&self.key, &record);
        self.signed = Some(signed.clone());
        signed
    }

    fn current(&mut self) -> Signed<NodeRecord> {
        match &self.signed {
            Some(signed) => signed.clone(),
            None => self.refresh(),
        }
    }
}

/// Message counters, logged every [`STATS_INTERVAL`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Stats {
    received: u64,
    accepted: u64,
    ignored: u64,
    rejected: u64,
    published: u64,
    fetches_sent: u64,
    fetches_served: u64,
    /// Bytes of the record messages received on gossip (payloads; control frames and
    /// transport overhead not counted).
    received_bytes: u64,
    /// Second announcements of records held, forwarded without a check (`gossip::encode_again`).
    forwarded: u64,
    /// Connections established and closed (every connection, both directions), closed by the
    /// connection cap, and dials that failed.
    connections_opened: u64,
    connections_closed: u64,
    mesh_dials: u64,
    dial_failures: u64,
}

pub(super) struct SwarmTask {
    pub(super) swarm: Swarm<Behaviour>,
    pub(super) directory: Arc<Directory>,
    pub(super) own: OwnRecord,
    pub(super) capacity: Option<watch::Receiver<Vec<ClassCapacity>>>,
    /// Dialed at start and again whenever the connection to one is gone (a restarted bootstrap
    /// node knows nobody until its peers come back).
    pub(super) bootstrap: Vec<BootstrapPeer>,
    pub(super) queries: mpsc::Receiver<Query>,
    /// Where the directory is kept between runs.
    pub(super) state_dir: Option<PathBuf>,
    /// Peers this node dialed (a connection it opened is open to them).
    dialed: std::collections::HashSet<PeerId>,
    /// Every open connection, by peer, as a [`Session`] (a peer's record with a newer
    /// `incarnation` closes a session from before its restart, see `connections.rs`).
    connections: std::collections::HashMap<PeerId, Session>,
    /// Directory nodes dialed for the mesh, not yet connected; when the next round of such dials
    /// is due; a random seed and round counter that order the candidates differently each round.
    dialing: std::collections::HashSet<PeerId>,
    fill_at: Option<Instant>,
    fill_seed: [u8; 32],
    fill_round: u64,
    /// The wait before the next bootstrap redial (doubles with each failure in a row).
    redial_wait: Duration,
    /// The backbone (`backbone.rs`): direct peers (gossipsub explicit peers), a miner's relay
    /// validator, the round of its choice and the relay it lost last, and the back-off after a
    /// backbone peer was lost.
    direct: std::collections::HashSet<PeerId>,
    relay: Option<PeerId>,
    relay_round: u64,
    relay_lost: Option<PeerId>,
    backbone_at: Option<Instant>,
    backbone_wait: Duration,
    /// Leaving the bootstrap peers ([`LEAVE_PEERS`]): the open connections this node dialed to
    /// them, when it leaves them (conditions checked again then), whether it left (not redialed
    /// while it has other peers) and whether it stays (it rejoined once: kept for the run).
    bootstrap_dials: std::collections::HashSet<ConnectionId>,
    leave_at: Option<Instant>,
    left: bool,
    stay: bool,
    /// Bootstrap peers the whole directory was fetched from already.
    joined: Vec<PeerId>,
    /// Nodes of the kept directory dialed at start, to fetch a fresh copy from once, and the
    /// fetches under way (one that fails is asked again at the next connection to its node).
    refetch: Vec<PeerId>,
    refetching: Vec<(request_response::OutboundRequestId, PeerId)>,
    /// The gossip message ids of records kept from a record exchange as their sender's own,
    /// whose first announcement has not arrived on gossip yet. When it arrives it is forwarded
    /// (the record was checked when it was kept) instead of ignored as not newer than the
    /// record held: a joiner sends its record to its bootstrap peer twice at once, in its join
    /// fetch and on gossip, and with the gossip copy ignored its first announcement ended at
    /// its bootstrap peer, its only peer. At 256 nodes the bootstrap peer ignored all 255, and
    /// the last joiners became known only with their second announcement, 12 s after they
    /// started. Emptied when it holds [`MAX_EXCHANGED`] (ids of announcements that never came).
    exchanged: std::collections::HashSet<gossipsub::MessageId>,
    /// When the own record was last published, and whether a capacity change waits for
    /// [`CAPACITY_COALESCE`] to pass.
    published_at: Option<Instant>,
    capacity_pending: bool,
    /// When the first capacity change not yet published happened.
    capacity_changed_at: Option<Instant>,
    /// Whether the own record reached a subscribed peer yet, and when it is announced again.
    announced: bool,
    settle: Option<Instant>,
    /// The join fetch in flight (asked again while it fails), and whether the second
    /// announcement was made (timed from the first whole directory received).
    join_request: Option<request_response::OutboundRequestId>,
    settled: bool,
    /// Pulls in a row that brought no node this node did not know.
    empty_pulls: u32,
    /// When the next pull sync is due, the wait before it, the request in flight and how many
    /// were sent (a new random choice of peer each).
    pull_at: Option<Instant>,
    pulls: u32,
    pull_request: Option<request_response::OutboundRequestId>,
    pull_turn: u64,
    /// The directory's change count, size and time at the last write, and the write under way.
    saved: (u64, usize, Instant),
    saving: Option<tokio::task::JoinHandle<()>>,
    stats: Stats,
    logged: Stats,
    /// Timers, each set only while it has work to do (an idle node wakes for none of them):
    /// the next redial of bootstrap peers, directory write and counter log.
    redial_at: Option<Instant>,
    save_at: Option<Instant>,
    stats_at: Option<Instant>,
}

/// 32 random bytes (the operating system's generator; zeros if it fails, which only makes the
/// choice of peers and redial jitter predictable).
fn random_seed() -> [u8; 32] {
    let mut seed = [0u8; 32];
    let _ = getrandom::fill(&mut seed);
    seed
}

/// A node's own order among candidates for `purpose` in `round`: BLAKE3 of its seed (drawn at
/// each start), the purpose, the round and the candidate. Taking the lowest is a choice at
/// random that no other node can predict, nor grind keys into.
fn order_key(seed: &[u8; 32], purpose: &[u8], round: u64, candidate: &[u8]) -> [u8; 32] {
    let mut order = blake3::Hasher::new();
    order.update(seed);
    order.update(purpose);
    order.update(&round.to_le_bytes());
    order.update(candidate);
    *order.finalize().as_bytes()
}

/// Sleeps until `at`; forever when `None`.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// When the first record of `directory` expires, as an instant (`None`: no record held).
fn next_expiry(directory: &Directory) -> Option<Instant> {
    let at = directory.next_expiry()?;
    // One millisecond late: at `expires_at` itself the record is already not live, and the
    // wall clock is read in whole milliseconds.
    let wait = at.0.saturating_sub(now().0).saturating_add(1);
    Some(Instant::now() + Duration::from_millis(wait))
}

impl SwarmTask {
    pub(super) fn new(
        swarm: Swarm<Behaviour>,
        directory: Arc<Directory>,
        own: OwnRecord,
        capacity: Option<watch::Receiver<Vec<ClassCapacity>>>,
        bootstrap: Vec<BootstrapPeer>,
        queries: mpsc::Receiver<Query>,
        state_dir: Option<PathBuf>,
    ) -> Self {
        Self {
            swarm,
            directory,
            own,
            capacity,
            bootstrap,
            queries,
            state_dir,
            dialed: std::collections::HashSet::new(),
            connections: std::collections::HashMap::new(),
            dialing: std::collections::HashSet::new(),
            fill_at: None,
            fill_seed: random_seed(),
            fill_round: 0,
            redial_wait: REDIAL_INTERVAL,
            direct: std::collections::HashSet::new(),
            relay: None,
            relay_round: 0,
            relay_lost: None,
            backbone_at: None,
            backbone_wait: REDIAL_INTERVAL,
            bootstrap_dials: std::collections::HashSet::new(),
            leave_at: None,
            left: false,
            stay: false,
            joined: Vec::new(),
            refetch: Vec::new(),
            refetching: Vec::new(),
            exchanged: std::collections::HashSet::new(),
            published_at: None,
            capacity_pending: false,
            capacity_changed_at: None,
            announced: false,
            settle: None,
            join_request: None,
            settled: false,
            empty_pulls: 0,
            pull_at: None,
            pulls: 0,
            pull_request: None,
            pull_turn: 0,
            saved: (0, 0, Instant::now()),
            saving: None,
            stats: Stats::default(),
            logged: Stats::default(),
            redial_at: None,
            save_at: None,
            stats_at: None,
        }
    }

    /// Runs until `cancel` (a stop: every connection closed first, see [`CLOSE_WAIT`]) or
    /// `abort` (as a crash: nothing sent); the directory is written either way.
    pub(super) async fn run(mut self, cancel: CancellationToken, abort: CancellationToken) {
        self.load();
        self.redial();
        let mut republish = tokio::time::interval(refresh_interval(self.own.ttl));
        republish.tick().await;
        // No periodic sweep, write or redial: each timer below is set from what happened (a
        // record kept, a connection lost), so an idle node sleeps until its next refresh, the
        // first expiry in its directory, or traffic.
        let mut changes = self.directory.subscribe();
        let mut expiry = next_expiry(&self.directory);
        loop {
            let capacity_changed = async {
                match self.capacity.as_mut() {
                    Some(rx) if !self.capacity_pending => rx.changed().await.is_ok(),
                    _ => std::future::pending().await,
                }
            };
            let coalesced = async {
                match (self.capacity_pending, self.published_at) {
                    (true, Some(at)) => tokio::time::sleep_until(at + CAPACITY_COALESCE).await,
                    (true, None) => {}
                    (false, _) => std::future::pending().await,
                }
            };
            let settle = async {
                match self.settle {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            let pull = async {
                match self.pull_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = cancel.cancelled() => break,
                () = abort.cancelled() => break,
                () = pull => self.pull(),
                () = settle => {
                    self.settle = None;
                    // Nobody subscribed to tell yet: again after the delay.
                    if self.announce_again() {
                        self.settled = true;
                        self.schedule_leave();
                    } else {
                        self.settle = Some(Instant::now() + SETTLE_DELAY);
                    }
                }
                event = self.swarm.select_next_some() => self.on_event(event),
                Some(query) = self.queries.recv() => self.answer(query),
                _ = republish.tick() => {
                    self.own.refresh();
                    self.publish_own();
                }
                () = sleep_until(expiry) => {
                    for record in self.directory.expire(now()) {
                        info!(role = %record.role, hotkey = %record.hotkey, "node record expired");
                    }
                    expiry = next_expiry(&self.directory);
                    self.rejoin_if_cut_off();
                    self.keep_backbone();
                }
                Ok(()) = changes.changed() => {
                    changes.mark_unchanged();
                    expiry = next_expiry(&self.directory);
                    self.schedule_save();
                    self.schedule_fill();
                    self.schedule_leave();
                    self.keep_backbone();
                }
                () = sleep_until(self.fill_at) => self.fill(),
                () = sleep_until(self.backbone_at) => self.backbone_due(),
                () = sleep_until(self.leave_at) => self.leave(),
                () = sleep_until(self.redial_at) => {
                    self.redial_at = None;
                    self.redial();
                }
                () = sleep_until(self.save_at) => {
                    self.save_at = None;
                    self.save(false);
                    // Not due yet (only records of known nodes changed): at the next write.
                    self.schedule_save();
                }
                () = sleep_until(self.stats_at) => {
                    self.stats_at = None;
                    self.log_stats();
                }
                changed = capacity_changed => {
                    if changed {
                        self.capacity_pending = true;
                        self.capacity_changed_at.get_or_insert_with(Instant::now);
                    } else {
                        // The sender is gone: the role stopped; keep serving what we know.
                        self.capacity = None;
                    }
                }
                () = coalesced => {
                    self.capacity_pending = false;
                    if let Some(rx) = self.capacity.as_mut() {
                        self.own.capacity = rx.borrow_and_update().clone();
                    }
                    self.own.refresh();
                    let coalesced = self.capacity_changed_at.take().map(|at| at.elapsed());
                    self.publish_capacity();
                    if let Some(coalesced) = coalesced {
                        // The seq that went out (a failed first try signs the record anew).
                        debug!(
                            target: LATENCY_TARGET,
                            coalesced_ms = u64::try_from(coalesced.as_millis()).unwrap_or(u64::MAX),
                            seq = self.own.seq,
                            "capacity published"
                        );
                    }
                }
            }
            if self.stats != self.logged && self.stats_at.is_none() {
                self.stats_at = Some(Instant::now() + STATS_INTERVAL);
            }
        }
        if !abort.is_cancelled() {
            self.close_all().await;
        }
        self.save(true);
        debug!("discovery stopped");
    }

    fn answer(&mut self, query: Query) {
        match query {
            Query::PeerScore(peer, reply) => {
                let _ = reply.send(self.swarm.behaviour().gossip.peer_score(&peer));
            }
            Query::BootstrapDials(reply) => {
                let _ = reply.send(self.bootstrap_dials.len());
            }
            Query::Connected(peer, reply) => {
                let _ = reply.send(self.swarm.is_connected(&peer));
            }
            Query::Relay(reply) => {
                let _ = reply.send(self.relay);
            }
        }
    }

    fn log_stats(&mut self) {
        if self.stats == self.logged {
            return;
        }
        self.logged = self.stats;
        let s = self.stats;
        debug!(
            target: "horde_node::server::discovery::stats",
            received = s.received, accepted = s.accepted, ignored = s.ignored,
            rejected = s.rejected, forwarded = s.forwarded, published = s.published, fetches_sent = s.fetches_sent,
            fetches_served = s.fetches_served, received_bytes = s.received_bytes,
            connections_opened = s.connections_opened, connections_closed = s.connections_closed,
            mesh_dials = s.mesh_dials, dial_failures = s.dial_failures,
            connected = self.swarm.connected_peers().count(),
            mesh = self.mesh_size(),
            records = self.directory.len(),
            "gossip counters"
        );
    }

    /// Sends our own record to `peer`, asking for every record it holds when `want_all`.
    fn send_own(&mut self, peer: PeerId, want_all: bool) -> request_response::OutboundRequestId {
        if want_all {
            self.stats.fetches_sent += 1;
        }
        let own = self.own.current();
        self.swarm.behaviour_mut().records.send_request(
            &peer,
            RecordSync {
                own: Some(own),
                relayed: Vec::new(),
                want_all,
            },
        )
    }

    /// Starts the pull syncs of a join (unless they run already).
    fn start_pulls(&mut self) {
        if self.pull_at.is_none() && self.pull_request.is_none() {
            self.pulls = 0;
            self.empty_pulls = 0;
            // Spread by hotkey over PULL_SPREAD_MS.
            let spread = self.own.key.hotkey().as_bytes()[..2]
                .iter()
                .fold(0u64, |acc, b| (acc << 8) | u64::from(*b))
                % PULL_SPREAD_MS;
            self.pull_at = Some(Instant::now() + PULL_FIRST + Duration::from_millis(spread));
        }
    }

    /// Pull sync: asks a connected peer, chosen at random each time, for its whole directory.
    /// Not the bootstrap peer in particular: at 256 nodes every node pulling from the one node
    /// they all joined through made it answer ~85 whole directories a second while the
    /// network started; any peer knows about as much, and the pulls spread over all of them.
    fn pull(&mut self) {
        self.pull_at = None;
        self.pull_turn = self.pull_turn.wrapping_add(1);
        let (seed, turn) = (self.fill_seed, self.pull_turn);
        // Peers on the record topic (not a short-lived swarm of `horde nodes` or the harness).
        let topic = gossip::topic().hash();
        let peer = self
            .swarm
            .behaviour()
            .gossip
            .all_peers()
            .filter(|(_, topics)| topics.contains(&&topic))
            .map(|(peer, _)| *peer)
            .min_by_key(|peer| order_key(&seed, b"pull", turn, &peer.to_bytes()));
        match peer {
            Some(peer) => self.pull_request = Some(self.send_own(peer, true)),
            // Nobody to ask now; again after the wait.
            None => self.pull_again(),
        }
    }

    /// Schedules the next pull, unless this join had its share.
    fn pull_again(&mut self) {
        self.pulls += 1;
        if self.pulls < MAX_PULLS {
            self.pull_at = Some(Instant::now() + PULL_WAIT);
        }
    }

    /// A whole directory arrived (a join fetch or a pull answered): unless done already, the
    /// second announcement is due [`SETTLE_DELAY`] from now, once this node has dialed its mesh
    /// peers from what it learned.
    fn directory_fetched(&mut self) {
        if !self.settled && self.settle.is_none() {
            self.settle = Some(Instant::now() + SETTLE_DELAY);
        }
    }

    fn on_connected(&mut self, peer: PeerId) {
        debug!(%peer, "discovery connection");
        let bootstrap = self.bootstrap.iter().any(|b| b.peer == peer);
        if bootstrap && !self.joined.contains(&peer) {
            // Joining: the whole directory, once, from the bootstrap peer; gossip from then on.
            self.joined.push(peer);
            self.join_request = Some(self.send_own(peer, true));
            self.start_pulls();
        } else if let Some(at) = self.refetch.iter().position(|p| *p == peer) {
            // A node of the kept directory (a restarted node): its fresh copy.
            self.refetch.swap_remove(at);
            let request = self.send_own(peer, true);
            self.refetching.push((request, peer));
            self.start_pulls();
        } else if bootstrap {
            // Back to a bootstrap peer that may have restarted: it learns our record at once.
            self.send_own(peer, false);
        }
    }

    fn on_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                num_established,
                endpoint,
                ..
            } => {
                self.stats.connections_opened += 1;
                self.dialing.remove(&peer_id);
                self.connections
                    .entry(peer_id)
                    .or_insert_with(|| Session::new(connection_id))
                    .open
                    .push(connection_id);
                if endpoint.is_dialer() {
                    self.dialed.insert(peer_id);
                    if self.is_bootstrap(&peer_id) {
                        self.bootstrap_dials.insert(connection_id);
                    }
                }
                if self.is_bootstrap(&peer_id) {
                    self.redial_wait = REDIAL_INTERVAL;
                }
                if self.is_backbone(&peer_id) {
                    self.backbone_wait = REDIAL_INTERVAL;
                }
                if num_established.get() == 1 {
                    self.on_connected(peer_id);
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                connection_id,
                num_established,
                cause,
                ..
            } => {
                self.stats.connections_closed += 1;
                self.bootstrap_dials.remove(&connection_id);
                debug!(peer = %peer_id, ?cause, "discovery connection closed");
                if let Some(session) = self.connections.get_mut(&peer_id) {
                    session.open.retain(|id| *id != connection_id);
                    if session.open.is_empty() {
                        self.connections.remove(&peer_id);
                    }
                }
                if num_established > 0 {
                    return;
                }
                // Whoever dialed it: a node whose peers all came to it (the bootstrap peer of
                // a network, whose joiners dial it and leave it once they have peers of their
                // own) had no node to dial when it learned them, connected as they were, and
                // once they left it was cut off from gossip (no mesh, so no record, no
                // capacity change, and its own record expiring everywhere) until its peers
                // noticed and dialed it again, a record lifetime later.
                self.dialed.remove(&peer_id);
                self.schedule_fill();
                self.redial_soon(Some(peer_id));
                self.backbone_lost(peer_id);
                self.rejoin_if_cut_off();
            }
            SwarmEvent::NewListenAddr { address, .. } => {
                if let Some(addr) = socket_addr(&address)
                    && !self.own.p2p_addrs.contains(&addr)
                {
                    self.own.p2p_addrs.push(addr);
                    self.own.refresh();
                    self.publish_own();
                }
            }
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                self.stats.dial_failures += 1;
                debug!(peer = ?peer_id, %error, "discovery dial failed");
                if let Some(peer) = peer_id
                    && self.dialing.remove(&peer)
                {
                    self.schedule_fill();
                }
                self.redial_soon(peer_id);
                if let Some(peer) = peer_id {
                    self.backbone_lost(peer);
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Records(event)) => self.on_records(event),
            SwarmEvent::Behaviour(BehaviourEvent::Gossip(event)) => self.on_gossip(event),
            _ => {}
        }
    }

    fn on_gossip(&mut self, event: gossipsub::Event) {
        match event {
            gossipsub::Event::Message {
                propagation_source,
                message_id,
                message,
            } => {
                self.stats.received += 1;
                self.stats.received_bytes += message.data.len() as u64;
                let mut verdict = gossip::judge(
                    &message.data,
                    &self.directory,
                    &self.own.key.hotkey(),
                    now(),
                );
                if matches!(verdict, Verdict::Ignore(_)) && self.exchanged.remove(&message_id) {
                    // The first announcement of a record an exchange brought (see `exchanged`).
                    verdict = Verdict::Forward;
                }
                let forwarded = matches!(verdict, Verdict::Forward);
                let acceptance = match verdict {
                    Verdict::Accept(accepted) => {
                        let (signed, record) = *accepted;
                        match self.keep(propagation_source, None, signed, record) {
                            Offer::New | Offer::Updated => MessageAcceptance::Accept,
                            Offer::Stale | Offer::Full => MessageAcceptance::Ignore,
                        }
                    }
                    Verdict::Forward => {
                        self.stats.forwarded += 1;
                        MessageAcceptance::Accept
                    }
                    Verdict::Ignore(reason) => {
                        debug!(peer = %propagation_source, reason, "gossiped record ignored");
                        MessageAcceptance::Ignore
                    }
                    Verdict::Reject(reason) => {
                        warn!(peer = %propagation_source, %reason, "gossiped record rejected; sender penalised");
                        MessageAcceptance::Reject
                    }
                };
                match acceptance {
                    // A second announcement forwarded is counted as such (no check kept it).
                    MessageAcceptance::Accept if forwarded => {}
                    MessageAcceptance::Accept => self.stats.accepted += 1,
                    MessageAcceptance::Ignore => self.stats.ignored += 1,
                    MessageAcceptance::Reject => self.stats.rejected += 1,
                }
                self.swarm
                    .behaviour_mut()
                    .gossip
                    .report_message_validation_result(&message_id, &propagation_source, acceptance);
            }
            // Only the record topic counts here (the capacity topic is a few nodes' extra).
            gossipsub::Event::Subscribed { topic, .. } if topic != gossip::topic().hash() => {}
            gossipsub::Event::Subscribed { .. } if !self.announced => {
                // The first peer to hear us: our record goes out now, not at the next refresh.
                self.publish_own();
            }
            // One more peer on the topic: maybe enough to leave the bootstrap peers.
            gossipsub::Event::Subscribed { .. } => self.schedule_leave(),
            _ => {}
        }
    }

    /// Keeps a checked record of another node; a newer record from a new run of a known node
    /// (a later `incarnation`) also closes a session with it that may be its old run's (see
    /// `restarted`). `own_over`: the connection the record came over when it is the sender's
    /// own (a record exchange), `None` for gossip and records relayed by others.
    fn keep(
        &mut self,
        via: PeerId,
        own_over: Option<ConnectionId>,
        signed: Signed<NodeRecord>,
        record: NodeRecord,
    ) -> Offer {
        let (role, hotkey, seq) = (record.role, record.hotkey, record.seq);
        let addrs = record.addrs.clone();
        let incarnation = record.incarnation;
        let held_incarnation = self.directory.incarnation_of(&hotkey);
        let offer = self.directory.offer(signed, record);
        if offer == Offer::Updated && held_incarnation.is_some_and(|held| held < incarnation) {
            self.restarted(peer_id(&hotkey), own_over);
        }
        if matches!(offer, Offer::New | Offer::Updated) {
            debug!(
                target: LATENCY_TARGET,
                %hotkey,
                seq,
                age_ms = now().0.saturating_sub(seq),
                %via,
                mesh = self.mesh_size(),
                "record kept"
            );
        }
        match offer {
            Offer::New => info!(%role, %hotkey, ?addrs, %via, "node discovered"),
            Offer::Updated => debug!(%role, %hotkey, seq, "node record updated"),
            Offer::Stale => {}
            Offer::Full => {
                warn!(%role, %hotkey, limit = MAX_DIRECTORY_RECORDS, "directory full; record dropped");
            }
        }
        offer
    }
}
