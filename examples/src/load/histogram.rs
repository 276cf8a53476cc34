//! Latency percentiles: exact ones of a list of samples ([`Latency::of`]) and a
//! fixed-memory [`Histogram`] for the soak's re-requests.

use std::time::Duration;

use serde_json::{json, Value};

/// Latency percentiles of one kind of operation, in milliseconds.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Latency {
    /// How many were timed.
    pub count: usize,
    /// Mean.
    pub mean: f64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Slowest.
    pub max: f64,
}

impl Latency {
    /// Nearest-rank percentiles of `samples`.
    pub fn of(samples: &[Duration]) -> Latency {
        if samples.is_empty() {
            return Latency::default();
        }
        let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
        ms.sort_by(f64::total_cmp);
        let rank = |p: f64| ms[((p * ms.len() as f64).ceil() as usize).clamp(1, ms.len()) - 1];
        Latency {
            count: ms.len(),
            mean: ms.iter().sum::<f64>() / ms.len() as f64,
            p50: rank(0.50),
            p90: rank(0.90),
            p99: rank(0.99),
            max: ms[ms.len() - 1],
        }
    }

    pub(super) fn json(&self) -> Value {
        let r = |v: f64| (v * 1000.0).round() / 1000.0;
        json!({"count": self.count, "mean": r(self.mean), "p50": r(self.p50), "p90": r(self.p90),
               "p99": r(self.p99), "max": r(self.max)})
    }
}

/// Latencies in fixed memory, however long the soak: log-linear buckets of
/// microseconds (64 per power of two, so a percentile is within 1.6 % of the truth),
/// with the exact count, sum and maximum.
#[derive(Debug, Clone, Default)]
pub struct Histogram {
    buckets: Vec<u64>,
    count: u64,
    sum_us: u64,
    max_us: u64,
}

/// Sub-buckets per power of two.
pub(super) const SUB_BUCKETS: u64 = 64;

impl Histogram {
    /// The bucket of `us` microseconds: exact below 64, then 64 per power of two.
    fn bucket(us: u64) -> usize {
        if us < SUB_BUCKETS {
            return us as usize;
        }
        let exp = 63 - u64::from(us.leading_zeros()); // >= 6
        let shift = exp - 6;
        ((exp - 5) * SUB_BUCKETS + ((us >> shift) & (SUB_BUCKETS - 1))) as usize
    }

    /// The smallest value of bucket `b`.
    fn low(b: usize) -> u64 {
        let b = b as u64;
        if b < SUB_BUCKETS {
            return b;
        }
        let exp = b / SUB_BUCKETS + 5;
        let sub = b % SUB_BUCKETS;
        (SUB_BUCKETS + sub) << (exp - 6)
    }

    /// Adds one latency.
    pub fn record(&mut self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        let b = Self::bucket(us);
        if self.buckets.len() <= b {
            self.buckets.resize(b + 1, 0);
        }
        self.buckets[b] += 1;
        self.count += 1;
        self.sum_us = self.sum_us.saturating_add(us);
        self.max_us = self.max_us.max(us);
    }

    /// How many were recorded.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Nearest-rank percentiles (bucket lower bounds; the maximum is exact).
    pub fn latency(&self) -> Latency {
        if self.count == 0 {
            return Latency::default();
        }
        let ms = |us: u64| us as f64 / 1e3;
        let rank = |p: f64| {
            let want = ((p * self.count as f64).ceil() as u64).clamp(1, self.count);
            let mut seen = 0;
            for (b, n) in self.buckets.iter().enumerate() {
                seen += n;
                if seen >= want {
                    return ms(Self::low(b).min(self.max_us));
                }
            }
            ms(self.max_us)
        };
        Latency {
            count: self.count as usize,
            mean: ms(self.sum_us) / self.count as f64,
            p50: rank(0.50),
            p90: rank(0.90),
            p99: rank(0.99),
            max: ms(self.max_us),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let ms: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        let l = Latency::of(&ms);
        assert_eq!(
            (l.count, l.p50, l.p90, l.p99, l.max),
            (100, 50.0, 90.0, 99.0, 100.0)
        );
        assert!((l.mean - 50.5).abs() < 1e-9);
        let one = Latency::of(&[Duration::from_millis(7)]);
        assert_eq!((one.p50, one.p99, one.max), (7.0, 7.0, 7.0));
        assert_eq!(Latency::of(&[]), Latency::default());
    }

    #[test]
    fn the_histogram_keeps_percentiles_within_two_percent() {
        let mut h = Histogram::default();
        for us in 1..=100_000u64 {
            h.record(Duration::from_micros(us));
        }
        let l = h.latency();
        assert_eq!(l.count, 100_000);
        assert_eq!(l.max, 100.0);
        assert!((l.mean - 50.0).abs() < 0.01, "{}", l.mean);
        for (got, want) in [(l.p50, 50.0), (l.p90, 90.0), (l.p99, 99.0)] {
            assert!(got <= want && got > want * 0.98, "{got} for {want}");
        }
        // Exact below 64 us, and fixed memory: a million more samples add no bucket.
        let mut small = Histogram::default();
        small.record(Duration::from_micros(7));
        assert_eq!(small.latency().p50, 0.007);
        let buckets = h.buckets.len();
        for _ in 0..1_000_000 {
            h.record(Duration::from_micros(12_345));
        }
        assert_eq!(h.buckets.len(), buckets);
        for b in 0..2000 {
            assert_eq!(Histogram::bucket(Histogram::low(b)), b, "bucket {b}");
        }
        assert_eq!(Histogram::default().latency(), Latency::default());
    }
}
