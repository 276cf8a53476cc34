//! Per-name slots for registry handlers that keep a timer per entry (`expire`,
//! `registry_refresh`): calls for one name run one at a time, in order, and each slot
//! holds at most one cancellable timer, told apart from its successors by a generation.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::OwnedMutexGuard;
use tokio_util::sync::CancellationToken;

/// The slots of every name, and the generation counter of their timers.
#[derive(Default)]
pub(crate) struct KeyedTimers {
    map: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Slot>>>>,
    generation: AtomicU64,
}

/// One name's slot.
#[derive(Default)]
pub(crate) struct Slot {
    /// Removed from the map: whoever waited for it must look the name up again.
    dead: bool,
    pub(crate) timer: Option<Timer>,
}

/// A slot's timer: cancelled through its token; a firing timer checks that its
/// generation is still the slot's before it acts.
pub(crate) struct Timer {
    pub(crate) token: CancellationToken,
    pub(crate) generation: u64,
}

impl KeyedTimers {
    /// Exclusive access to the slot of `name`, created on demand.
    pub(crate) async fn lock(&self, name: &str) -> OwnedMutexGuard<Slot> {
        loop {
            let slot = self
                .map
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(name.to_string())
                .or_default()
                .clone();
            let guard = slot.lock_owned().await;
            if !guard.dead {
                return guard;
            }
        }
    }

    /// A timer under `root` with a fresh generation.
    pub(crate) fn timer(&self, root: &CancellationToken) -> Timer {
        Timer {
            token: root.child_token(),
            generation: self.generation.fetch_add(1, Ordering::SeqCst),
        }
    }

    /// Removes the slot of `name` (the caller holds it) and returns its timer, not
    /// cancelled, so the caller can account for it.
    pub(crate) fn forget(&self, name: &str, slot: &mut Slot) -> Option<Timer> {
        slot.dead = true;
        self.map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
        slot.timer.take()
    }

    /// A Register of `name` failed: the slot goes if it was made for this call (no
    /// timer), and stays with its timer if an earlier registration still holds it.
    pub(crate) fn register_failed(&self, name: &str, slot: &mut Slot) {
        if slot.timer.is_none() {
            self.forget(name, slot);
        }
    }

    /// How many names have a slot.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.map.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}
