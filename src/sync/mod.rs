//! Read-write shares kept alike on every member: version vectors and their rules, the
//! index on disk, kept versions of what sync replaced, and a share's sync state.
//! May import `base`, `group`, `net` and `data`; must not import `watch`, `control` or
//! `daemon`.

pub mod apply;
pub mod disk;
pub mod flights;
pub mod folder;
pub mod index;
pub mod kept;
pub mod versions;
pub mod writers;
