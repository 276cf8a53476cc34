//! `Cache`: the answers a [`DnsServer`](crate::DnsServer) got by fanout, kept for the
//! records' TTL.
//!
//! What it does: remembers the answer records of a (name, type) until the smallest TTL
//! among them runs out, and gives them back with their TTLs lowered by the time spent
//! in the cache. Answers without records (nothing to time them by) are not kept.
//!
//! State: a map (name, type) -> (records, expiry) behind a `std::sync::Mutex` never
//! held across an await, bounded to a capacity: when full, expired entries go first,
//! then the entry closest to its expiry.
//!
//! Failure handled: none to report; a zero capacity keeps nothing.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hickory_proto::rr::{Name, Record, RecordType};
use tokio::time::Instant;

type Key = (Name, RecordType);
/// Answers with their expiry, by question.
type Entries = HashMap<Key, (Vec<Record>, Instant)>;

/// See the [module docs](self).
#[derive(Clone, Debug)]
pub struct Cache {
    inner: Arc<Mutex<Entries>>,
    capacity: usize,
}

impl Cache {
    /// A cache of at most `capacity` answers.
    pub fn new(capacity: usize) -> Cache {
        Cache {
            inner: Arc::default(),
            capacity,
        }
    }

    /// Keeps `answers` for (`name`, `rtype`) for their smallest TTL.
    pub fn put(&self, name: &Name, rtype: RecordType, answers: &[Record]) {
        let Some(ttl) = answers.iter().map(|r| r.ttl).min() else {
            return;
        };
        if ttl == 0 || self.capacity == 0 {
            return;
        }
        let now = Instant::now();
        let mut map = self.lock();
        let key = (name.to_lowercase(), rtype);
        if map.len() >= self.capacity && !map.contains_key(&key) {
            map.retain(|_, (_, until)| *until > now);
            if map.len() >= self.capacity {
                let soonest = map
                    .iter()
                    .min_by_key(|(_, (_, until))| *until)
                    .map(|(k, _)| k.clone());
                if let Some(k) = soonest {
                    map.remove(&k);
                }
            }
        }
        let until = now + Duration::from_secs(u64::from(ttl));
        map.insert(key, (answers.to_vec(), until));
    }

    /// The answers kept for (`name`, `rtype`), their TTLs lowered by the time they
    /// spent here, or `None` (never kept, or expired).
    pub fn get(&self, name: &Name, rtype: RecordType) -> Option<Vec<Record>> {
        let now = Instant::now();
        let mut map = self.lock();
        let key = (name.to_lowercase(), rtype);
        let (records, until) = map.get(&key)?;
        if *until <= now {
            map.remove(&key);
            return None;
        }
        let left = u32::try_from(until.duration_since(now).as_secs()).unwrap_or(u32::MAX);
        Some(
            records
                .iter()
                .map(|r| {
                    let mut r = r.clone();
                    r.ttl = r.ttl.min(left.max(1));
                    r
                })
                .collect(),
        )
    }

    /// How many answers are kept (expired ones included until they are looked up or
    /// pushed out).
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether nothing is kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Entries> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use hickory_proto::rr::rdata::A;
    use hickory_proto::rr::RData;

    use super::*;

    fn a(name: &str, ttl: u32) -> Record {
        Record::from_rdata(
            Name::from_ascii(name).unwrap(),
            ttl,
            RData::A(A(Ipv4Addr::new(10, 0, 0, 1))),
        )
    }

    fn n(s: &str) -> Name {
        Name::from_ascii(s).unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_lives_for_its_smallest_ttl_and_ages() {
        let c = Cache::new(8);
        c.put(
            &n("x.net."),
            RecordType::A,
            &[a("x.net.", 10), a("x.net.", 4)],
        );
        let got = c.get(&n("X.net."), RecordType::A).unwrap();
        assert_eq!(got.len(), 2);
        assert!(got.iter().all(|r| r.ttl <= 4));
        assert!(c.get(&n("x.net."), RecordType::AAAA).is_none());
        tokio::time::advance(Duration::from_secs(2)).await;
        let got = c.get(&n("x.net."), RecordType::A).unwrap();
        assert!(got.iter().all(|r| r.ttl <= 2), "aged: {got:?}");
        tokio::time::advance(Duration::from_secs(3)).await;
        assert!(c.get(&n("x.net."), RecordType::A).is_none(), "expired");
        assert!(c.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn it_stays_within_its_capacity_and_keeps_no_empty_or_zero_ttl_answer() {
        let c = Cache::new(2);
        c.put(&n("a."), RecordType::A, &[a("a.", 5)]);
        c.put(&n("b."), RecordType::A, &[a("b.", 50)]);
        c.put(&n("c."), RecordType::A, &[a("c.", 50)]);
        assert_eq!(c.len(), 2);
        assert!(
            c.get(&n("a."), RecordType::A).is_none(),
            "closest to expiry went"
        );
        assert!(c.get(&n("c."), RecordType::A).is_some());
        c.put(&n("d."), RecordType::A, &[]);
        c.put(&n("e."), RecordType::A, &[a("e.", 0)]);
        assert!(c.get(&n("d."), RecordType::A).is_none());
        assert!(c.get(&n("e."), RecordType::A).is_none());
        let none = Cache::new(0);
        none.put(&n("a."), RecordType::A, &[a("a.", 5)]);
        assert!(none.is_empty());
    }
}
