//! The discovery task's upkeep: the directory kept on disk (loaded at start, written after
//! changes) and the connections kept (bootstrap redials with back-off, leaving the bootstrap
//! peers once the node has its own peers and joining them again when it loses them, and the few
//! directory nodes each node dials for its gossip mesh).

use super::*;

/// One step of a redial back-off: when to dial again (`wait` from now, plus up to a quarter of
/// it at random, so that nodes that lost the same peer do not dial it together), with `wait`
/// doubled for the next loss in a row, up to [`REDIAL_MAX`].
pub(super) fn back_off(wait: &mut Duration) -> Instant {
    let now_wait = *wait;
    *wait = (now_wait * 2).min(REDIAL_MAX);
    let quarter = u64::try_from(now_wait.as_millis() / 4).unwrap_or(0).max(1);
    let jitter = u64::from_le_bytes(random_seed()[..8].try_into().unwrap_or([0; 8])) % quarter;
    Instant::now() + now_wait + Duration::from_millis(jitter)
}

impl SwarmTask {
    /// Loads the directory kept by an earlier run (every record checked again, expired ones
    /// dropped) and dials a few of its nodes for a fresh copy at once.
    pub(super) fn load(&mut self) {
        let Some(path) = self.state_dir.as_ref().map(|d| d.join(DIRECTORY_FILE)) else {
            return;
        };
        let Ok(bytes) = std::fs::read(&path) else {
            return;
        };
        let records: Vec<Signed<NodeRecord>> = match from_bytes_exact(&bytes) {
            Ok(records) => records,
            Err(error) => {
                warn!(path = %path.display(), %error, "kept directory unreadable; ignored");
                return;
            }
        };
        let now = now();
        let own = self.own.key.hotkey();
        let mut dial = Vec::new();
        for signed in records.into_iter().take(MAX_DIRECTORY_RECORDS) {
            let Ok(record) = check_record(&signed, now) else {
                continue;
            };
            if record.hotkey == own {
                continue;
            }
            if dial.len() < DIAL_LOADED
                && let Some(addr) = record.p2p_addrs.first()
            {
                dial.push((peer_id(&record.hotkey), quic_multiaddr(*addr)));
            }
            self.directory.offer(signed, record);
        }
        info!(records = self.directory.len(), "kept directory loaded");
        for (peer, addr) in dial {
            self.refetch.push(peer);
            let opts = libp2p::swarm::dial_opts::DialOpts::peer_id(peer)
                .addresses(vec![addr])
                .build();
            if let Err(error) = self.swarm.dial(opts) {
                debug!(%peer, %error, "cannot dial a known node");
            }
        }
    }

    /// Sets the write timer while the directory holds changes not on disk: at once when nothing
    /// is on disk yet (a node killed in its first second then still knows peers to dial when it
    /// restarts; without any it dials no one and waits for its peers' idle timeouts),
    /// [`SAVE_MEMBERS_DELAY`] from now when a node joined or left, else [`SAVE_INTERVAL`] after
    /// the last write.
    pub(super) fn schedule_save(&mut self) {
        if self.state_dir.is_none() {
            return;
        }
        let (saved_version, saved_members, saved_at) = self.saved;
        if *self.directory.subscribe().borrow() == saved_version {
            return;
        }
        let soon = if saved_members == 0 {
            Instant::now()
        } else {
            Instant::now() + SAVE_MEMBERS_DELAY
        };
        let due = if self.directory.len() == saved_members {
            (saved_at + SAVE_INTERVAL).max(soon)
        } else {
            soon
        };
        self.save_at = Some(self.save_at.map_or(due, |at| at.min(due)));
    }

    /// Writes the directory to disk when it changed since the last write: at once when its
    /// size changed (a node joined or left) or when `now`, else every [`SAVE_INTERVAL`].
    pub(super) fn save(&mut self, now_: bool) {
        let Some(dir) = &self.state_dir else {
            return;
        };
        let version = *self.directory.subscribe().borrow();
        let members = self.directory.len();
        let (saved_version, saved_members, saved_at) = self.saved;
        let due = now_ || members != saved_members || saved_at.elapsed() >= SAVE_INTERVAL;
        if version == saved_version || !due {
            return;
        }
        // One write at a time: a change made meanwhile is written once this one is done.
        if !now_ && self.saving.as_ref().is_some_and(|w| !w.is_finished()) {
            self.save_at = Some(Instant::now() + SAVE_MEMBERS_DELAY);
            return;
        }
        let records = self.directory.signed_records(&self.own.key.hotkey(), now());
        let path = dir.join(DIRECTORY_FILE);
        let bytes = to_bytes(&records);
        self.saved = (version, members, Instant::now());
        let write = move || {
            if let Err(error) = crate::atomic_file::write_atomically(&path, &bytes, 0o644) {
                warn!(path = %path.display(), %error, "directory not kept on disk");
            }
        };
        if now_ {
            // Stopping: on disk before the node exits.
            write();
        } else {
            // Off the discovery thread: the write syncs the file and its directory, which on a
            // busy disk blocked the thread's packets and timers for seconds (every node writes
            // within a second of a node joining, so 256 nodes starting together wrote ~256
            // times a second), long enough for peers' QUIC idle timeouts.
            self.saving = Some(tokio::task::spawn_blocking(write));
        }
    }

    /// Dials the bootstrap peers that are not connected. A dial that fails, or a connection to
    /// one that is lost later, sets the timer for the next try (`redial_soon`).
    pub(super) fn redial(&mut self) {
        if self.left {
            return;
        }
        for peer in &self.bootstrap {
            if self.swarm.is_connected(&peer.peer) {
                continue;
            }
            let dial = libp2p::swarm::dial_opts::DialOpts::peer_id(peer.peer)
                .addresses(vec![peer.addr.clone()])
                .build();
            match self.swarm.dial(dial) {
                Ok(()) => {}
                // A dial already under way reports its own end.
                Err(libp2p::swarm::DialError::DialPeerConditionFalse(_)) => {}
                Err(error) => {
                    debug!(%peer, %error, "cannot dial bootstrap peer");
                    self.redial_at
                        .get_or_insert(Instant::now() + REDIAL_INTERVAL);
                }
            }
        }
    }

    /// Sets the redial timer when `peer` is a bootstrap peer no longer connected: the wait
    /// doubles with each loss or failed dial in a row (up to [`REDIAL_MAX`]), plus up to a
    /// quarter of it at random, so that nodes that lost the same peer do not dial it together.
    pub(super) fn redial_soon(&mut self, peer: Option<PeerId>) {
        let Some(peer) = peer else { return };
        if self.is_bootstrap(&peer)
            && !self.left
            && !self.swarm.is_connected(&peer)
            && self.redial_at.is_none()
        {
            self.redial_at = Some(back_off(&mut self.redial_wait));
        }
    }

    pub(super) fn is_bootstrap(&self, peer: &PeerId) -> bool {
        self.bootstrap.iter().any(|b| b.peer == *peer)
    }

    /// How many peers other than the bootstrap peers are connected on the record topic.
    fn topic_peers(&self) -> usize {
        let topic = gossip::topic().hash();
        self.swarm
            .behaviour()
            .gossip
            .all_peers()
            .filter(|(peer, topics)| topics.contains(&&topic) && !self.is_bootstrap(peer))
            .count()
    }

    /// How many peers this node's gossip mesh holds on the record topic.
    pub(super) fn mesh_size(&self) -> usize {
        let topic = gossip::topic().hash();
        self.swarm.behaviour().gossip.mesh_peers(&topic).count()
    }

    /// Whether every bootstrap peer's record is live in the directory.
    fn bootstrap_records_live(&self) -> bool {
        let now = now();
        self.bootstrap.iter().all(|b| {
            hotkey_of(&b.peer).is_some_and(|hotkey| self.directory.get(&hotkey, now).is_some())
        })
    }

    /// Whether this node may close the connections it dialed to its bootstrap peers (see
    /// [`LEAVE_PEERS`]).
    fn may_leave(&self) -> bool {
        !self.left
            && !self.stay
            && !self.bootstrap_dials.is_empty()
            && self.settled
            && self.join_request.is_none()
            && self.topic_peers() >= LEAVE_PEERS
            && self.bootstrap_records_live()
    }

    /// Sets the leave timer when this node may leave its bootstrap peers.
    pub(super) fn schedule_leave(&mut self) {
        if self.leave_at.is_none() && self.may_leave() {
            self.leave_at = Some(Instant::now() + LEAVE_DELAY);
        }
    }

    /// Closes the connections this node dialed to its bootstrap peers, if it still may (a
    /// connection a bootstrap peer dialed to this node, for its own mesh, stays).
    pub(super) fn leave(&mut self) {
        self.leave_at = None;
        if !self.may_leave() {
            return;
        }
        self.left = true;
        self.redial_at = None;
        info!(
            connections = self.bootstrap_dials.len(),
            peers = self.topic_peers(),
            "own peers found; leaving the bootstrap connection"
        );
        // A connection to a bootstrap peer that is also a backbone peer (a validator's
        // facilitator) stays: the backbone keeps it from now on.
        let kept: std::collections::HashSet<ConnectionId> = self
            .connections
            .iter()
            .filter(|(peer, _)| self.is_backbone(peer))
            .flat_map(|(_, session)| session.open.iter().copied())
            .collect();
        for id in self.bootstrap_dials.drain() {
            if !kept.contains(&id) {
                self.swarm.close_connection(id);
            }
        }
    }

    /// After this node left its bootstrap peers: dials them again, and keeps them for the rest
    /// of the run, when it has fewer than [`REJOIN_PEERS`] other peers on the record topic or a
    /// bootstrap peer's record expired (see [`REJOIN_PEERS`]).
    pub(super) fn rejoin_if_cut_off(&mut self) {
        if !self.left {
            return;
        }
        let peers = self.topic_peers();
        let live = self.bootstrap_records_live();
        if peers >= REJOIN_PEERS && live {
            return;
        }
        info!(
            peers,
            bootstrap_record_live = live,
            "cut off from the network; rejoining the bootstrap peers"
        );
        self.left = false;
        self.stay = true;
        self.redial_wait = REDIAL_INTERVAL;
        self.redial();
    }

    /// How many directory nodes this node has dialed for its mesh (connected or under way);
    /// backbone peers (`backbone.rs`) are not counted.
    pub(super) fn mesh_dialed(&self) -> usize {
        self.dialed
            .iter()
            .filter(|p| !self.is_bootstrap(p) && !self.is_backbone(p))
            .count()
            + self.dialing.len()
    }

    /// Sets the dial timer while this node has dialed fewer than [`MESH_DIALS`] nodes.
    pub(super) fn schedule_fill(&mut self) {
        if self.fill_at.is_none() && self.mesh_dialed() < MESH_DIALS {
            self.fill_at = Some(Instant::now() + FILL_DELAY);
        }
    }

    /// Dials nodes of the directory, chosen at random among those not connected, until
    /// [`MESH_DIALS`] are dialed.
    pub(super) fn fill(&mut self) {
        self.fill_at = None;
        let wanted = MESH_DIALS.saturating_sub(self.mesh_dialed());
        if wanted == 0 {
            return;
        }
        self.fill_round = self.fill_round.wrapping_add(1);
        let own = self.own.key.hotkey();
        let mut candidates: Vec<([u8; 32], PeerId, std::net::SocketAddr)> = self
            .directory
            .p2p_addrs(now())
            .into_iter()
            .filter(|(hotkey, _)| *hotkey != own)
            .filter_map(|(hotkey, addr)| {
                let peer = peer_id(&hotkey);
                // Bootstrap peers are dialed (and left) by `redial` and `leave` alone, backbone
                // peers by `keep_backbone`.
                if self.is_bootstrap(&peer)
                    || self.is_backbone(&peer)
                    || self.swarm.is_connected(&peer)
                    || self.dialing.contains(&peer)
                {
                    return None;
                }
                let order = order_key(&self.fill_seed, b"fill", self.fill_round, hotkey.as_bytes());
                Some((order, peer, addr))
            })
            .collect();
        candidates.sort_unstable_by_key(|candidate| candidate.0);
        for (_, peer, addr) in candidates.into_iter().take(wanted) {
            let dial = DialOpts::peer_id(peer)
                .condition(PeerCondition::DisconnectedAndNotDialing)
                .addresses(vec![quic_multiaddr(addr)])
                .build();
            match self.swarm.dial(dial) {
                Ok(()) => {
                    self.stats.mesh_dials += 1;
                    self.dialing.insert(peer);
                }
                Err(error) => debug!(%peer, %error, "cannot dial a directory node"),
            }
        }
    }
}
