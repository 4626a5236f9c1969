//! Getting chunks and files: a chunk for another member (from disk, the cache, or fetched
//! once along the route however many ask: [`Engine::serve_chunk`]), the requester's
//! [`fetch_chunk`], which verifies every chunk and routes around a failed gateway, and
//! [`get_file`], which writes verified chunks into a temp file beside the destination,
//! fsyncs and renames it. It writes only to the cache dir and the requested destination,
//! and only on blocking threads; it must not plan routes itself (the planner does) or
//! answer HTTP.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::base::lock::Recover;
use crate::data::blocking::blocking;
use crate::data::client::{ChunkRequest, Engine, TransferError};
use crate::data::directory::{Directory, Membership};
use crate::data::planner::{Route, Via};
use crate::data::share::Manifest;
use crate::group::identity::Key;
use bytes::Bytes;
use rand::RngCore;

/// Chunks a `get` keeps in flight.
const PARALLEL: usize = 4;
const MAX_TRIES: usize = 8;

impl Engine {
    /// One fetch per chunk at a time: concurrent askers wait for the same result, which
    /// is kept in the cache.
    async fn single_flight<F, Fut>(&self, hash: &str, f: F) -> Result<Bytes, TransferError>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<Bytes, TransferError>>,
    {
        let (cache, key) = (self.cache.clone(), hash.to_string());
        if let Some(b) = blocking(move || cache.get(&key)).await {
            return Ok(b);
        }
        self.flights
            .run(hash, || async {
                let b = f().await?;
                let (cache, key, kept) = (self.cache.clone(), hash.to_string(), b.clone());
                blocking(move || cache.put(&key, &kept)).await;
                Ok::<Bytes, TransferError>(b)
            })
            .await
    }

    /// Chunk `req` of a file this node holds, read on a blocking thread.
    async fn own_chunk(&self, req: &ChunkRequest) -> Result<Bytes, TransferError> {
        let (shares, req) = (self.shares.clone(), req.clone());
        let b = blocking(move || shares.chunk(&req.share, &req.path, req.index, &req.hash)).await?;
        Ok(Bytes::from(b))
    }

    /// A chunk for a member that asked this node: from disk when this node holds the
    /// file, else from the cache, else fetched along the route (once, however many ask).
    pub(super) async fn serve_chunk(
        &self,
        dir: &Directory,
        req: &ChunkRequest,
        as_gateway: bool,
    ) -> Result<Bytes, TransferError> {
        let source = req
            .source_key()
            .ok_or_else(|| TransferError::UnknownPeer(req.source.clone()))?;
        if source == dir.me {
            return self.own_chunk(req).await;
        }
        self.single_flight(&req.hash, || async {
            let route = if as_gateway {
                dir.plan_as_gateway(&source, &req.transfer)?
            } else {
                dir.plan(&source, &dir.me, &req.transfer, &[])?
            };
            let hop = route
                .feeder()
                .ok_or_else(|| TransferError::UnknownPeer(req.source.clone()))?;
            match self.fetch_from(dir, &hop.from_key, hop.via, req).await {
                Ok(b) => Ok(b),
                // The source side's gateway failed: ask the source itself.
                Err(e) if hop.from_key != source => {
                    log::debug!("gateway {} failed ({e}); asking the source", hop.from);
                    let via = if route.case == 4 {
                        Via::Lan
                    } else {
                        Via::Tunnel
                    };
                    self.fetch_from(dir, &source, via, req).await
                }
                Err(e) => Err(e),
            }
        })
        .await
    }

    /// The requester's fetch of one chunk, along its route, avoiding `exclude`.
    async fn get_chunk(
        &self,
        dir: &Directory,
        req: &ChunkRequest,
        route: &Route,
    ) -> Result<Bytes, TransferError> {
        let Some(hop) = route.feeder() else {
            return self.own_chunk(req).await;
        };
        if hop.via == Via::Tunnel {
            // This node pulls over the internet itself, so it is its site's gateway for
            // this transfer: one fetch shared with the neighbours asking its relay, and
            // kept in the cache for them.
            return self.serve_chunk(dir, req, true).await;
        }
        self.fetch_from(dir, &hop.from_key, hop.via, req).await
    }
}

/// Progress of one `get`, read by `watchalong get` while it runs.
#[derive(Debug, Default)]
pub struct Progress {
    pub size: AtomicU64,
    pub done: AtomicU64,
    pub corrupt: AtomicU64,
    pub route: Mutex<String>,
}

/// Fetches chunk `index` of `manifest` from `source` along the planner's route, verified,
/// trying another route (around a failed gateway) up to `MAX_TRIES` times. Gateways that
/// failed are added to `exclude`, shared by every worker of one transfer.
pub async fn fetch_chunk(
    engine: &Engine,
    members: &dyn Membership,
    source: &Key,
    manifest: &Manifest,
    index: u64,
    exclude: &Mutex<Vec<Key>>,
    progress: &Progress,
) -> Result<Bytes, TransferError> {
    let id = manifest.id();
    let req = ChunkRequest {
        source: crate::group::identity::key_to_base64(source),
        share: manifest.share.clone(),
        path: manifest.path.clone(),
        index,
        hash: manifest.chunks[index as usize].clone(),
        transfer: id.clone(),
        len: manifest.chunk_len(index),
    };
    let mut last = String::new();
    for _ in 0..MAX_TRIES {
        let dir = members.directory();
        let ex = exclude.locked().clone();
        let route = dir.plan(source, &dir.me, &id, &ex)?;
        *progress.route.locked() = describe(&route);
        // The hop that delivers to us, when it is a gateway (not the source).
        let gateway = route
            .feeder()
            .map(|h| h.from_key)
            .filter(|k| k != source && *k != dir.me);
        match engine.get_chunk(&dir, &req, &route).await {
            Ok(b) => return Ok(b),
            Err(e) => {
                if matches!(e, TransferError::Corrupt(_)) {
                    progress.corrupt.fetch_add(1, Ordering::Relaxed);
                }
                log::info!("chunk {index}: {e}; trying another route");
                last = e.to_string();
                // Route around the gateway that failed; the source has no stand-in.
                match gateway {
                    Some(g) => exclude.locked().push(g),
                    None => tokio::time::sleep(Duration::from_millis(300)).await,
                }
            }
        }
    }
    Err(TransferError::GiveUp(index, MAX_TRIES, last))
}

/// Fetches every chunk of `manifest` from `source` into `dest`: verified chunks written
/// at their offsets in a temp file beside `dest`, fsynced, then renamed over it.
pub async fn get_file(
    engine: Arc<Engine>,
    members: Arc<dyn Membership>,
    source: Key,
    manifest: Manifest,
    dest: PathBuf,
    progress: Arc<Progress>,
    resume: Option<PathBuf>,
) -> Result<(), TransferError> {
    progress.size.store(manifest.size, Ordering::Relaxed);
    let resuming = resume.is_some();
    let tmp = resume.unwrap_or_else(|| temp_beside(&dest));
    let write_err = |source| TransferError::Write {
        path: tmp.clone(),
        source,
    };
    // Without `resume`: a fresh name, opened only if it does not exist, so two gets to
    // one destination never share a temp file. With it: the caller's name for this
    // version, kept across a crash, whose chunks already there are checked and kept. A
    // planted symlink is never followed.
    let file = {
        let (tmp, size) = (tmp.clone(), manifest.size);
        blocking(move || {
            use std::os::unix::fs::OpenOptionsExt;
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(resuming)
                .create_new(!resuming)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&tmp)?;
            file.set_len(size)?;
            Ok(file)
        })
        .await
        .map_err(write_err)?
    };
    let file = Arc::new(file);
    let exclude: Arc<Mutex<Vec<Key>>> = Arc::new(Mutex::new(Vec::new()));
    let next = Arc::new(AtomicU64::new(0));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..PARALLEL.min(manifest.chunks.len().max(1)) {
        let (engine, members, manifest, file, exclude, next, progress) = (
            engine.clone(),
            members.clone(),
            manifest.clone(),
            file.clone(),
            exclude.clone(),
            next.clone(),
            progress.clone(),
        );
        workers.spawn(async move {
            loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                if index as usize >= manifest.chunks.len() {
                    return Ok::<(), TransferError>(());
                }
                if resuming && {
                    let (manifest, file) = (manifest.clone(), file.clone());
                    blocking(move || manifest.held_chunk(&file, index).is_some()).await
                } {
                    engine.resumed.fetch_add(1, Ordering::Relaxed);
                    progress
                        .done
                        .fetch_add(manifest.chunk_len(index), Ordering::Relaxed);
                    continue;
                }
                let b = fetch_chunk(
                    &engine, &*members, &source, &manifest, index, &exclude, &progress,
                )
                .await?;
                let (at, written, file) = (index * manifest.chunk_size, b.clone(), file.clone());
                blocking(move || {
                    use std::os::unix::fs::FileExt;
                    file.write_all_at(&written, at)
                })
                .await
                .map_err(|source| TransferError::Write {
                    path: PathBuf::from(&manifest.path),
                    source,
                })?;
                progress.done.fetch_add(b.len() as u64, Ordering::Relaxed);
            }
        });
    }
    let mut result = Ok(());
    while let Some(r) = workers.join_next().await {
        // A worker that panicked left holes in the file: that is a failure too.
        let failed = match r {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e),
            Err(e) => Some(TransferError::GiveUp(0, 0, format!("a worker died: {e}"))),
        };
        if let (Some(e), true) = (failed, result.is_ok()) {
            result = Err(e);
            workers.abort_all();
        }
    }
    if let Err(e) = result {
        // A resumable partial is kept: what it holds is not fetched again next time.
        if !resuming {
            let tmp = tmp.clone();
            blocking(move || {
                let _ = std::fs::remove_file(&tmp);
            })
            .await;
        }
        return Err(e);
    }
    {
        let file = file.clone();
        blocking(move || file.sync_all()).await.map_err(write_err)?;
    }
    let mode = manifest.mode;
    blocking(move || {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode & 0o777));
        std::fs::rename(&tmp, &dest).map_err(|source| TransferError::Write {
            path: dest.clone(),
            source,
        })?;
        if let Some(parent) = dest.parent() {
            let _ = std::fs::File::open(parent).and_then(|d| d.sync_all());
        }
        Ok(())
    })
    .await
}

pub fn describe(r: &Route) -> String {
    if r.hops.is_empty() {
        return "local".into();
    }
    let mut s = r.hops[0].from.clone();
    for h in &r.hops {
        let via = match h.via {
            Via::Tunnel => "tunnel",
            Via::Lan => "lan",
        };
        s.push_str(&format!(" -{via}-> {}", h.to));
    }
    format!("case {}: {s}", r.case)
}

fn temp_beside(dest: &Path) -> PathBuf {
    let mut n = [0u8; 6];
    rand::rngs::OsRng.fill_bytes(&mut n);
    let tag: String = n.iter().map(|b| format!("{b:02x}")).collect();
    crate::data::share::beside(dest, &format!(".watchalong-{tag}"))
}
