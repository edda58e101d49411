//! The record exchange (request-response beside gossip): join fetches, pulls and a restarted
//! node's refetch asked and answered, and the records of each exchange checked and kept.

use super::*;

impl SwarmTask {
    pub(super) fn on_records(&mut self, event: request_response::Event<RecordSync, RecordSync>) {
        match event {
            request_response::Event::Message {
                peer,
                connection_id,
                message,
            } => match message {
                request_response::Message::Request {
                    request, channel, ..
                } => {
                    let want_all = request.want_all;
                    self.accept(peer, connection_id, request);
                    let relayed = if want_all {
                        self.stats.fetches_served += 1;
                        let mut all = self.directory.signed_records(
                            &hotkey_of(&peer).unwrap_or(self.own.key.hotkey()),
                            now(),
                        );
                        all.truncate(MAX_SYNC_RECORDS);
                        all
                    } else {
                        Vec::new()
                    };
                    let answer = RecordSync {
                        own: Some(self.own.current()),
                        relayed,
                        want_all: false,
                    };
                    if self
                        .swarm
                        .behaviour_mut()
                        .records
                        .send_response(channel, answer)
                        .is_err()
                    {
                        debug!(%peer, "record exchange answer not sent: stream gone");
                    }
                }
                request_response::Message::Response {
                    response,
                    request_id,
                } => {
                    let whole = !response.relayed.is_empty();
                    let learned = self.accept(peer, connection_id, response);
                    if self.join_request == Some(request_id) {
                        self.join_request = None;
                    }
                    self.refetching.retain(|(id, _)| *id != request_id);
                    if whole {
                        self.directory_fetched();
                    }
                    if self.pull_request == Some(request_id) {
                        self.pull_request = None;
                        debug!(%peer, learned, "pull sync");
                        self.empty_pulls = if learned > 0 { 0 } else { self.empty_pulls + 1 };
                        if self.empty_pulls < EMPTY_PULLS {
                            self.pull_again();
                        }
                    }
                }
            },
            request_response::Event::OutboundFailure {
                peer,
                error,
                request_id,
                ..
            } => {
                debug!(%peer, %error, "record exchange failed");
                if self.join_request == Some(request_id) {
                    // Joined through this peer only once it answered: asked again now if it is
                    // still connected (a busy peer), else at the next connection to it.
                    self.join_request = None;
                    if self.swarm.is_connected(&peer) {
                        self.join_request = Some(self.send_own(peer, true));
                    } else {
                        self.joined.retain(|p| *p != peer);
                    }
                }
                if self.pull_request == Some(request_id) {
                    self.pull_request = None;
                    self.pull_again();
                }
                if let Some(at) = self.refetching.iter().position(|(id, _)| *id == request_id) {
                    // A restarted peer closes the connection it had from us before answering
                    // (`restarted`): the copy is asked for at the next connection to it.
                    let (_, peer) = self.refetching.swap_remove(at);
                    if !self.swarm.is_connected(&peer) && !self.refetch.contains(&peer) {
                        self.refetch.push(peer);
                    }
                }
            }
            request_response::Event::InboundFailure { peer, error, .. } => {
                debug!(%peer, %error, "record exchange refused");
            }
            request_response::Event::ResponseSent { .. } => {}
        }
    }

    /// Checks and keeps the records of one exchange (a join fetch, its answer, a peer's own
    /// record); returns how many nodes were new to the directory. Nothing is passed on: each node publishes
    /// its own record on gossip.
    fn accept(&mut self, from: PeerId, over: ConnectionId, sync: RecordSync) -> usize {
        let now = now();
        let own_hotkey = self.own.key.hotkey();
        let offered = sync.own.into_iter().map(|r| (r, true)).chain(
            sync.relayed
                .into_iter()
                .take(MAX_SYNC_RECORDS)
                .map(|r| (r, false)),
        );
        let mut learned = 0;
        for (signed, as_own) in offered {
            // A copy not newer than the held record changes nothing: no signature check (and for
            // a copy of the very record held, no decoding either).
            if self.directory.holds(&signed) {
                continue;
            }
            if let Some(held) = self.directory.seq_of(signed.signer())
                && let Ok(record) = from_bytes_exact::<NodeRecord>(signed.bytes())
                && record.seq <= held
            {
                continue;
            }
            let record = match check_record(&signed, now) {
                Ok(record) => record,
                // A relayed copy that ran out on the way is normal.
                Err(RecordRejection::Expired) if !as_own => continue,
                Err(reason) => {
                    warn!(peer = %from, signer = %signed.signer(), %reason, "node record dropped");
                    continue;
                }
            };
            if as_own && peer_id(&record.hotkey) != from {
                let reason = RecordRejection::PeerIdMismatch {
                    peer: hotkey_of(&from).map_or_else(|| from.to_string(), |h| h.to_string()),
                    named: record.hotkey,
                };
                warn!(peer = %from, %reason, "node record dropped");
                continue;
            }
            if record.hotkey == own_hotkey {
                continue;
            }
            let own_over = as_own.then_some(over);
            let announcement = as_own.then(|| gossip::message_id(&gossip::encode(&signed)));
            let offer = self.keep(from, own_over, signed, record);
            if let Some(id) = announcement
                && matches!(offer, Offer::New | Offer::Updated)
            {
                if self.exchanged.len() >= MAX_EXCHANGED {
                    self.exchanged.clear();
                }
                self.exchanged.insert(id);
            }
            if offer == Offer::New {
                learned += 1;
            }
        }
        learned
    }
}
