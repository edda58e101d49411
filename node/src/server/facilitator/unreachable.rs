//! Validators the facilitator could not reach lately, tried last for a while.
//!
//! A validator that died without closing its connections (`kill -9`, a lost host) keeps its
//! discovery record for up to its lifetime (about two minutes), so it stays among the
//! validators a job may be given to. Each job that tries it first waits out a whole QUIC
//! handshake timeout ([`horde_transport::HANDSHAKE_TIMEOUT`], 10 s) before the next validator is
//! tried: measured from outside on a 34-node network, one job in three took 10.2 s instead of
//! 0.2 s until the dead validator's record expired. A validator whose session could not be
//! opened is therefore put behind the others for [`UNREACHABLE_FOR`]: jobs go to the reachable
//! ones first, and it is still tried when they all fail (so a network whose every validator
//! was briefly unreachable is not refused on memory alone). A session it opens again clears it.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use horde_protocol::{Hotkey, NodeAddr};
use tracing::warn;

/// How long a validator whose session could not be opened is tried after the others.
pub(super) const UNREACHABLE_FOR: Duration = Duration::from_secs(60);

/// Validators whose session could not be opened, and when.
#[derive(Debug, Default)]
pub(super) struct Unreachable {
    since: Mutex<HashMap<Hotkey, Instant>>,
}

impl Unreachable {
    /// `validators` in the order to try them: from the rotating position `start` as before,
    /// with those that failed within [`UNREACHABLE_FOR`] moved behind the others (in the same
    /// rotation among themselves).
    pub(super) fn in_turn(&self, validators: Vec<NodeAddr>, start: usize) -> Vec<NodeAddr> {
        let count = validators.len().max(1);
        let mut rotated = validators;
        rotated.rotate_left(start % count);
        let now = Instant::now();
        let mut since = self.lock();
        since.retain(|_, at| now.duration_since(*at) < UNREACHABLE_FOR);
        let (later, first): (Vec<NodeAddr>, Vec<NodeAddr>) = rotated
            .into_iter()
            .partition(|validator| since.contains_key(&validator.hotkey));
        first.into_iter().chain(later).collect()
    }

    /// The validator's session could not be opened (a failed dial or handshake, a refused
    /// stream): logged, and the validator tried last for [`UNREACHABLE_FOR`].
    pub(super) fn failed(&self, validator: &Hotkey, error: &dyn std::fmt::Display) {
        warn!(%validator, %error, "validator unreachable");
        self.lock().insert(*validator, Instant::now());
    }

    /// A session to the validator opened: it is reachable again.
    pub(super) fn opened(&self, validator: &Hotkey) {
        self.lock().remove(validator);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Hotkey, Instant>> {
        self.since
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use horde_protocol::SecretKey;

    fn validators(count: usize) -> Vec<NodeAddr> {
        (0..count)
            .map(|i| {
                NodeAddr::new(
                    SecretKey::generate().hotkey(),
                    ([127, 0, 0, 1], 9000 + i as u16).into(),
                )
            })
            .collect()
    }

    /// The positions in `all` of the validators in `order`.
    fn positions(all: &[NodeAddr], order: &[NodeAddr]) -> Vec<usize> {
        order
            .iter()
            .map(|v| all.iter().position(|a| a.hotkey == v.hotkey).unwrap())
            .collect()
    }

    #[test]
    fn validators_rotate_and_an_unreachable_one_goes_last_until_it_opens_again() {
        let unreachable = Unreachable::default();
        let all = validators(3);
        let order = |start| positions(&all, &unreachable.in_turn(all.clone(), start));
        assert_eq!(order(0), [0, 1, 2]);
        assert_eq!(order(4), [1, 2, 0]);
        unreachable.failed(&all[1].hotkey, &"refused");
        assert_eq!(order(0), [0, 2, 1]);
        assert_eq!(order(1), [2, 0, 1]);
        assert_eq!(order(2), [2, 0, 1]);
        unreachable.opened(&all[1].hotkey);
        assert_eq!(order(1), [1, 2, 0]);
        assert!(unreachable.in_turn(Vec::new(), 5).is_empty());
    }

    #[test]
    fn an_unreachable_validator_is_tried_first_again_after_the_period() {
        let unreachable = Unreachable::default();
        let all = validators(2);
        let long_ago = Instant::now() - UNREACHABLE_FOR - Duration::from_millis(1);
        unreachable.lock().insert(all[0].hotkey, long_ago);
        assert_eq!(
            positions(&all, &unreachable.in_turn(all.clone(), 0)),
            [0, 1]
        );
        assert!(unreachable.lock().is_empty());
    }
}
