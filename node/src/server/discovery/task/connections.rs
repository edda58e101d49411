//! The discovery task's connections by peer: a peer that restarted is connected afresh (its
//! old run's connections are dead, and gossipsub's state for it would stay the old run's), and
//! a node that stops closes every connection first, so that its peers learn at once.

use super::*;

/// How long a stopping node waits for its connections to close (see `SwarmTask::close_all`).
/// A peer that receives the CONNECTION_CLOSE leaves the connection at once, instead of sending
/// into it until its idle timeout (`GOSSIP_IDLE_TIMEOUT_MS`, 45 s) or until the node's next run
/// makes itself known (`SwarmTask::restarted`), and then connects to the next run afresh. On
/// loopback all close within milliseconds; the bound keeps a node whose peers are unreachable
/// from stalling its stop.
const CLOSE_WAIT: Duration = Duration::from_millis(500);

/// This node's open connections to one peer since it last had none. libp2p's gossipsub tells a
/// peer its topics only on the first connection of such a session, so a session begun with a
/// peer's old run keeps that run's state: the peer's new run, connected meanwhile, is never told
/// that this node is on the record topic.
#[derive(Debug)]
pub(super) struct Session {
    /// The connection that began the session.
    pub(super) first: ConnectionId,
    /// The open connections (the first one, if still open, among them).
    pub(super) open: Vec<ConnectionId>,
}

impl Session {
    pub(super) fn new(first: ConnectionId) -> Self {
        Self {
            first,
            open: Vec::new(),
        }
    }
}

impl SwarmTask {
    /// `peer` restarted (its record names a later `incarnation` than the one held). A session
    /// with it that began with its old run is closed whole: the old run's connections lead to a
    /// process that is gone (it cannot answer on them, and libp2p's endpoint sends no stateless
    /// reset), and a connection its new run opened meanwhile carries the old run's gossipsub
    /// state, in which this node never told the new run its topics, so the new run would never
    /// count this node for its mesh nor publish to it (a restarted facilitator whose peers all
    /// held connections to its old run published nothing, and the nodes it did not dial heard
    /// of its restart only at their idle timeout). Once closed, whichever side wants the
    /// connection dials again (a bootstrap redial, a mesh dial, the restarted node's dials of
    /// its kept directory), and the new session exchanges topics from the start.
    ///
    /// `own_over`: the connection the restarted peer's own record came over (a record
    /// exchange). When that connection began the session, the session is with the new run and
    /// is kept; otherwise (the record came on gossip, or over a later connection) whether the
    /// session began before the restart is not known for sure (the two wall clocks may differ),
    /// and it is closed: at worst one needless reconnection per peer of a restarted node.
    pub(super) fn restarted(&mut self, peer: PeerId, own_over: Option<ConnectionId>) {
        let Some(session) = self.connections.get(&peer) else {
            return;
        };
        if own_over == Some(session.first) {
            return;
        }
        info!(
            %peer,
            connections = session.open.len(),
            "peer restarted; closing the connections it had with its old run, to connect afresh"
        );
        for id in session.open.clone() {
            self.swarm.close_connection(id);
        }
    }

    /// Closes every connection and drives the swarm until each is closed (or [`CLOSE_WAIT`] has
    /// passed), so that the CONNECTION_CLOSE of each reaches its peer before the runtime, and
    /// with it quinn's connection drivers, is dropped. A connection that opens meanwhile is
    /// closed too; nothing else is done (no redial, no mesh dial, no publish).
    pub(super) async fn close_all(&mut self) {
        let mut open: std::collections::HashSet<ConnectionId> = self
            .connections
            .values()
            .flat_map(|session| session.open.iter().copied())
            .collect();
        open.retain(|id| self.swarm.close_connection(*id));
        let count = open.len();
        let started = Instant::now();
        let closing = async {
            while !open.is_empty() {
                match self.swarm.select_next_some().await {
                    SwarmEvent::ConnectionEstablished { connection_id, .. }
                        if self.swarm.close_connection(connection_id) =>
                    {
                        open.insert(connection_id);
                    }
                    SwarmEvent::ConnectionClosed { connection_id, .. } => {
                        open.remove(&connection_id);
                    }
                    _ => {}
                }
            }
            // The close of the last connection was just handed to its quinn driver (a task of
            // this runtime): one turn of the runtime sends it.
            tokio::task::yield_now().await;
        };
        let all = tokio::time::timeout(CLOSE_WAIT, closing).await.is_ok();
        debug!(
            connections = count,
            all_closed = all,
            waited_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            "discovery connections closed"
        );
    }
}
