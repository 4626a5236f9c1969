//! Wall-clock time as the protocols carry it: seconds and milliseconds since the Unix
//! epoch. The one place that reads the system clock for timestamps; pure cores take `now`
//! as an argument instead and must not call it.

use std::time::{SystemTime, UNIX_EPOCH};

/// Seconds since the Unix epoch; 0 on a clock set before 1970.
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Milliseconds since the Unix epoch; 0 on a clock set before 1970.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_and_milliseconds_tell_the_same_time() {
        let (s, ms) = (now_secs(), now_ms());
        assert!(s > 1_600_000_000, "a clock after 2020");
        assert!((ms / 1000).abs_diff(s as i64) <= 1);
    }
}
