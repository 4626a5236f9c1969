//! The sync index of one read-write share: for each path the version held (content id,
//! version vector, deleted flag) and the size and mtime last seen there. It lives in a
//! redb file in the state directory, is read whole into memory when the share opens, and
//! every save writes the entries changed since the last one in a single transaction, so
//! a crash leaves either the old or the new index, never a mix. It owns the file and its
//! format; it knows nothing of scans, members or the network.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::base::lock::Recover;
use crate::sync::versions::FileVersion;

/// Path in the share → [`Entry`] as JSON: small, and readable in a debugger.
const ENTRIES: TableDefinition<&str, &[u8]> = TableDefinition::new("entries");

#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("cannot open the sync index {path}: {source}")]
    Open { path: PathBuf, source: redb::Error },
    #[error("cannot read the sync index {path}: {source}")]
    Read { path: PathBuf, source: redb::Error },
    #[error("the sync index {path} holds a damaged entry for {key:?}: {source}")]
    Decode {
        path: PathBuf,
        key: String,
        source: serde_json::Error,
    },
    #[error("cannot write the sync index {path}: {source}")]
    Write { path: PathBuf, source: redb::Error },
}

/// What the index remembers of one path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub version: FileVersion,
    /// Size and mtime (ns) of the file as last seen or written, to notice local edits
    /// without hashing.
    pub size: u64,
    pub mtime_ns: u128,
    /// The permission bits the path had when last seen or written: what a scan compares,
    /// not the version's mode (a file system may not take that one). `None` in entries
    /// written before modes were recorded.
    #[serde(default)]
    pub mode: Option<u32>,
}

/// One stored record of the index file (the file may have been damaged or edited).
pub fn decode_entry(bytes: &[u8]) -> Result<Entry, serde_json::Error> {
    serde_json::from_slice(bytes)
}

/// The index in memory, with the paths changed since the last save.
#[derive(Debug, Default)]
pub struct Index {
    map: BTreeMap<String, Entry>,
    dirty: BTreeSet<String>,
}

impl Index {
    pub fn get(&self, path: &str) -> Option<&Entry> {
        self.map.get(path)
    }

    pub fn insert(&mut self, path: String, entry: Entry) {
        if self.map.get(&path) != Some(&entry) {
            self.dirty.insert(path.clone());
            self.map.insert(path, entry);
        }
    }

    pub fn values(&self) -> impl Iterator<Item = &Entry> + Clone {
        self.map.values()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &Entry)> {
        self.map.iter()
    }

    /// The entries changed since the last call, to be written.
    fn take_dirty(&mut self) -> Vec<(String, Entry)> {
        let dirty = std::mem::take(&mut self.dirty);
        dirty
            .into_iter()
            .filter_map(|p| self.map.get(&p).cloned().map(|e| (p, e)))
            .collect()
    }

    /// Entries whose write failed: written again by the next save.
    fn mark_dirty(&mut self, paths: impl IntoIterator<Item = String>) {
        self.dirty.extend(paths);
    }
}

/// The index file.
pub struct Store {
    path: PathBuf,
    db: redb::Database,
}

impl Store {
    /// Opens (or creates) the index at `path` and reads it.
    pub fn open(path: &Path) -> Result<(Store, Index), IndexError> {
        let open = |source: redb::Error| IndexError::Open {
            path: path.to_path_buf(),
            source,
        };
        let db = redb::Database::create(path).map_err(|e| open(e.into()))?;
        let store = Store {
            path: path.to_path_buf(),
            db,
        };
        let index = store.read()?;
        Ok((store, index))
    }

    fn read(&self) -> Result<Index, IndexError> {
        let read = |source: redb::Error| IndexError::Read {
            path: self.path.clone(),
            source,
        };
        let txn = self.db.begin_read().map_err(|e| read(e.into()))?;
        let table = match txn.open_table(ENTRIES) {
            Ok(t) => t,
            // A new index has no table until the first save.
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Index::default()),
            Err(e) => return Err(read(e.into())),
        };
        let mut map = BTreeMap::new();
        for row in table.iter().map_err(|e| read(e.into()))? {
            let (k, v) = row.map_err(|e| read(e.into()))?;
            let key = k.value().to_string();
            let entry = decode_entry(v.value()).map_err(|source| IndexError::Decode {
                path: self.path.clone(),
                key: key.clone(),
                source,
            })?;
            map.insert(key, entry);
        }
        Ok(Index {
            map,
            dirty: BTreeSet::new(),
        })
    }

    /// Writes what changed in `index` since the last save, in one transaction. The caller
    /// serialises saves, so an older snapshot never lands after a newer one.
    pub fn save(&self, index: &std::sync::Mutex<Index>) -> Result<(), IndexError> {
        let changed = index.locked().take_dirty();
        if changed.is_empty() {
            return Ok(());
        }
        let written = self.write(&changed);
        if written.is_err() {
            index
                .locked()
                .mark_dirty(changed.into_iter().map(|(p, _)| p));
        }
        written
    }

    fn write(&self, changed: &[(String, Entry)]) -> Result<(), IndexError> {
        let write = |source: redb::Error| IndexError::Write {
            path: self.path.clone(),
            source,
        };
        let txn = self.db.begin_write().map_err(|e| write(e.into()))?;
        {
            let mut table = txn.open_table(ENTRIES).map_err(|e| write(e.into()))?;
            for (path, entry) in changed {
                // An Entry always serialises; the fallback only keeps this free of unwrap.
                let bytes = serde_json::to_vec(entry).unwrap_or_default();
                table
                    .insert(path.as_str(), bytes.as_slice())
                    .map_err(|e| write(e.into()))?;
            }
        }
        txn.commit().map_err(|e| write(e.into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::versions::VersionVector;

    fn entry(path: &str, n: u64) -> Entry {
        Entry {
            version: FileVersion {
                path: path.into(),
                vv: VersionVector::default().bumped("a"),
                deleted: false,
                mtime: n,
                node: "a".into(),
                content: format!("c{n}"),
                size: n,
                mode: None,
            },
            size: n,
            mtime_ns: n as u128,
            mode: None,
        }
    }

    #[test]
    fn saved_entries_are_there_after_reopening() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("i.redb");
        {
            let (store, index) = Store::open(&path).unwrap();
            let index = std::sync::Mutex::new(index);
            index
                .lock()
                .unwrap()
                .insert("a.txt".into(), entry("a.txt", 1));
            index
                .lock()
                .unwrap()
                .insert("d/b.txt".into(), entry("d/b.txt", 2));
            store.save(&index).unwrap();
            index
                .lock()
                .unwrap()
                .insert("a.txt".into(), entry("a.txt", 3));
            store.save(&index).unwrap();
        }
        let (_store, index) = Store::open(&path).unwrap();
        assert_eq!(index.get("a.txt"), Some(&entry("a.txt", 3)));
        assert_eq!(index.get("d/b.txt"), Some(&entry("d/b.txt", 2)));
        assert_eq!(index.values().count(), 2);
    }

    #[test]
    fn an_unchanged_entry_is_not_written_again() {
        let mut index = Index::default();
        index.insert("a".into(), entry("a", 1));
        assert_eq!(index.take_dirty().len(), 1);
        index.insert("a".into(), entry("a", 1));
        assert!(index.take_dirty().is_empty());
    }

    #[test]
    fn a_file_that_is_not_an_index_is_refused_with_its_path() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("i.redb");
        std::fs::write(&path, b"not a database at all, just some text").unwrap();
        let err = Store::open(&path).err().expect("must fail");
        assert!(err.to_string().contains("i.redb"), "{err}");
    }
}
