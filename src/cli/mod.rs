//! The command line's side of the house: what `watchalong` runs in the user's terminal
//! beside the daemon. [`args`] holds the commands as clap parses them, [`run`] what each
//! does through the typed control client, [`render`] how answers are printed, and
//! [`player`] keeps mpv in step with a room (or hands out a browser page the daemon keeps
//! in step), [`mount`] serves a share as a read-only folder, [`generate`] writes the man
//! pages and completions a package ships. May import every layer below it, through
//! the control API; the daemon never imports it.

pub mod args;
#[cfg(feature = "generate")]
pub mod generate;
#[cfg(feature = "mount")]
pub mod mount;
pub mod player;
pub mod render;
pub mod run;
