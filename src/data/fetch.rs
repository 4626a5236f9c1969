//! Getting chunks and files: a chunk for another member (from disk, the cache, or fetched
//! once along the route however many ask: [`Engine::serve_chunk`]), the requester's
//! [`fetch_chunk`], which verifies every chunk and routes around a failed gateway, and
//! [`get_file`], which keeps as many chunks in flight as the path holds ([`Window`]) and
//! writes verified chunks into a temp file beside the destination, fsyncs and renames it.
//! It writes only to the cache dir and the requested destination,
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

const MAX_TRIES: usize = 8;

/// How many chunks one transfer keeps in flight: enough to keep its path busy while each
/// chunk waits a round trip. The rule is twice the bandwidth-delay product in chunks,
/// plus one: `2 × rate × round trip / chunk + 1`, within [`Window::FLOOR`] and
/// [`Window::CEILING`]. The rate is measured over the last chunks that arrived, the round
/// trip is the shortest wait for an answer's head from the hop that feeds us (the pool
/// keeps it), which through a gateway also counts the gateway's own fetch. The rate
/// measured with `w` in flight is at most what `w` allows, so the rule must ask for more
/// than it measured or it never leaves where it started: with a gain of one, `w` grows
/// only while a chunk takes less than `w / (w − 1)` round trips, and at a distance a
/// chunk takes more (the holder reads and hashes it, each kept connection's window grows
/// with it), so a 1 Gbit/s path at 50 ms sat at the floor. With a gain of two the window
/// doubles while the path has room and settles at twice the path's product where it is
/// full: one product of queue at most, and never beyond the ceiling (BBR's startup and
/// window gains are the model). Each in-flight chunk is a request on its own kept
/// connection (HTTP/1.1 answers one at a time), so the ceiling stays under the pool's
/// bound per peer.
pub struct Window {
    chunk: u64,
    /// When the last chunks arrived and their sizes, oldest first.
    arrivals: std::collections::VecDeque<(std::time::Instant, u64)>,
}

impl Window {
    /// Today's fixed count before this rule: a path measured as short never gets less.
    pub const FLOOR: usize = 4;
    /// Under the pool's bound per peer, leaving connections for a stream or a sync
    /// beside a `get`.
    pub const CEILING: usize = 16;
    /// Arrivals the rate is measured over.
    const SAMPLES: usize = 16;
    /// How far past the measured product the window reaches (see the rule above).
    const GAIN: f64 = 2.0;

    pub fn new(chunk: u64) -> Window {
        Window {
            chunk: chunk.max(1),
            arrivals: std::collections::VecDeque::new(),
        }
    }

    /// A chunk of `bytes` arrived at `now`.
    pub fn arrived(&mut self, now: std::time::Instant, bytes: u64) {
        if self.arrivals.len() == Self::SAMPLES {
            self.arrivals.pop_front();
        }
        self.arrivals.push_back((now, bytes));
    }

    /// Bytes per second over the last arrivals (those after the first of them).
    fn rate(&self) -> Option<f64> {
        let (first, _) = self.arrivals.front()?;
        let (last, _) = self.arrivals.back()?;
        let secs = last.duration_since(*first).as_secs_f64();
        let bytes: u64 = self.arrivals.iter().skip(1).map(|(_, b)| b).sum();
        (secs > 0.0 && bytes > 0).then(|| bytes as f64 / secs)
    }

    /// Chunks to keep in flight, given the path's round trip when known.
    pub fn target(&self, round_trip: Option<Duration>) -> usize {
        let (Some(rate), Some(rtt)) = (self.rate(), round_trip) else {
            return Self::FLOOR;
        };
        let bdp = rate * rtt.as_secs_f64() / self.chunk as f64;
        // Float to integer saturates; the clamp bounds it either way.
        ((Self::GAIN * bdp).ceil() as usize)
            .saturating_add(1)
            .clamp(Self::FLOOR, Self::CEILING)
    }
}

/// The round trip of the hop that feeds this node chunks of `id` from `source` now.
pub fn feeder_round_trip(
    engine: &Engine,
    members: &dyn Membership,
    source: &Key,
    id: &str,
    exclude: &Mutex<Vec<Key>>,
) -> Option<Duration> {
    let dir = members.directory();
    let ex = exclude.locked().clone();
    let route = dir.plan(source, &dir.me, id, &ex).ok()?;
    let hop = route.feeder()?;
    engine.round_trip(&dir, &hop.from_key, hop.via)
}

impl Engine {
    /// One fetch per chunk at a time: concurrent askers wait for the same result, which
    /// is kept in the cache. The cache is read inside the flight, not before it: an asker
    /// that missed the cache and then found no flight (the one in flight landed while it
    /// looked) would otherwise fetch the chunk over the internet a second time.
    async fn single_flight<F, Fut>(&self, hash: &str, f: F) -> Result<Bytes, TransferError>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<Bytes, TransferError>>,
    {
        self.flights
            .run(hash, || async {
                let (cache, key) = (self.cache.clone(), hash.to_string());
                if let Some(b) = blocking(move || cache.get(&key)).await {
                    return Ok(b);
                }
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
        let b = blocking(move || {
            let at = req.offset.map(|offset| (offset, req.len));
            shares.chunk(&req.share, &req.path, req.index, at, &req.hash)
        })
        .await?;
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
        if hop.via == Via::Tunnel && dir.has_neighbours() {
            // This node pulls over the internet itself, so it is its site's gateway for
            // this transfer: one fetch shared with the neighbours asking its relay, and
            // kept in the cache for them. With no neighbour the cache would only cost a
            // second write of every chunk.
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
        offset: Some(manifest.chunk_offset(index)),
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
                // A member that cannot be reached was logged once by the pool; a
                // line per chunk would bury it.
                if matches!(e, TransferError::Unreachable(..)) {
                    log::debug!("chunk {index}: {e}; trying another route");
                } else {
                    log::info!("chunk {index}: {e}; trying another route");
                }
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
    // Shared, not copied per chunk: a big file's manifest lists thousands of hashes.
    let manifest = Arc::new(manifest);
    let exclude: Arc<Mutex<Vec<Key>>> = Arc::new(Mutex::new(Vec::new()));
    let count = manifest.chunks.len() as u64;
    let id = manifest.id();
    let mut window = Window::new(manifest.chunk_size);
    let mut round_trip = None;
    let mut next = 0u64;
    let mut inflight = tokio::task::JoinSet::new();
    let mut result = Ok(());
    loop {
        // Chunks start in file order; as many are in flight as the window says.
        while result.is_ok() && next < count && inflight.len() < window.target(round_trip) {
            inflight.spawn(one_chunk(
                engine.clone(),
                members.clone(),
                source,
                manifest.clone(),
                next,
                file.clone(),
                exclude.clone(),
                progress.clone(),
                resuming,
            ));
            next += 1;
        }
        let Some(r) = inflight.join_next().await else {
            break;
        };
        // A task that panicked left a hole in the file: that is a failure too.
        match r {
            Ok(Ok(Some(bytes))) => {
                window.arrived(std::time::Instant::now(), bytes);
                round_trip = feeder_round_trip(&engine, &*members, &source, &id, &exclude);
            }
            Ok(Ok(None)) => {}
            Ok(Err(e)) if result.is_ok() => {
                result = Err(e);
                inflight.abort_all();
            }
            Err(e) if result.is_ok() => {
                result = Err(TransferError::GiveUp(0, 0, format!("a worker died: {e}")));
                inflight.abort_all();
            }
            Ok(Err(_)) | Err(_) => {}
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

/// Chunk `index` of `manifest` into `file`: kept when a resumed partial already holds it
/// (`None`), else fetched, verified and written at its offset (`Some(its length)`).
#[allow(clippy::too_many_arguments)]
async fn one_chunk(
    engine: Arc<Engine>,
    members: Arc<dyn Membership>,
    source: Key,
    manifest: Arc<Manifest>,
    index: u64,
    file: Arc<std::fs::File>,
    exclude: Arc<Mutex<Vec<Key>>>,
    progress: Arc<Progress>,
    resuming: bool,
) -> Result<Option<u64>, TransferError> {
    if resuming && {
        let (manifest, file) = (manifest.clone(), file.clone());
        blocking(move || manifest.held_chunk(&file, index).is_some()).await
    } {
        engine.resumed.fetch_add(1, Ordering::Relaxed);
        progress
            .done
            .fetch_add(manifest.chunk_len(index), Ordering::Relaxed);
        return Ok(None);
    }
    let b = fetch_chunk(
        &engine, &*members, &source, &manifest, index, &exclude, &progress,
    )
    .await?;
    let len = b.len() as u64;
    let at = manifest.chunk_offset(index);
    blocking(move || {
        use std::os::unix::fs::FileExt;
        file.write_all_at(&b, at)
    })
    .await
    .map_err(|source| TransferError::Write {
        path: PathBuf::from(&manifest.path),
        source,
    })?;
    progress.done.fetch_add(len, Ordering::Relaxed);
    Ok(Some(len))
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn askers_arriving_while_a_chunk_lands_never_fetch_it_a_second_time() {
        use crate::group::auth::Proofs;
        let d = tempfile::tempdir().unwrap();
        let engine = Arc::new(Engine::new(
            crate::data::share::Shares::new(Vec::new(), crate::data::share::CHUNK_SIZE),
            Arc::new(Proofs::new(x25519_dalek::StaticSecret::from([1; 32]))),
            0,
            d.path().join("cache"),
            1 << 20,
        ));
        let fetches = Arc::new(AtomicU64::new(0));
        // Askers start spread over the flight's life and past its end, so some look at
        // the cache just before the chunk lands and reach the flights just after.
        for round in 0..20u32 {
            let hash = format!("chunk-{round}");
            let mut askers = tokio::task::JoinSet::new();
            for i in 0..24u64 {
                let (engine, fetches, hash) = (engine.clone(), fetches.clone(), hash.clone());
                askers.spawn(async move {
                    tokio::time::sleep(Duration::from_micros(i * 150)).await;
                    engine
                        .single_flight(&hash, || async {
                            fetches.fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(Duration::from_millis(2)).await;
                            Ok(Bytes::from_static(b"the chunk"))
                        })
                        .await
                });
            }
            while let Some(r) = askers.join_next().await {
                assert_eq!(r.unwrap().unwrap(), Bytes::from_static(b"the chunk"));
            }
        }
        assert_eq!(fetches.load(Ordering::SeqCst), 20, "one fetch per chunk");
    }

    const CHUNK: u64 = 256 * 1024;

    /// A window fed chunks arriving at `rate` bytes per second.
    fn fed(rate: f64) -> Window {
        let mut w = Window::new(CHUNK);
        let t0 = Instant::now();
        for i in 0..20u32 {
            w.arrived(
                t0 + Duration::from_secs_f64(f64::from(i) * CHUNK as f64 / rate),
                CHUNK,
            );
        }
        w
    }

    const MBIT: f64 = 1_000_000.0 / 8.0;

    #[test]
    fn before_anything_is_measured_the_window_is_its_floor() {
        let mut w = Window::new(CHUNK);
        assert_eq!(w.target(Some(Duration::from_millis(150))), Window::FLOOR);
        w.arrived(Instant::now(), CHUNK);
        assert_eq!(w.target(Some(Duration::from_millis(150))), Window::FLOOR);
        assert_eq!(fed(100.0 * MBIT).target(None), Window::FLOOR);
    }

    #[test]
    fn the_window_is_twice_the_bandwidth_delay_product_in_chunks_plus_one_within_floor_and_ceiling()
    {
        // 100 Mbit/s × 75 ms = 0.94 MB = 3.6 chunks: twice is 7.2, so 8, plus one.
        assert_eq!(fed(100.0 * MBIT).target(Some(Duration::from_millis(75))), 9);
        // 20 Mbit/s × 50 ms is 0.48 chunks: the floor.
        assert_eq!(
            fed(20.0 * MBIT).target(Some(Duration::from_millis(50))),
            Window::FLOOR
        );
        // 1 Gbit/s × 150 ms is 72 chunks: the ceiling.
        assert_eq!(
            fed(1000.0 * MBIT).target(Some(Duration::from_millis(150))),
            Window::CEILING
        );
    }

    /// A path of `link` bytes per second and round trip `rtt`, where each chunk in
    /// flight waits `trips` round trips and then its share of the link: what `get`
    /// measures with `w` chunks in flight. Returns where the window settles.
    fn settle(link: f64, rtt: Duration, trips: f64) -> usize {
        let mut w = Window::FLOOR;
        for _ in 0..100 {
            let per_chunk = trips * rtt.as_secs_f64() + CHUNK as f64 / link;
            let rate = (w as f64 * CHUNK as f64 / per_chunk).min(link);
            let next = fed(rate).target(Some(rtt));
            if next == w {
                return w;
            }
            w = next;
        }
        panic!("the window never settled");
    }

    #[test]
    fn the_window_grows_until_the_path_is_full_and_settles_at_twice_its_product() {
        // 50 Mbit/s, 150 ms: full at 3.6 chunks in flight; twice that is 7.2: 8, plus one.
        assert_eq!(settle(50.0 * MBIT, Duration::from_millis(150), 1.0), 9);
        // 20 Mbit/s, 150 ms: 1.4 chunks fill it; the floor holds.
        assert_eq!(
            settle(20.0 * MBIT, Duration::from_millis(150), 1.0),
            Window::FLOOR
        );
        // 1 Gbit/s, 1 ms: a short path never runs to the ceiling.
        assert_eq!(
            settle(1000.0 * MBIT, Duration::from_millis(1), 1.0),
            Window::FLOOR
        );
    }

    #[test]
    fn a_window_whose_chunks_each_take_two_round_trips_still_grows_to_fill_a_long_fat_path() {
        // 1 Gbit/s at 50 ms holds 24 chunks. A chunk that waits two round trips (the
        // holder reads it, the kept connection's window grows) measures half the rate
        // the window allows: with a gain of one the rule asked for w / 2 + 1 and stayed
        // at the floor.
        assert_eq!(
            settle(1000.0 * MBIT, Duration::from_millis(50), 2.0),
            Window::CEILING
        );
    }
}
