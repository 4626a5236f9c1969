//! Blocking file work off the async workers: [`blocking`] runs a closure on tokio's
//! blocking pool and hands back its value, so a slow disk stalls one pool thread, not the
//! runtime's few workers (which `block_in_place` would, and which it cannot do on a
//! current-thread runtime at all). It owns no state; it must not be used for work that
//! waits on a lock other tasks hold across an await.

/// The value of `f`, computed on the blocking pool. A panic in `f` is raised again here,
/// as it would have been had `f` run inline.
pub async fn blocking<T, F>(f: F) -> T
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    match tokio::task::spawn_blocking(f).await {
        Ok(v) => v,
        Err(e) => match e.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            // Only a runtime shutting down cancels blocking work, and it drops this task
            // too: nobody waits here for long.
            Err(_) => std::future::pending().await,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn blocking_work_runs_and_returns_its_value_even_on_a_current_thread_runtime() {
        let tid = std::thread::current().id();
        let (v, there) = blocking(move || (6 * 7, std::thread::current().id())).await;
        assert_eq!(v, 42);
        assert_ne!(
            there, tid,
            "the work ran on the blocking pool, not the runtime's thread"
        );
    }
}
