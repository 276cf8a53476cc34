//! Keyed timers: at most one timer per key, with the calls for one key in order.
//!
//! For handlers that keep a timer per entry (the registry's `expire` and
//! `registry_refresh`): calls for one key run one at a time, in order (an async lock
//! per key, so a refresh never races with the expiry it replaces), and each key's slot
//! holds at most one timer. A timer is an owned task under a child of the timers' root
//! token, told apart from its successors by a generation: arming a slot cancels the
//! timer it replaces, and a timer that fires checks with [`KeyedTimers::firing`] that it
//! is still the slot's before it acts. Dropping the timers cancels every timer.
//!
//! State: the slot of every key that has a timer or a call in progress, and the
//! generation counter. No task of its own: each armed timer is one task, which the
//! caller writes (it sleeps on tokio time, so paused-time tests drive it).

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio_util::sync::CancellationToken;

use super::keyed_lock::{Guard, KeyedLock};
use crate::core::spawn_owned;

/// The slot of every key (behind a [`KeyedLock`]), the generation counter of their timers and the root token
/// of the timers (cancelled when they are dropped).
pub(crate) struct KeyedTimers {
    slots: KeyedLock<Slot>,
    generation: AtomicU64,
    root: CancellationToken,
}

/// One key's slot: whoever holds it is the only one acting on the key.
#[derive(Default)]
pub(crate) struct Slot {
    timer: Option<Timer>,
}

/// A slot's timer: cancelled through its token; a firing timer checks that its
/// generation is still the slot's before it acts.
struct Timer {
    token: CancellationToken,
    generation: u64,
}

/// What a timer finds in its slot when it fires (see [`KeyedTimers::firing`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Firing {
    /// It is still the slot's timer: it may act.
    Current,
    /// A newer timer replaced it (and cancelled it, too late to stop it waking).
    Replaced,
    /// The key was forgotten while it woke: nothing to do, and the slot its lookup
    /// made afresh is gone again.
    Gone,
}

impl Slot {
    /// Whether the slot has a timer.
    pub(crate) fn is_armed(&self) -> bool {
        self.timer.is_some()
    }

    /// Drops the slot's timer without cancelling it: for the timer's own task, which
    /// runs under that token and goes on to its last step.
    pub(crate) fn disarm_fired(&mut self) -> bool {
        self.timer.take().is_some()
    }
}

impl KeyedTimers {
    /// Timers under a child of `parent`: cancelling `parent` stops them all.
    pub(crate) fn new(parent: &CancellationToken) -> Self {
        KeyedTimers {
            slots: KeyedLock::default(),
            generation: AtomicU64::new(0),
            root: parent.child_token(),
        }
    }

    /// Exclusive access to the slot of `key`, created on demand.
    pub(crate) async fn lock(&self, key: &str) -> Guard<Slot> {
        self.slots.lock_or_insert(key, Slot::default).await
    }

    /// Replaces the slot's timer (cancelling the old one) by `task`, spawned under a
    /// child of the root and given its generation, which it passes to
    /// [`firing`](Self::firing) when it wakes. Says whether the slot had a timer.
    pub(crate) fn arm<F>(&self, slot: &mut Slot, task: impl FnOnce(u64) -> F) -> bool
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let timer = Timer {
            token: self.root.child_token(),
            generation: self.generation.fetch_add(1, Ordering::SeqCst),
        };
        let (token, generation) = (timer.token.clone(), timer.generation);
        let old = slot.timer.replace(timer);
        let had = old.is_some();
        if let Some(old) = old {
            old.token.cancel();
        }
        spawn_owned(token, task(generation));
        had
    }

    /// For a timer of `generation` that woke and holds the slot of `key`: whether it
    /// is still the slot's. A slot without a timer was made afresh by this lookup (the
    /// key was forgotten meanwhile): it is removed again.
    pub(crate) fn firing(&self, key: &str, slot: &mut Guard<Slot>, generation: u64) -> Firing {
        match slot.timer.as_ref() {
            Some(t) if t.generation == generation => Firing::Current,
            Some(_) => Firing::Replaced,
            None => {
                self.forget(key, slot);
                Firing::Gone
            }
        }
    }

    /// Cancels the slot's timer and removes the slot of `key` (the caller holds it).
    /// Says whether the slot had a timer.
    pub(crate) fn forget(&self, key: &str, slot: &mut Guard<Slot>) -> bool {
        self.slots.remove(key, slot);
        let had = slot.timer.take();
        if let Some(t) = &had {
            t.token.cancel();
        }
        had.is_some()
    }

    /// A call for `key` failed: the slot goes if it was made for this call (no
    /// timer), and stays with its timer if an earlier call armed one.
    pub(crate) fn forget_unarmed(&self, key: &str, slot: &mut Guard<Slot>) {
        if !slot.is_armed() {
            self.forget(key, slot);
        }
    }

    /// How many keys have a slot.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.slots.len()
    }
}

impl Default for KeyedTimers {
    fn default() -> Self {
        KeyedTimers::new(&CancellationToken::new())
    }
}

impl Drop for KeyedTimers {
    fn drop(&mut self) {
        self.root.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc;
    use std::time::Duration;

    /// Arms `key`'s slot with a timer that, after `delay`, counts a firing in `fired`
    /// if it is still the slot's, and then disarms.
    fn arm(timers: &Arc<KeyedTimers>, key: &str, delay: Duration, fired: &Arc<AtomicUsize>) {
        let key = key.to_string();
        let me = Arc::downgrade(timers);
        let fired = fired.clone();
        let timers = timers.clone();
        tokio::spawn(async move {
            let mut slot = timers.lock(&key).await;
            timers.arm(&mut slot, move |generation| async move {
                tokio::time::sleep(delay).await;
                let Some(timers) = me.upgrade() else { return };
                let mut slot = timers.lock(&key).await;
                if timers.firing(&key, &mut slot, generation) == Firing::Current {
                    fired.fetch_add(1, Ordering::SeqCst);
                    slot.disarm_fired();
                }
            });
        });
    }

    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_timer_fires_once_at_its_time() {
        let timers = Arc::new(KeyedTimers::default());
        let fired = Arc::new(AtomicUsize::new(0));
        arm(&timers, "a", Duration::from_secs(10), &fired);
        settle().await;
        tokio::time::sleep(Duration::from_millis(9_900)).await;
        assert_eq!(fired.load(Ordering::SeqCst), 0, "not before its time");
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(fired.load(Ordering::SeqCst), 1);
        assert!(!timers.lock("a").await.is_armed(), "disarmed after firing");
    }

    #[tokio::test(start_paused = true)]
    async fn re_arming_replaces_the_timer_and_only_the_new_one_fires() {
        let timers = Arc::new(KeyedTimers::default());
        let fired = Arc::new(AtomicUsize::new(0));
        arm(&timers, "a", Duration::from_secs(10), &fired);
        settle().await;
        arm(&timers, "a", Duration::from_secs(20), &fired);
        settle().await;
        tokio::time::sleep(Duration::from_secs(15)).await;
        assert_eq!(
            fired.load(Ordering::SeqCst),
            0,
            "the replaced timer stays quiet"
        );
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(fired.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn keys_are_independent_and_forget_cancels_only_its_own() {
        let timers = Arc::new(KeyedTimers::default());
        let fired = Arc::new(AtomicUsize::new(0));
        arm(&timers, "a", Duration::from_secs(10), &fired);
        arm(&timers, "b", Duration::from_secs(10), &fired);
        settle().await;
        assert_eq!(timers.len(), 2);
        {
            let mut slot = timers.lock("a").await;
            assert!(timers.forget("a", &mut slot), "it had a timer");
        }
        assert_eq!(timers.len(), 1);
        tokio::time::sleep(Duration::from_secs(11)).await;
        assert_eq!(fired.load(Ordering::SeqCst), 1, "only b fired");
    }

    #[tokio::test(start_paused = true)]
    async fn a_timer_that_wakes_after_its_key_was_forgotten_finds_it_gone() {
        let timers = KeyedTimers::default();
        let mut slot = timers.lock("a").await;
        timers.arm(&mut slot, |_| async {});
        let generation = slot.timer.as_ref().unwrap().generation;
        timers.forget("a", &mut slot);
        drop(slot);
        let mut fresh = timers.lock("a").await;
        assert_eq!(timers.firing("a", &mut fresh, generation), Firing::Gone);
        assert_eq!(timers.len(), 0, "the slot the lookup made is gone again");
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_first_call_leaves_no_slot_and_an_armed_slot_stays() {
        let timers = KeyedTimers::default();
        let mut slot = timers.lock("new").await;
        timers.forget_unarmed("new", &mut slot);
        drop(slot);
        assert_eq!(timers.len(), 0);
        let mut slot = timers.lock("armed").await;
        timers.arm(&mut slot, |_| std::future::pending());
        timers.forget_unarmed("armed", &mut slot);
        assert!(slot.is_armed());
        assert_eq!(timers.len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn dropping_the_timers_cancels_every_timer() {
        let parent = CancellationToken::new();
        let timers = Arc::new(KeyedTimers::new(&parent));
        let fired = Arc::new(AtomicUsize::new(0));
        arm(&timers, "a", Duration::from_secs(10), &fired);
        settle().await;
        let token = timers.lock("a").await.timer.as_ref().unwrap().token.clone();
        drop(timers);
        settle().await;
        assert!(token.is_cancelled());
        assert!(!parent.is_cancelled(), "the parent is the caller's");
    }
}
