//! The executors the facilitator has just given jobs to, before the miners' records say so.
//!
//! A miner re-publishes its record when an executor is reserved (within about 100 ms), but a
//! second job submitted in that window would read the old record, see the same executor free,
//! and be sent to a miner that can only decline it `Busy`. So every assignment is a *claim* on
//! one free executor of its class at that miner, counted against the record the facilitator
//! read when it assigned: a claim stops counting once a newer record of the miner arrives (its
//! free count has the reservation in it, or the executor is free again), or after
//! [`CLAIM_LIFETIME`] if none does. Choosing a miner and claiming its executor happen under
//! one lock, so two jobs cannot both take the last free executor.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use horde_protocol::{ExecutorClass, Hotkey};

/// How long a claim counts when no newer record of its miner arrives: a miner that reserved
/// re-publishes within a second; one that did not is not held back for long.
pub(super) const CLAIM_LIFETIME: Duration = Duration::from_secs(10);

/// What a miner's record says of one class: its free executors, and the record's sequence
/// number. `None` for a configured miner (it publishes no record; it declines `Busy` itself).
pub(super) type Offered = Option<(u32, u64)>;

#[derive(Debug)]
struct Claim {
    class: ExecutorClass,
    /// The sequence number of the record the claim was counted against.
    seq: u64,
    until: Instant,
}

/// The claims, by miner.
#[derive(Debug, Default)]
pub(super) struct Claims {
    by_miner: Mutex<HashMap<Hotkey, Vec<Claim>>>,
}

impl Claims {
    /// Under one lock: keeps the candidates (`(miner, what its record offers)`) that still have
    /// an unclaimed free executor of `class`, lets `choose` pick one of them, and claims an
    /// executor of the one picked.
    pub(super) fn choose_and_claim<T>(
        &self,
        class: &ExecutorClass,
        candidates: Vec<(T, Hotkey, Offered)>,
        choose: impl FnOnce(&[T]) -> Option<usize>,
    ) -> Option<T> {
        let now = Instant::now();
        let mut by_miner = self
            .by_miner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        by_miner.retain(|_, claims| {
            claims.retain(|claim| claim.until > now);
            !claims.is_empty()
        });
        let mut kept = Vec::new();
        let mut keys = Vec::new();
        for (candidate, miner, offered) in candidates {
            let unclaimed = match offered {
                None => true,
                Some((free, seq)) => {
                    let pending = by_miner.get(&miner).map_or(0, |claims| {
                        claims
                            .iter()
                            .filter(|claim| claim.class == *class && claim.seq >= seq)
                            .count()
                    });
                    usize::try_from(free).is_ok_and(|free| free > pending)
                }
            };
            if unclaimed {
                kept.push(candidate);
                keys.push((miner, offered));
            }
        }
        let index = choose(&kept)?;
        let (miner, offered) = *keys.get(index)?;
        if let Some((_, seq)) = offered {
            by_miner.entry(miner).or_default().push(Claim {
                class: class.clone(),
                seq,
                until: now + CLAIM_LIFETIME,
            });
        }
        Some(kept.swap_remove(index))
    }

    /// Gives back a claim on `miner`'s executors of `class` whose job never reached the miner
    /// (no validator took it): no newer record would end it. The newest such claim goes.
    pub(super) fn release(&self, miner: &Hotkey, class: &ExecutorClass) {
        let mut by_miner = self
            .by_miner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(claims) = by_miner.get_mut(miner)
            && let Some(index) = claims.iter().rposition(|claim| claim.class == *class)
        {
            claims.remove(index);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use horde_protocol::SecretKey;

    fn cpu() -> ExecutorClass {
        ExecutorClass("cpu".into())
    }

    fn first(candidates: &[Hotkey]) -> Option<usize> {
        (!candidates.is_empty()).then_some(0)
    }

    #[test]
    fn a_claimed_executor_is_not_given_twice_until_a_newer_record_arrives() {
        let claims = Claims::default();
        let miner = SecretKey::generate().hotkey();
        let offer = |free, seq| vec![(miner, miner, Some((free, seq)))];
        assert_eq!(
            claims.choose_and_claim(&cpu(), offer(1, 7), first),
            Some(miner)
        );
        // Same record (seq 7, one free): the executor is claimed.
        assert_eq!(claims.choose_and_claim(&cpu(), offer(1, 7), first), None);
        // An older record cannot bring it back either.
        assert_eq!(claims.choose_and_claim(&cpu(), offer(1, 6), first), None);
        // Another class of the same miner is not affected.
        let gpu = ExecutorClass("gpu".into());
        assert_eq!(
            claims.choose_and_claim(&gpu, offer(1, 7), first),
            Some(miner)
        );
        // The miner's next record counts for itself (here: free again).
        assert_eq!(
            claims.choose_and_claim(&cpu(), offer(1, 8), first),
            Some(miner)
        );
        // A claim given back (the job never reached the miner) frees the executor at once.
        assert_eq!(claims.choose_and_claim(&cpu(), offer(1, 8), first), None);
        claims.release(&miner, &cpu());
        assert_eq!(
            claims.choose_and_claim(&cpu(), offer(1, 8), first),
            Some(miner)
        );
    }

    #[test]
    fn two_free_executors_take_two_claims_and_configured_miners_are_never_claimed() {
        let claims = Claims::default();
        let miner = SecretKey::generate().hotkey();
        let offer = vec![(miner, miner, Some((2, 1)))];
        assert!(
            claims
                .choose_and_claim(&cpu(), offer.clone(), first)
                .is_some()
        );
        assert!(
            claims
                .choose_and_claim(&cpu(), offer.clone(), first)
                .is_some()
        );
        assert!(claims.choose_and_claim(&cpu(), offer, first).is_none());
        let configured = SecretKey::generate().hotkey();
        for _ in 0..3 {
            let offer = vec![(configured, configured, None)];
            assert_eq!(
                claims.choose_and_claim(&cpu(), offer, first),
                Some(configured)
            );
        }
    }

    #[test]
    fn the_choice_is_among_unclaimed_miners_only() {
        let claims = Claims::default();
        let busy = SecretKey::generate().hotkey();
        let free = SecretKey::generate().hotkey();
        claims.choose_and_claim(&cpu(), vec![(busy, busy, Some((1, 3)))], first);
        let both = vec![(busy, busy, Some((1, 3))), (free, free, Some((1, 3)))];
        let seen = std::cell::RefCell::new(Vec::new());
        let chosen = claims.choose_and_claim(&cpu(), both, |candidates| {
            seen.borrow_mut().extend_from_slice(candidates);
            first(candidates)
        });
        assert_eq!(chosen, Some(free));
        assert_eq!(*seen.borrow(), vec![free]);
    }
}
