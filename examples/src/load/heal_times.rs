//! How long each connection took to heal: the time from heal's
//! [`HealEvent::Broken`](nsm_sdk::handlers::HealEvent) to its `Healed`, per connection,
//! fed by heal's observer ([`HealTimes::broken`], [`HealTimes::healed`]) and summed up
//! by [`HealTimes::summary`].
//!
//! State: the connections broken and not healed yet (with when they broke), the heal
//! time of every healed one, the first break and the last heal. A connection that
//! breaks again while broken keeps its first break (heal tells one Broken per episode;
//! the earliest is what its user saw).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::time::Instant;

use super::histogram::Latency;

/// Heal episodes of the run, by connection id.
#[derive(Debug, Default)]
pub(super) struct HealTimes(Mutex<Inner>);

#[derive(Debug, Default)]
struct Inner {
    open: HashMap<String, Instant>,
    /// When each connection last healed.
    healed_at: HashMap<String, Instant>,
    took: Vec<Duration>,
    first_broken: Option<Instant>,
    last_healed: Option<Instant>,
}

impl HealTimes {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Heal found `connection` broken, now.
    pub(super) fn broken(&self, connection: &str) {
        let now = Instant::now();
        let mut i = self.lock();
        i.open.entry(connection.to_string()).or_insert(now);
        i.first_broken.get_or_insert(now);
    }

    /// `connection` works again, now.
    pub(super) fn healed(&self, connection: &str) {
        let now = Instant::now();
        let mut i = self.lock();
        if let Some(at) = i.open.remove(connection) {
            i.took.push(now - at);
            i.last_healed = Some(now);
            i.healed_at.insert(connection.to_string(), now);
        }
    }

    /// Whether `connection` healed after `since` (and is not broken again).
    pub(super) fn healed_since(&self, connection: &str, since: Instant) -> bool {
        let i = self.lock();
        !i.open.contains_key(connection) && i.healed_at.get(connection).is_some_and(|t| *t > since)
    }

    /// Connections broken and not healed yet.
    pub(super) fn unhealed(&self) -> usize {
        self.lock().open.len()
    }

    /// When the last connection healed, if any did.
    pub(super) fn last_healed(&self) -> Option<Instant> {
        self.lock().last_healed
    }

    /// What was measured so far.
    pub(super) fn summary(&self) -> HealSummary {
        let i = self.lock();
        HealSummary {
            healed: i.took.len(),
            unhealed: i.open.len(),
            latency: Latency::of(&i.took),
            first_broken_to_last_healed: i.first_broken.zip(i.last_healed).map(|(b, h)| h - b),
        }
    }
}

/// Heal times of a run (or of its soak).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HealSummary {
    /// Heal episodes that ended healed.
    pub healed: usize,
    /// Connections still broken at the end.
    pub unhealed: usize,
    /// Time from broken to healed, per episode.
    pub latency: Latency,
    /// From the first Broken to the last Healed.
    pub first_broken_to_last_healed: Option<Duration>,
}

impl HealSummary {
    pub(super) fn json(&self) -> Value {
        json!({
            "healed": self.healed, "unhealed": self.unhealed,
            "broken_to_healed_ms": self.latency.json(),
            "first_broken_to_last_healed_s": self.first_broken_to_last_healed.map(|d| d.as_secs_f64()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn each_episode_is_timed_from_its_first_break_to_its_heal() {
        let t = HealTimes::default();
        t.broken("a");
        tokio::time::advance(Duration::from_millis(100)).await;
        t.broken("b");
        // A second Broken of a broken connection keeps the first.
        t.broken("a");
        tokio::time::advance(Duration::from_millis(200)).await;
        t.healed("a");
        assert_eq!(t.unhealed(), 1);
        tokio::time::advance(Duration::from_millis(700)).await;
        t.healed("b");
        // A Healed without a Broken (a caller's request) is no episode.
        t.healed("c");
        let s = t.summary();
        assert_eq!((s.healed, s.unhealed), (2, 0));
        assert_eq!(s.latency.max, 900.0);
        assert_eq!(s.latency.p50, 300.0);
        assert_eq!(
            s.first_broken_to_last_healed,
            Some(Duration::from_millis(1000))
        );
        assert!(t.last_healed().is_some());
        assert!(t.healed_since("b", Instant::now() - Duration::from_millis(1)));
        assert!(!t.healed_since("b", Instant::now()));
        assert!(!t.healed_since("c", Instant::now() - Duration::from_secs(5)));
    }
}
