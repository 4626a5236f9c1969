//! Where log lines go: journald when the process runs under systemd (its stderr is the
//! journal stream), stderr otherwise; and [`Throttle`], which keeps a line a peer can
//! trigger at will to a bounded rate. Callers must never log keys, invite secrets or links.

use crate::base::config::LogLevel;
use crate::base::lock::Recover;

/// Installs the process-wide logger; a second call is ignored.
pub fn init(level: LogLevel) {
    let filter = level.filter();
    if systemd_journal_logger::connected_to_journal() {
        if let Ok(j) = systemd_journal_logger::JournalLog::new() {
            if j.install().is_ok() {
                log::set_max_level(filter);
                return;
            }
        }
    }
    let _ = env_logger::Builder::new()
        .filter_level(filter)
        .filter_module("boringtun", log::LevelFilter::Warn)
        .parse_env("WATCHALONG_LOG")
        .format_timestamp_millis()
        .try_init();
}

/// Lets one kind of log line through at most once per period and counts the rest, so a
/// peer that triggers it thousands of times a second cannot fill the journal.
pub struct Throttle {
    every: std::time::Duration,
    state: std::sync::Mutex<(Option<std::time::Instant>, u64)>,
}

impl Throttle {
    pub const fn new(every: std::time::Duration) -> Throttle {
        Throttle {
            every,
            state: std::sync::Mutex::new((None, 0)),
        }
    }

    /// `Some(n)` when a line may be written now, `n` being how many were held back since
    /// the last one; `None` when this one is held back.
    pub fn allow(&self) -> Option<u64> {
        let now = std::time::Instant::now();
        let mut st = self.state.locked();
        match st.0 {
            Some(last) if now.duration_since(last) < self.every => {
                st.1 += 1;
                None
            }
            _ => {
                let held = st.1;
                *st = (Some(now), 0);
                Some(held)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_throttle_lets_one_line_through_per_period_and_counts_the_rest() {
        let t = Throttle::new(std::time::Duration::from_secs(3600));
        assert_eq!(t.allow(), Some(0));
        for _ in 0..1000 {
            assert_eq!(t.allow(), None);
        }
        let t = Throttle::new(std::time::Duration::ZERO);
        assert_eq!(t.allow(), Some(0));
        assert_eq!(t.allow(), Some(0));
    }
}
