//! [`CountGuard`]: one live thing counted in a shared counter for as long as the guard
//! lives, so a count of timers or tasks stays right however they end (fired,
//! cancelled, or dropped with their runtime).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Counts one in `count` from its creation to its drop.
pub(crate) struct CountGuard(Arc<AtomicUsize>);

impl CountGuard {
    /// Adds one to `count`; the drop takes it away.
    pub(crate) fn new(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::SeqCst);
        CountGuard(count.clone())
    }
}

impl Drop for CountGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_while_alive() {
        let count = Arc::new(AtomicUsize::new(0));
        let a = CountGuard::new(&count);
        let b = CountGuard::new(&count);
        assert_eq!(count.load(Ordering::SeqCst), 2);
        drop(a);
        assert_eq!(count.load(Ordering::SeqCst), 1);
        drop(b);
        assert_eq!(count.load(Ordering::SeqCst), 0);
    }
}
