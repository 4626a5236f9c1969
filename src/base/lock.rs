//! A mutex lock that survives a panic elsewhere. A thread that panicked while holding a
//! lock leaves its data as it was; every lock in the daemon guards data that stays
//! consistent between statements, so the next holder takes it rather than spreading the
//! panic to every task. Written once here instead of at every `lock()`.

use std::sync::{Mutex, MutexGuard};

/// [`Mutex::lock`] that takes the data over from a holder that panicked.
pub trait Recover<T> {
    fn locked(&self) -> MutexGuard<'_, T>;
}

impl<T> Recover<T> for Mutex<T> {
    fn locked(&self) -> MutexGuard<'_, T> {
        self.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lock_whose_holder_panicked_is_taken_over_with_its_data() {
        let m = std::sync::Arc::new(Mutex::new(1));
        let m2 = m.clone();
        let _ = std::thread::spawn(move || {
            let mut g = m2.lock().unwrap();
            *g = 2;
            panic!("holder panics");
        })
        .join();
        assert!(m.is_poisoned());
        assert_eq!(*m.locked(), 2);
    }
}
