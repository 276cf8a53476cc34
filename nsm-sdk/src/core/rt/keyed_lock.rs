//! [`KeyedLock`]: a value per key behind a fair async lock, so the calls for one key run
//! one at a time, in the order they came, and calls for other keys do not wait.
//!
//! `begin` keeps each connection's state in one (keyed by connection id) and the
//! registry's keyed timers keep each name's timer in one. Removing a key marks its value
//! dead under its lock: a call that was waiting for it then looks the key up again (and
//! finds a new value or none) instead of acting on a removed one.
//!
//! State: the map of keys to their locked values; one allocation per key (the lock and
//! the value together).

use std::collections::HashMap;
use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::OwnedMutexGuard;

/// See the [module docs](self).
pub(crate) struct KeyedLock<S> {
    map: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Held<S>>>>>,
}

/// A key's value and whether it was removed from the map.
pub(crate) struct Held<S> {
    dead: bool,
    value: S,
}

/// Exclusive access to a key's value.
pub(crate) type Guard<S> = OwnedMutexGuard<Held<S>>;

impl<S> Deref for Held<S> {
    type Target = S;
    fn deref(&self) -> &S {
        &self.value
    }
}

impl<S> DerefMut for Held<S> {
    fn deref_mut(&mut self) -> &mut S {
        &mut self.value
    }
}

impl<S> Default for KeyedLock<S> {
    fn default() -> Self {
        KeyedLock {
            map: Mutex::default(),
        }
    }
}

impl<S> KeyedLock<S> {
    fn map(&self) -> MutexGuard<'_, HashMap<String, Arc<tokio::sync::Mutex<Held<S>>>>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits for `key`'s turn; its value is made by `make` when the key has none.
    pub(crate) async fn lock_or_insert(&self, key: &str, make: impl Fn() -> S) -> Guard<S> {
        loop {
            let held = self
                .map()
                .entry(key.to_string())
                .or_insert_with(|| {
                    Arc::new(tokio::sync::Mutex::new(Held {
                        dead: false,
                        value: make(),
                    }))
                })
                .clone();
            let guard = held.lock_owned().await;
            if !guard.dead {
                return guard;
            }
        }
    }

    /// Waits for `key`'s turn; `None` when the key has no value.
    pub(crate) async fn lock(&self, key: &str) -> Option<Guard<S>> {
        loop {
            let held = self.map().get(key)?.clone();
            let guard = held.lock_owned().await;
            if !guard.dead {
                return Some(guard);
            }
        }
    }

    /// Removes `key`, whose value the caller holds: whoever waits for it looks the key
    /// up again once the caller lets go.
    pub(crate) fn remove(&self, key: &str, guard: &mut Guard<S>) {
        guard.dead = true;
        let held = OwnedMutexGuard::mutex(guard);
        let mut map = self.map();
        if map.get(key).is_some_and(|h| Arc::ptr_eq(h, held)) {
            map.remove(key);
        }
    }

    /// `key`'s value if it has one and nobody holds it, without waiting.
    #[cfg(test)]
    pub(crate) fn try_lock(&self, key: &str) -> Option<Guard<S>> {
        self.map().get(key)?.clone().try_lock_owned().ok()
    }

    /// How many keys have a value.
    pub(crate) fn len(&self) -> usize {
        self.map().len()
    }

    /// The keys that have a value.
    pub(crate) fn keys(&self) -> Vec<String> {
        self.map().keys().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn calls_for_one_key_run_in_turn_and_other_keys_do_not_wait() {
        let locks = Arc::new(KeyedLock::<Vec<u32>>::default());
        let mut a = locks.lock_or_insert("a", Vec::new).await;
        let waiter = {
            let locks = locks.clone();
            tokio::spawn(async move {
                let mut a = locks.lock_or_insert("a", Vec::new).await;
                a.push(2);
            })
        };
        tokio::task::yield_now().await;
        let b =
            tokio::time::timeout(Duration::from_secs(1), locks.lock_or_insert("b", Vec::new)).await;
        assert!(b.is_ok(), "another key does not wait");
        a.push(1);
        drop(a);
        waiter.await.unwrap();
        assert_eq!(**locks.lock("a").await.unwrap(), [1, 2]);
        assert_eq!(locks.len(), 2);
    }

    #[tokio::test]
    async fn a_waiter_on_a_removed_key_looks_it_up_again() {
        let locks = Arc::new(KeyedLock::<u32>::default());
        let mut held = locks.lock_or_insert("a", || 1).await;
        let waiter = {
            let locks = locks.clone();
            tokio::spawn(async move { locks.lock("a").await.map(|g| **g) })
        };
        tokio::task::yield_now().await;
        locks.remove("a", &mut held);
        drop(held);
        assert_eq!(
            waiter.await.unwrap(),
            None,
            "the removed value is not handed out"
        );
        assert_eq!(locks.len(), 0);
        assert_eq!(**locks.lock_or_insert("a", || 7).await, 7, "a fresh value");
        assert_eq!(locks.keys(), ["a"]);
    }
}
