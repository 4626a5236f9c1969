//! Where log lines go: journald when the process runs under systemd (its stderr is the
//! journal stream), stderr otherwise. Callers must never log keys, invite secrets or links.

use crate::config::LogLevel;

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
