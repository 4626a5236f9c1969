//! The chunk cache: chunks this node fetched for nearby members, kept on disk within a
//! byte budget, oldest dropped first. A chunk is only served from here after its hash was
//! checked on the way in, and nothing a previous run left is trusted. It does blocking
//! file I/O: callers on the async runtime run it on a blocking thread. It must not
//! verify, fetch or decide what is cached.

use std::collections::{HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::Mutex;

use bytes::Bytes;

use crate::base::lock::Recover;

/// Chunks this node cached for others, on disk within a budget, oldest dropped first.
pub(super) struct Cache {
    dir: PathBuf,
    budget: u64,
    state: Mutex<CacheState>,
}

#[derive(Default)]
struct CacheState {
    order: VecDeque<(String, u64)>,
    held: HashSet<String>,
    total: u64,
}

impl Cache {
    pub(super) fn new(dir: PathBuf, budget: u64) -> Cache {
        // What a previous run cached is not trusted or counted: start empty.
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::create_dir_all(&dir);
        Cache {
            dir,
            budget,
            state: Mutex::new(CacheState::default()),
        }
    }

    fn path(&self, hash: &str) -> PathBuf {
        self.dir.join(hash)
    }

    pub(super) fn get(&self, hash: &str) -> Option<Bytes> {
        if !self.state.locked().held.contains(hash) {
            return None;
        }
        std::fs::read(self.path(hash)).ok().map(Bytes::from)
    }

    pub(super) fn put(&self, hash: &str, data: &[u8]) {
        let len = data.len() as u64;
        if len > self.budget {
            return;
        }
        let tmp = self.dir.join(format!("{hash}.tmp"));
        if std::fs::write(&tmp, data)
            .and_then(|()| std::fs::rename(&tmp, self.path(hash)))
            .is_err()
        {
            let _ = std::fs::remove_file(&tmp);
            return;
        }
        let mut st = self.state.locked();
        if !st.held.insert(hash.to_string()) {
            return;
        }
        st.order.push_back((hash.to_string(), len));
        st.total += len;
        while st.total > self.budget {
            let Some((old, n)) = st.order.pop_front() else {
                break;
            };
            st.held.remove(&old);
            st.total -= n;
            let _ = std::fs::remove_file(self.path(&old));
        }
    }
}
