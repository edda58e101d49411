//! The node's own record on gossip: published at once when a first peer subscribes, on every
//! refresh and capacity change (a miner's capacity change on the capacity topic, see
//! `gossip::capacity_topic`), and once more, unchanged, after the join (`SETTLE_DELAY`).

use super::*;

impl SwarmTask {
    /// Publishes `data` on `topic`, counting it when it went out.
    fn publish_on(
        &mut self,
        topic: gossipsub::IdentTopic,
        data: Vec<u8>,
    ) -> Result<(), PublishError> {
        self.swarm.behaviour_mut().gossip.publish(topic, data)?;
        self.stats.published += 1;
        Ok(())
    }

    /// Publishes the own record, re-signed for a capacity change, on the capacity topic (to
    /// the connected facilitator and validators: a miner's relay among them); on the record
    /// topic when no peer on the capacity topic is connected yet, or for a node that does not
    /// have one of its own (not a miner).
    pub(super) fn publish_capacity(&mut self) -> bool {
        if self.own.role == Role::Miner {
            let data = gossip::encode(&self.own.current());
            match self.publish_on(gossip::capacity_topic(), data) {
                Ok(()) => {
                    self.published_at = Some(Instant::now());
                    return true;
                }
                Err(error) => {
                    info!(%error, "capacity change not published on its topic; on the record topic");
                    // gossipsub may have taken the message id before it failed (full queues,
                    // no peer above the publish threshold): the same bytes would now be refused
                    // as a duplicate on the record topic, so the record is signed anew.
                    self.own.refresh();
                }
            }
        }
        self.publish_own()
    }

    /// Publishes the own record on gossip (to every subscribed peer); whether it went out.
    pub(super) fn publish_own(&mut self) -> bool {
        let data = gossip::encode(&self.own.current());
        self.published_at = Some(Instant::now());
        match self.publish_on(gossip::topic(), data) {
            Ok(()) => {
                // A node that joins through a bootstrap peer announces again SETTLE_DELAY after
                // its join fetch is answered (by then it has dialed its mesh peers); one without
                // (a first facilitator) SETTLE_DELAY after this first announcement.
                if !self.announced && self.bootstrap.is_empty() {
                    self.settle = Some(Instant::now() + SETTLE_DELAY);
                }
                self.announced = true;
                true
            }
            // Nobody to tell yet: the first subscribed peer triggers a publish.
            Err(PublishError::NoPeersSubscribedToTopic | PublishError::Duplicate) => false,
            Err(error) => {
                debug!(%error, "own record not published");
                false
            }
        }
    }

    /// Publishes the own record a second time, unchanged (`gossip::encode_again`: checked only
    /// by nodes that lack it); whether it went out (or had gone out already).
    pub(super) fn announce_again(&mut self) -> bool {
        let data = gossip::encode_again(&self.own.current());
        match self.publish_on(gossip::topic(), data) {
            Ok(()) => true,
            // This very record was announced again already.
            Err(PublishError::Duplicate) => true,
            Err(PublishError::NoPeersSubscribedToTopic) => false,
            Err(error) => {
                debug!(%error, "own record not announced again");
                false
            }
        }
    }
}
