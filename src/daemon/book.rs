//! What the node persists: the [`Book`] (group, invites, gossip state) that one lock
//! guards, the names of its files in the state directory, the group a node starts with
//! (its own, hosted), how an invite record reads, and [`GroupSaver`], which writes the
//! group file outside that lock in the order its snapshots were taken. It decides nothing about membership and sits below the node's
//! other files, which all read it.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use ed25519_dalek::SigningKey;

use crate::base::clock::now_secs;
use crate::base::config::Config;
use crate::base::lock::Recover;
use crate::base::state::{self, StateError};
use crate::group::gossip::Gossip;
use crate::group::identity::Key;
use crate::group::link::{InviteBook, InviteRecord, RedeemError};
use crate::group::mesh::{self, MemberRecord, Mesh};
use crate::group::place::Group;

pub const GROUP_FILE: &str = "group.json";
pub const INVITES_FILE: &str = "invites.json";

/// What is persisted, changed under one lock.
pub struct Book {
    pub group: Group,
    pub invites: InviteBook,
    pub gossip: Gossip,
}

/// The group file's writes, made outside the book lock in the order their snapshots
/// were taken under it.
#[derive(Default)]
pub struct GroupSaver {
    /// The stamp of the last snapshot taken; only ever bumped under the book lock, so
    /// stamps follow the order of the group's changes.
    taken: AtomicU64,
    /// The stamp of the newest snapshot written. Held while one is written: writes never
    /// overlap (they share a temporary file), and one older than what is on disk is
    /// dropped instead of landing after a newer one.
    written: Mutex<u64>,
}

/// The group as it stood when the snapshot was taken, and when that was.
pub struct GroupSnapshot {
    stamp: u64,
    group: Group,
}

impl GroupSaver {
    /// Copies `group`; call it under the book lock that guards `group`.
    pub fn take(&self, group: &Group) -> GroupSnapshot {
        GroupSnapshot {
            stamp: self.taken.fetch_add(1, Ordering::SeqCst) + 1,
            group: group.clone(),
        }
    }

    /// Writes `snap` to `path` unless a newer snapshot is there already. True when
    /// written.
    pub fn write(&self, path: &Path, snap: &GroupSnapshot) -> Result<bool, StateError> {
        let mut written = self.written.locked();
        if *written > snap.stamp {
            return Ok(false);
        }
        state::write_json(path, &snap.group)?;
        *written = snap.stamp;
        Ok(true)
    }
}

/// An invite's state as `watchalong links` shows it.
pub fn invite_state(r: &InviteRecord, now: u64) -> &'static str {
    match r.status(now) {
        Ok(()) => "open",
        Err(RedeemError::AlreadyUsed) => "used",
        Err(RedeemError::Expired) => "expired",
        Err(RedeemError::Revoked) => "revoked",
        Err(RedeemError::Unknown) => "unknown",
    }
}

/// A node's own group of one, of which it is the host.
pub fn hosted_group(config: &Config, wg: Key, signing: &SigningKey) -> Group {
    let network = config.tunnel.network;
    let my_address = network.hosts().next().unwrap_or(network.addr());
    let mut mesh = Mesh::new(wg, signing.verifying_key().to_bytes());
    let me = MemberRecord {
        wg_key: wg,
        sign_key: signing.verifying_key().to_bytes(),
        name: config.node.name.clone(),
        address: my_address,
        admitted_at: now_secs(),
        version: 1,
        revoked: false,
        observed: None,
    };
    let _ = mesh.accept_member(&mesh::sign_member(signing, &me));
    Group {
        network,
        host_name: config.node.name.clone(),
        my_address,
        mesh,
        endpoints: BTreeMap::new(),
        admitted_by: BTreeMap::new(),
        static_peers: Vec::new(),
    }
}

/// A group hosted by a node called `name`, for the daemon folder's tests.
#[cfg(test)]
pub(super) fn group_named(name: &str) -> Group {
    let mut config = Config::default();
    config.node.name = name.into();
    hosted_group(&config, [1; 32], &SigningKey::from_bytes(&[1; 32]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_older_group_snapshot_written_after_a_newer_one_does_not_replace_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(GROUP_FILE);
        let saver = GroupSaver::default();
        let older = saver.take(&group_named("older"));
        let newer = saver.take(&group_named("newer"));
        assert!(saver.write(&path, &newer).unwrap());
        assert!(
            !saver.write(&path, &older).unwrap(),
            "the older one is dropped"
        );
        let on_disk: Group = state::read_json(&path).unwrap().unwrap();
        assert_eq!(on_disk.host_name, "newer");
        // In order, each lands.
        let next = saver.take(&group_named("next"));
        assert!(saver.write(&path, &next).unwrap());
        let on_disk: Group = state::read_json(&path).unwrap().unwrap();
        assert_eq!(on_disk.host_name, "next");
    }
}
