//! The capacity backbone: the links that carry a miner's record to the facilitator in two hops,
//! whatever the network's size. The facilitator and every validator are gossipsub *direct*
//! peers of each other (each forwards every record it accepts to the other, outside the mesh),
//! and every miner keeps a connection to one validator (its *relay*), to which its own record
//! goes at once (records are flood-published to every connected peer). A capacity change then
//! travels miner → relay → facilitator, instead of the ~8 mesh hops of a 256-node network.
//!
//! The facilitator is the node that acts on capacity (it picks the miner of every job); the
//! validators are few (a subnet has tens, against hundreds of miners), so each holds about
//! `miners / validators` relay connections and the facilitator one per validator. Roles are
//! self-declared in records: [`MAX_DIRECT_PEERS`] bounds what records claiming a role can make
//! a node hold.

use super::*;

/// At most this many direct peers (a facilitator's validators, a validator's facilitators),
/// chosen among the live records of that role in an order drawn at random at each start (so
/// that nobody can grind hotkeys that push the real validators out of a facilitator's set).
pub(super) const MAX_DIRECT_PEERS: usize = 32;

impl SwarmTask {
    /// The role of the nodes this node keeps as direct peers.
    fn direct_role(&self) -> Option<Role> {
        match self.own.role {
            Role::Facilitator => Some(Role::Validator),
            Role::Validator => Some(Role::Facilitator),
            _ => None,
        }
    }

    /// Whether `peer` is a backbone peer of this node: a direct peer or its relay.
    pub(super) fn is_backbone(&self, peer: &PeerId) -> bool {
        self.direct.contains(peer) || self.relay == Some(*peer)
    }

    /// Whether this node dials `peer` as a backbone peer (and keeps the connection): a
    /// validator dials its facilitators, a miner its relay; a facilitator waits for its
    /// validators to dial it.
    fn dials_backbone(&self, peer: &PeerId) -> bool {
        match self.own.role {
            Role::Validator => self.direct.contains(peer),
            Role::Miner => self.relay == Some(*peer),
            _ => false,
        }
    }

    /// Brings the backbone in line with the directory: direct peers added and removed as records
    /// of their role come and expire, a miner's relay chosen (again) when it has none or its
    /// relay's record expired, and the backbone peers this node dials dialed when not connected
    /// (unless a failed dial or a lost connection set the back-off timer).
    pub(super) fn keep_backbone(&mut self) {
        let now = now();
        if let Some(role) = self.direct_role() {
            let seed = self.fill_seed;
            let mut candidates: Vec<([u8; 32], PeerId)> = self
                .directory
                .with_role(role, now)
                .iter()
                .map(|record| {
                    let order = order_key(&seed, b"direct", 0, record.hotkey.as_bytes());
                    (order, peer_id(&record.hotkey))
                })
                .collect();
            candidates.sort_unstable_by_key(|(order, _)| *order);
            let wanted: std::collections::HashSet<PeerId> = candidates
                .into_iter()
                .take(MAX_DIRECT_PEERS)
                .map(|(_, peer)| peer)
                .collect();
            let gone: Vec<PeerId> = self.direct.difference(&wanted).copied().collect();
            for peer in gone {
                self.direct.remove(&peer);
                self.swarm
                    .behaviour_mut()
                    .gossip
                    .remove_explicit_peer(&peer);
                debug!(%peer, "direct peer removed (its record expired)");
            }
            for peer in wanted {
                if self.direct.insert(peer) {
                    self.swarm.behaviour_mut().gossip.add_explicit_peer(&peer);
                    debug!(%peer, "direct peer added");
                }
            }
        }
        if self.own.role == Role::Miner {
            let live = self
                .relay
                .and_then(|peer| hotkey_of(&peer))
                .is_some_and(|hotkey| self.directory.get(&hotkey, now).is_some());
            if !live {
                self.relay = self.choose_relay(now);
                if let Some(peer) = self.relay {
                    debug!(%peer, "relay chosen");
                }
            }
        }
        if self.backbone_at.is_none() {
            self.dial_backbone(now);
        }
    }

    /// A validator for a miner's relay: one it is connected to if any (a miner that joined
    /// through a validator keeps that connection instead of opening a second one), else one at
    /// random among the live ones (a new choice each round, so a relay that cannot be reached is
    /// not chosen again and again); never the relay it lost last while another is live (its
    /// record outlives it: a stopped or killed validator stays in directories until its record
    /// expires).
    fn choose_relay(&mut self, now: UnixMillis) -> Option<PeerId> {
        self.relay_round = self.relay_round.wrapping_add(1);
        let (seed, round, lost) = (self.fill_seed, self.relay_round, self.relay_lost);
        self.directory
            .with_role(Role::Validator, now)
            .iter()
            .map(|record| {
                let peer = peer_id(&record.hotkey);
                let order = order_key(&seed, b"relay", round, record.hotkey.as_bytes());
                let apart = !self.swarm.is_connected(&peer);
                ((Some(peer) == lost, apart, order), peer)
            })
            .min_by_key(|(key, _)| *key)
            .map(|(_, peer)| peer)
    }

    /// Dials the backbone peers this node dials that are not connected, at the first address of
    /// their record.
    fn dial_backbone(&mut self, now: UnixMillis) {
        let peers: Vec<PeerId> = self
            .direct
            .iter()
            .copied()
            .chain(self.relay)
            .filter(|peer| self.dials_backbone(peer) && !self.swarm.is_connected(peer))
            .collect();
        for peer in peers {
            let Some(addr) = hotkey_of(&peer)
                .and_then(|hotkey| self.directory.get(&hotkey, now))
                .and_then(|record| record.p2p_addrs.first().copied())
            else {
                continue;
            };
            let dial = DialOpts::peer_id(peer)
                .condition(PeerCondition::DisconnectedAndNotDialing)
                .addresses(vec![quic_multiaddr(addr)])
                .build();
            match self.swarm.dial(dial) {
                Ok(()) => debug!(%peer, "dialing a backbone peer"),
                Err(libp2p::swarm::DialError::DialPeerConditionFalse(_)) => {}
                Err(error) => {
                    debug!(%peer, %error, "cannot dial a backbone peer");
                    self.backbone_lost(peer);
                }
            }
        }
    }

    /// A backbone peer this node dials was lost (its connection closed, or a dial failed): it
    /// is dialed again after the back-off, which doubles with each loss in a row up to
    /// [`REDIAL_MAX`] (a connection that opens resets it), plus up to a quarter at random. A
    /// miner that lost its relay (or whose relay dial failed) chooses its next relay then,
    /// another validator when one is live.
    pub(super) fn backbone_lost(&mut self, peer: PeerId) {
        if !self.dials_backbone(&peer) {
            return;
        }
        if self.relay == Some(peer) && !self.swarm.is_connected(&peer) {
            self.relay = None;
            self.relay_lost = Some(peer);
        }
        if self.backbone_at.is_none() {
            self.backbone_at = Some(super::upkeep::back_off(&mut self.backbone_wait));
        }
    }

    /// The back-off after a lost backbone peer has passed.
    pub(super) fn backbone_due(&mut self) {
        self.backbone_at = None;
        self.keep_backbone();
    }
}
