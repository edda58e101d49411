//! The wall clock, read in one place: the protocol is sans-IO and takes times as arguments, so
//! every caller (client and roles alike) asks this module for "now".

use std::time::{Duration, SystemTime};

use horde_protocol::UnixMillis;

/// The current time as [`UnixMillis`] (0 before the epoch; saturated far in the future).
pub fn now() -> UnixMillis {
    let millis = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    UnixMillis(u64::try_from(millis).unwrap_or(u64::MAX))
}

/// `duration` in whole milliseconds, saturating (the protocol counts time in milliseconds).
pub fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn now_is_after_2024_and_moves_forward() {
        let first = now();
        assert!(first.0 > 1_704_067_200_000, "{first:?}");
        std::thread::sleep(std::time::Duration::from_millis(2));
        assert!(now() > first);
    }
}
