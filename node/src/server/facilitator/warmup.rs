//! What the facilitator tells a client when it has no miner for a job: still learning the
//! network ("warming up, retry in N s"), every executor of the class busy, or no miner of the
//! class at all.
//!
//! **Warming up** means: discovery runs, the facilitator started less than one record lifetime
//! ago (`[discovery] record_ttl_secs`, default 120 s: every live node re-signs and re-publishes
//! its record at least twice within it, so a node not heard of by then is not there), no miner
//! is configured statically, and its directory holds no miner record or no validator record
//! yet (and the facilitator has no eligible miner or no validator for the job). (Once it knows
//! a miner, a class no known miner lists is `NoMiner`.) Taken from what the facilitator sees (its
//! start time, its directory's contents), through the directory's public reading API only.

use std::sync::Arc;
use std::time::{Duration, Instant};

use horde_protocol::{ExecutorClass, Hotkey, Role};

use crate::clock::now;
use crate::server::discovery::Directory;

/// The longest pause a warming-up refusal asks for: the directory fills within a few record
/// exchanges, so a client asks again soon rather than at the end of the window.
pub(super) const WARMUP_RETRY_MAX: Duration = Duration::from_secs(1);

/// The facilitator's view of how far it has learnt the network.
#[derive(Debug)]
pub(super) struct WarmUp {
    started: Instant,
    window: Duration,
    directory: Option<Arc<Directory>>,
    static_miners: bool,
}

impl WarmUp {
    /// Starts the warm-up now; `window` is the record lifetime (zero without discovery).
    pub(super) fn new(
        window: Duration,
        directory: Option<Arc<Directory>>,
        static_miners: bool,
    ) -> Self {
        Self {
            started: Instant::now(),
            window,
            directory,
            static_miners,
        }
    }

    /// When the facilitator is still warming up (see the module docs): how long a client
    /// should wait before it asks again (at most [`WARMUP_RETRY_MAX`]).
    pub(super) fn retry_after(&self) -> Option<Duration> {
        let directory = self.directory.as_ref()?;
        let remaining = self.window.checked_sub(self.started.elapsed())?;
        if self.static_miners || remaining.is_zero() {
            return None;
        }
        // Records arrive one by one: a miner's may come before any validator's.
        let now = now();
        let missing =
            directory.count(Role::Miner, now) == 0 || directory.count(Role::Validator, now) == 0;
        missing.then(|| remaining.min(WARMUP_RETRY_MAX))
    }

    /// How many executors of `class` the discovered miners that `eligible` keeps have in all,
    /// free or not.
    pub(super) fn executors_of(
        &self,
        class: &ExecutorClass,
        eligible: impl Fn(&Hotkey) -> bool,
    ) -> u32 {
        let Some(directory) = &self.directory else {
            return 0;
        };
        directory
            .with_role(Role::Miner, now())
            .iter()
            .filter(|record| eligible(&record.hotkey))
            .flat_map(|record| &record.capacity)
            .filter(|capacity| capacity.class == *class)
            .fold(0u32, |sum, capacity| sum.saturating_add(capacity.total))
    }
}
