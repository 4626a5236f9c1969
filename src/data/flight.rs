//! Single flight: one fetch per key at a time, however many ask. The first asker runs
//! the fetch; the others wait for its result instead of fetching again, so a site's
//! gateway pulls each chunk over the internet once. A failed fetch is not remembered: the
//! next waiter runs its own. It owns only the table of fetches in flight; it must not
//! cache results past the flight, fetch, or hold its lock across an await.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};

use tokio::sync::OnceCell;

use crate::base::lock::Recover;

/// The fetches in flight, by key (a chunk's hash).
pub(super) struct Flights<T> {
    inflight: Mutex<HashMap<String, Arc<OnceCell<T>>>>,
}

impl<T: Clone> Flights<T> {
    pub(super) fn new() -> Flights<T> {
        Flights {
            inflight: Mutex::new(HashMap::new()),
        }
    }

    /// The result of `f` for `key`: run here when no fetch of `key` is in flight, else
    /// the one in flight's, once it lands.
    pub(super) async fn run<F, Fut, E>(&self, key: &str, f: F) -> Result<T, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let cell = self
            .inflight
            .locked()
            .entry(key.to_string())
            .or_insert_with(|| Arc::new(OnceCell::new()))
            .clone();
        let r = cell.get_or_try_init(f).await.cloned();
        let mut inflight = self.inflight.locked();
        if inflight.get(key).is_some_and(|c| Arc::ptr_eq(c, &cell)) {
            inflight.remove(key);
        }
        r
    }

    #[cfg(test)]
    fn in_flight(&self) -> usize {
        self.inflight.locked().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn two_askers_of_one_key_share_one_fetch_and_both_get_its_result() {
        let flights = Flights::<u32>::new();
        let runs = AtomicUsize::new(0);
        let (gate_tx, gate_rx) = tokio::sync::oneshot::channel::<()>();
        let first = flights.run("h", || async {
            runs.fetch_add(1, Ordering::SeqCst);
            // Held open until the second asker is waiting on the same flight.
            let _ = gate_rx.await;
            Ok::<u32, ()>(7)
        });
        let second = async {
            // The first asker has taken the flight before this one asks.
            while runs.load(Ordering::SeqCst) == 0 {
                tokio::task::yield_now().await;
            }
            let r = flights
                .run("h", || async {
                    runs.fetch_add(1, Ordering::SeqCst);
                    Ok::<u32, ()>(8)
                })
                .await;
            r
        };
        let release = async {
            while runs.load(Ordering::SeqCst) == 0 {
                tokio::task::yield_now().await;
            }
            // Let the second asker reach the cell before the fetch lands.
            for _ in 0..10 {
                tokio::task::yield_now().await;
            }
            let _ = gate_tx.send(());
        };
        let (a, b, ()) = tokio::join!(first, second, release);
        assert_eq!((a, b), (Ok(7), Ok(7)));
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert_eq!(
            flights.in_flight(),
            0,
            "a landed flight leaves nothing behind"
        );
    }

    #[tokio::test]
    async fn a_failed_fetch_wakes_the_other_asker_which_fetches_again_and_is_not_remembered() {
        let flights = Flights::<u32>::new();
        let runs = AtomicUsize::new(0);
        let (gate_tx, gate_rx) = tokio::sync::oneshot::channel::<()>();
        let first = flights.run("h", || async {
            runs.fetch_add(1, Ordering::SeqCst);
            let _ = gate_rx.await;
            Err::<u32, &str>("gateway down")
        });
        let second = async {
            while runs.load(Ordering::SeqCst) == 0 {
                tokio::task::yield_now().await;
            }
            flights
                .run("h", || async {
                    runs.fetch_add(1, Ordering::SeqCst);
                    Ok::<u32, &str>(9)
                })
                .await
        };
        let release = async {
            while runs.load(Ordering::SeqCst) == 0 {
                tokio::task::yield_now().await;
            }
            for _ in 0..10 {
                tokio::task::yield_now().await;
            }
            let _ = gate_tx.send(());
        };
        let (a, b, ()) = tokio::join!(first, second, release);
        assert_eq!(a, Err("gateway down"));
        assert_eq!(
            b,
            Ok(9),
            "the waiter ran its own fetch once the first failed"
        );
        assert_eq!(runs.load(Ordering::SeqCst), 2);
        // The failure is not kept: a later asker fetches afresh.
        let later = flights.run("h", || async { Ok::<u32, &str>(10) }).await;
        assert_eq!(later, Ok(10));
        assert_eq!(flights.in_flight(), 0);
    }
}
