//! The ground floor: what every layer may use and that uses no other layer. The config
//! file, durable state files, logging, the clock and the poison-tolerant lock.
//! Must not import anything else in this crate.

pub mod clock;
pub mod config;
pub mod lock;
pub mod logging;
pub mod state;
