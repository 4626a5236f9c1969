//! The command line's side of the house: what `watchalong` runs in the user's terminal
//! beside the daemon, such as mpv kept in step with a room.
//! May import every layer below it, through the control API; the daemon never imports it.

pub mod player;
