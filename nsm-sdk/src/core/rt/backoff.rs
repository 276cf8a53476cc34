//! [`Backoff`]: the wait before the next try of something that keeps failing.
//!
//! Every retry loop of the SDK (heal, a refresh that fails, a watch that breaks) waits
//! by the same rule, so a mesh that loses a peer does not have some components hammer
//! it while others wait: the wait starts at `start`, doubles with each failure up to
//! `max`, and each wait is jittered by up to [`JITTER`] either way (never above `max`)
//! so that peers that failed together do not retry together.
//!
//! State: none; the caller counts its failures (`attempt` 0 is the first retry).

use std::time::Duration;

/// How much each wait is jittered, either way, as a fraction of the doubled wait.
pub const JITTER: f64 = 0.2;

/// The shortest `start` a backoff accepts: a zero wait would spin.
const MIN_START: Duration = Duration::from_millis(1);

/// Exponential backoff with jitter: `start`, doubling each attempt, up to `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    start: Duration,
    max: Duration,
}

impl Backoff {
    /// A backoff from `start` (at least 1 ms) doubling up to `max` (at least `start`).
    pub fn new(start: Duration, max: Duration) -> Self {
        let start = start.max(MIN_START);
        Backoff {
            start,
            max: max.max(start),
        }
    }

    /// The first wait.
    pub fn start(&self) -> Duration {
        self.start
    }

    /// The longest wait.
    pub fn max(&self) -> Duration {
        self.max
    }

    /// The wait before try number `attempt + 1`, without jitter: `start * 2^attempt`,
    /// at most `max`.
    pub fn base(&self, attempt: u32) -> Duration {
        self.start
            .checked_mul(2u32.saturating_pow(attempt.min(31)))
            .unwrap_or(self.max)
            .min(self.max)
    }

    /// The wait before try number `attempt + 1`: [`base`](Self::base) jittered by up to
    /// [`JITTER`] either way, never above `max`.
    pub fn wait(&self, attempt: u32) -> Duration {
        self.base(attempt)
            .mul_f64(rand::random_range((1.0 - JITTER)..(1.0 + JITTER)))
            .min(self.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn doubles_from_start_up_to_max() {
        let b = Backoff::new(100 * MS, 1000 * MS);
        let bases: Vec<Duration> = (0..6).map(|a| b.base(a)).collect();
        assert_eq!(
            bases,
            [100 * MS, 200 * MS, 400 * MS, 800 * MS, 1000 * MS, 1000 * MS]
        );
        assert_eq!(b.base(u32::MAX), 1000 * MS, "no overflow on a long outage");
    }

    #[test]
    fn each_wait_is_jittered_within_the_rule_and_never_above_max() {
        let b = Backoff::new(100 * MS, 1000 * MS);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..200 {
            let w = b.wait(1);
            assert!(w >= 160 * MS && w <= 240 * MS, "{w:?}");
            seen.insert(w);
            let capped = b.wait(10);
            assert!(capped >= 800 * MS && capped <= 1000 * MS, "{capped:?}");
        }
        assert!(seen.len() > 1, "waits are spread, not all equal");
    }

    #[test]
    fn a_zero_start_or_a_max_below_start_is_corrected() {
        let b = Backoff::new(Duration::ZERO, Duration::ZERO);
        assert_eq!(b.start(), MS);
        assert_eq!(b.max(), MS);
        assert!(b.wait(0) > Duration::ZERO);
    }
}
