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

#[cfg(test)]
mod tests {
    use super::*;

    fn hash(b: &[u8]) -> String {
        blake3::hash(b).to_hex().to_string()
    }

    #[test]
    fn a_chunk_put_is_got_back_and_one_never_put_is_not() {
        let d = tempfile::tempdir().unwrap();
        let c = Cache::new(d.path().join("cache"), 1024);
        c.put(&hash(b"abc"), b"abc");
        assert_eq!(c.get(&hash(b"abc")), Some(Bytes::from_static(b"abc")));
        assert_eq!(c.get(&hash(b"xyz")), None);
    }

    #[test]
    fn past_the_budget_the_oldest_chunks_go_first_from_the_table_and_the_disk() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("cache");
        let c = Cache::new(dir.clone(), 10);
        let chunks: [&[u8]; 3] = [b"aaaa", b"bbbb", b"cccc"];
        for b in chunks {
            c.put(&hash(b), b);
        }
        // 12 bytes put into 10: the first went.
        assert_eq!(c.get(&hash(b"aaaa")), None);
        assert!(!dir.join(hash(b"aaaa")).exists());
        assert!(c.get(&hash(b"bbbb")).is_some());
        assert!(c.get(&hash(b"cccc")).is_some());
        assert_eq!(c.state.locked().total, 8);
        // The same chunk again is not counted twice.
        c.put(&hash(b"cccc"), b"cccc");
        assert_eq!(c.state.locked().total, 8);
    }

    #[test]
    fn a_chunk_larger_than_the_whole_budget_is_not_kept_and_evicts_nothing() {
        let d = tempfile::tempdir().unwrap();
        let c = Cache::new(d.path().join("cache"), 4);
        c.put(&hash(b"ok"), b"ok");
        c.put(&hash(b"too large"), b"too large");
        assert_eq!(c.get(&hash(b"too large")), None);
        assert!(c.get(&hash(b"ok")).is_some());
    }

    #[test]
    fn what_a_previous_run_left_in_the_cache_dir_is_neither_served_nor_kept() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("cache");
        std::fs::create_dir_all(&dir).unwrap();
        // A file named after a hash, planted or left behind: not trusted.
        std::fs::write(dir.join(hash(b"old")), b"not what the hash says").unwrap();
        let c = Cache::new(dir.clone(), 1024);
        assert_eq!(c.get(&hash(b"old")), None);
        assert!(!dir.join(hash(b"old")).exists());
    }
}
