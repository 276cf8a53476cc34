//! `memory`: an in-memory registry store, the terminal handler of a registry chain.
//!
//! What it does:
//! - **Register** inserts or replaces the entry by name and answers with the entry as
//!   stored: an endpoint keeps the `initial_registration_time` of its first
//!   registration (set to now when the registrant gave none); a network service with
//!   no payload gets [`DEFAULT_PAYLOAD`] (`IP`).
//! - **Find** streams every current match ([`Matches`]), leaving out endpoints whose
//!   `expiration_time` has passed; with `watch` it then sends every later change of a
//!   matching entry (`deleted = false` on register or refresh, `deleted = true` on
//!   unregister, and when an entry changes so that it no longer matches) until the
//!   client drops the stream. Endpoints are indexed by network service name, so a Find
//!   that names services looks only at the endpoints of the rarest of them.
//! - **Unregister** removes the entry; an unknown name is Ok.
//!
//! Removing expired endpoints is not the store's job: `expire` in front of it does
//! that, through the chain, so watchers hear about it.
//!
//! State: the entries, the service-name index and the watchers, behind one lock that is
//! never held across an `.await`.
//!
//! Failure handled: a slow watcher. Each watcher has a bounded buffer
//! ([`Memory::watch_buffer`], [`DEFAULT_WATCH_BUFFER`] events) that registrations fill
//! without ever waiting. When the buffer is full the watcher is marked as lagging and
//! further events for it are dropped; the next time it reads, its stream throws away
//! what is buffered and **re-lists**: it sends `deleted = true` for every entry it had
//! reported that no longer matches, then the current state of every match. So a
//! lagging watcher sees no stale or half sequence, loses no delete, and never slows
//! anyone down. A dropped stream removes its watcher at once; no task is involved.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll};
use std::time::SystemTime;

use async_trait::async_trait;
use futures::Stream;
use nsm_proto::registry::{NetworkService, NetworkServiceEndpoint};
use prost_types::Timestamp;
use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::query::Matches;
use super::{FindStream, Found, Query, RegistryHandler, RegistryNext, Resource};
use crate::core::Cx;
use crate::wire::bounds::Shown;
use crate::{Error, Result};

/// How many events a watcher may have unread before it lags and re-lists.
pub const DEFAULT_WATCH_BUFFER: usize = 10;

/// The payload a network service registered without one gets.
pub const DEFAULT_PAYLOAD: &str = "IP";

/// What the store needs from a resource besides [`Resource`] and [`Matches`]:
/// how to store it, when it has expired, and which keys index it.
pub trait Stored: Resource + Matches {
    /// Prepares the entry for storage, given the entry it replaces (if any) and the
    /// wall clock.
    fn prepare(&mut self, previous: Option<&Self>, now: SystemTime);
    /// Whether the entry has expired at `now`; Find leaves expired entries out.
    fn is_expired(&self, now: SystemTime) -> bool;
    /// The keys this entry is indexed by. A template with keys narrows a Find to the
    /// entries indexed under all of them (so they must also be required by
    /// [`Matches`]).
    fn index_keys(&self) -> &[String];
}

impl Stored for NetworkService {
    fn prepare(&mut self, _previous: Option<&Self>, _now: SystemTime) {
        if self.payload.is_empty() {
            self.payload = DEFAULT_PAYLOAD.to_string();
        }
    }

    fn is_expired(&self, _now: SystemTime) -> bool {
        false
    }

    fn index_keys(&self) -> &[String] {
        &[]
    }
}

impl Stored for NetworkServiceEndpoint {
    fn prepare(&mut self, previous: Option<&Self>, now: SystemTime) {
        let first = previous
            .and_then(|p| p.initial_registration_time)
            .or_else(|| self.initial_registration_time.take())
            .unwrap_or_else(|| now.into());
        self.initial_registration_time = Some(first);
    }

    fn is_expired(&self, now: SystemTime) -> bool {
        let now = Timestamp::from(now);
        self.expiration_time
            .as_ref()
            .is_some_and(|t| (t.seconds, t.nanos) < (now.seconds, now.nanos))
    }

    fn index_keys(&self) -> &[String] {
        &self.network_service_names
    }
}

/// See the [module docs](self).
#[must_use]
pub struct Memory<R: Stored> {
    inner: Arc<Inner<R>>,
}

/// An empty in-memory store of `R` (network services or endpoints).
pub fn memory<R: Stored>() -> Memory<R> {
    Memory {
        inner: Arc::new(Inner {
            state: Mutex::new(State {
                entries: HashMap::new(),
                index: HashMap::new(),
                watchers: Vec::new(),
                next_watcher: 0,
                buffer: DEFAULT_WATCH_BUFFER,
            }),
        }),
    }
}

impl<R: Stored> Clone for Memory<R> {
    fn clone(&self) -> Self {
        Memory {
            inner: self.inner.clone(),
        }
    }
}

impl<R: Stored> fmt::Debug for Memory<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let st = self.inner.lock();
        f.debug_struct("Memory")
            .field("kind", &R::KIND)
            .field("entries", &st.entries.len())
            .field("watchers", &st.watchers.len())
            .finish()
    }
}

impl<R: Stored> Memory<R> {
    /// How many events a watcher may have unread before it lags and re-lists (at least
    /// one; default [`DEFAULT_WATCH_BUFFER`]). Applies to watchers that start later.
    pub fn watch_buffer(self, events: usize) -> Self {
        self.inner.lock().buffer = events.max(1);
        self
    }

    /// How many entries the store holds (expired endpoints included).
    pub fn len(&self) -> usize {
        self.inner.lock().entries.len()
    }

    /// Whether the store holds no entry.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The entry called `name`, as stored (even if expired).
    pub fn get(&self, name: &str) -> Option<R> {
        self.inner.lock().entries.get(name).cloned()
    }

    /// How many watch streams are open.
    pub fn watchers(&self) -> usize {
        self.inner.lock().watchers.len()
    }
}

struct Inner<R: Stored> {
    state: Mutex<State<R>>,
}

impl<R: Stored> Inner<R> {
    fn lock(&self) -> MutexGuard<'_, State<R>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

struct State<R> {
    entries: HashMap<String, R>,
    /// Index key (network service name) -> names of the entries indexed under it.
    index: HashMap<String, HashSet<String>>,
    watchers: Vec<Watcher<R>>,
    next_watcher: u64,
    buffer: usize,
}

struct Watcher<R> {
    id: u64,
    template: R,
    tx: mpsc::Sender<Found<R>>,
    lagged: Arc<AtomicBool>,
}

impl<R: Stored> State<R> {
    fn current(&self, template: &R, now: SystemTime) -> Vec<R> {
        let keep = |r: &&R| r.matches(template) && !r.is_expired(now);
        if !template.name().is_empty() {
            return self
                .entries
                .get(template.name())
                .filter(keep)
                .cloned()
                .into_iter()
                .collect();
        }
        let keys = template.index_keys();
        if keys.is_empty() {
            return self.entries.values().filter(keep).cloned().collect();
        }
        // Every key is required, so the smallest bucket holds every match.
        let mut smallest: Option<&HashSet<String>> = None;
        for key in keys {
            match self.index.get(key) {
                None => return Vec::new(),
                Some(b) if smallest.is_none_or(|s| b.len() < s.len()) => smallest = Some(b),
                Some(_) => {}
            }
        }
        smallest
            .into_iter()
            .flatten()
            .filter_map(|name| self.entries.get(name))
            .filter(keep)
            .cloned()
            .collect()
    }

    fn unindex(&mut self, r: &R) {
        for key in r.index_keys() {
            if let Some(bucket) = self.index.get_mut(key) {
                bucket.remove(r.name());
                if bucket.is_empty() {
                    self.index.remove(key);
                }
            }
        }
    }

    fn reindex(&mut self, r: &R) {
        for key in r.index_keys() {
            self.index
                .entry(key.clone())
                .or_default()
                .insert(r.name().to_string());
        }
    }

    /// Tells each watcher about a change from `old` to `new` (`None`: absent), without
    /// waiting for any of them; drops watchers whose stream is gone.
    fn notify(&mut self, old: Option<&R>, new: Option<&R>, now: SystemTime) {
        self.watchers.retain(|w| {
            let item = match (old, new) {
                (_, Some(n)) if n.matches(&w.template) && !n.is_expired(now) => Found {
                    resource: n.clone(),
                    deleted: false,
                },
                (Some(o), _) if o.matches(&w.template) => Found {
                    resource: o.clone(),
                    deleted: true,
                },
                _ => return !w.tx.is_closed(),
            };
            match w.tx.try_send(item) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    if !w.lagged.swap(true, Ordering::AcqRel) {
                        warn!(
                            watcher = w.id,
                            kind = R::KIND,
                            "registry watcher lags; it will re-list"
                        );
                    }
                    true
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            }
        });
    }
}

#[async_trait]
impl<R: Stored> RegistryHandler<R> for Memory<R> {
    async fn register(&self, _cx: &mut Cx, mut r: R, _next: RegistryNext<R>) -> Result<R> {
        if r.name().is_empty() {
            return Err(Error::invalid(format!("{} has no name", R::KIND)));
        }
        let now = SystemTime::now();
        let mut st = self.inner.lock();
        let old = st.entries.remove(r.name());
        r.prepare(old.as_ref(), now);
        if let Some(o) = &old {
            st.unindex(o);
        }
        st.reindex(&r);
        st.entries.insert(r.name().to_string(), r.clone());
        st.notify(old.as_ref(), Some(&r), now);
        debug!(
            kind = R::KIND,
            name = %Shown(r.name()),
            refresh = old.is_some(),
            "registered"
        );
        Ok(r)
    }

    async fn find(
        &self,
        _cx: &mut Cx,
        query: Query<R>,
        _next: RegistryNext<R>,
    ) -> Result<FindStream<R>> {
        let now = SystemTime::now();
        let mut st = self.inner.lock();
        let current = st.current(&query.template, now);
        if !query.watch {
            return Ok(Box::pin(futures::stream::iter(current.into_iter().map(
                |resource| {
                    Ok(Found {
                        resource,
                        deleted: false,
                    })
                },
            ))));
        }
        // Snapshot and subscription under one lock: no change is missed or sent twice.
        let (tx, rx) = mpsc::channel(st.buffer);
        let lagged = Arc::new(AtomicBool::new(false));
        let id = st.next_watcher;
        st.next_watcher += 1;
        st.watchers.push(Watcher {
            id,
            template: query.template.clone(),
            tx,
            lagged: lagged.clone(),
        });
        drop(st);
        Ok(Box::pin(Watch {
            id,
            template: query.template,
            store: Arc::downgrade(&self.inner),
            rx,
            lagged,
            pending: current
                .into_iter()
                .map(|resource| Found {
                    resource,
                    deleted: false,
                })
                .collect(),
            known: HashMap::new(),
        }))
    }

    async fn unregister(&self, _cx: &mut Cx, r: R, _next: RegistryNext<R>) -> Result<()> {
        let now = SystemTime::now();
        let mut st = self.inner.lock();
        if let Some(old) = st.entries.remove(r.name()) {
            st.unindex(&old);
            st.notify(Some(&old), None, now);
            debug!(kind = R::KIND, name = %Shown(r.name()), "unregistered");
        }
        Ok(())
    }
}

/// A watching Find: the snapshot, then the watcher's events, re-listing after a lag.
struct Watch<R: Stored> {
    id: u64,
    template: R,
    /// Weak so that the stream ends (rather than hangs) when the store is dropped.
    store: Weak<Inner<R>>,
    rx: mpsc::Receiver<Found<R>>,
    lagged: Arc<AtomicBool>,
    pending: VecDeque<Found<R>>,
    /// What this stream has told its client is there, to report deletes on a re-list.
    known: HashMap<String, R>,
}

impl<R: Stored> Watch<R> {
    fn deliver(&mut self, item: Found<R>) -> Poll<Option<Result<Found<R>>>> {
        if item.deleted {
            self.known.remove(item.resource.name());
        } else {
            self.known
                .insert(item.resource.name().to_string(), item.resource.clone());
        }
        Poll::Ready(Some(Ok(item)))
    }

    /// Replaces whatever was buffered by the difference between what the client knows
    /// and the current state. False when the store is gone.
    fn relist(&mut self) -> bool {
        let Some(store) = self.store.upgrade() else {
            return false;
        };
        let current = {
            let st = store.lock();
            // Senders only send under this lock, so after draining, the buffer and the
            // snapshot agree.
            while self.rx.try_recv().is_ok() {}
            self.lagged.store(false, Ordering::Release);
            st.current(&self.template, SystemTime::now())
        };
        let names: HashSet<&str> = current.iter().map(|r| r.name()).collect();
        for (name, r) in &self.known {
            if !names.contains(name.as_str()) {
                self.pending.push_back(Found {
                    resource: r.clone(),
                    deleted: true,
                });
            }
        }
        self.pending
            .extend(current.into_iter().map(|resource| Found {
                resource,
                deleted: false,
            }));
        debug!(
            watcher = self.id,
            kind = R::KIND,
            items = self.pending.len(),
            "registry watcher re-listed"
        );
        true
    }
}

// No field is ever pinned in place.
impl<R: Stored> Unpin for Watch<R> {}

impl<R: Stored> Stream for Watch<R> {
    type Item = Result<Found<R>>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Some(item) = this.pending.pop_front() {
                return this.deliver(item);
            }
            if this.lagged.load(Ordering::Acquire) {
                if !this.relist() {
                    return Poll::Ready(None);
                }
                continue;
            }
            return match this.rx.poll_recv(cx) {
                Poll::Ready(Some(item)) => this.deliver(item),
                Poll::Ready(None) => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            };
        }
    }
}

impl<R: Stored> Drop for Watch<R> {
    fn drop(&mut self) {
        if let Some(store) = self.store.upgrade() {
            store.lock().watchers.retain(|w| w.id != self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::RegistryChain;
    use futures::StreamExt;
    use std::time::Duration;

    /// An endpoint (or, with an empty name, a template: no URL either).
    fn nse(name: &str, services: &[&str]) -> NetworkServiceEndpoint {
        NetworkServiceEndpoint {
            name: name.into(),
            network_service_names: services.iter().map(|s| s.to_string()).collect(),
            url: if name.is_empty() {
                String::new()
            } else {
                format!("tcp://{name}:5001")
            },
            ..Default::default()
        }
    }

    fn by_service(s: &str) -> NetworkServiceEndpoint {
        nse("", &[s])
    }

    fn chain<R: Stored>(store: &Memory<R>) -> RegistryChain<R> {
        RegistryChain::builder().push(store.clone()).build()
    }

    /// A watching Find of `template` through `reg`.
    async fn watch<R: Stored>(reg: &RegistryChain<R>, cx: &mut Cx, template: R) -> FindStream<R> {
        reg.find(
            cx,
            Query {
                template,
                watch: true,
            },
        )
        .await
        .unwrap()
    }

    async fn next_item<R: Stored>(s: &mut FindStream<R>) -> Found<R> {
        tokio::time::timeout(Duration::from_secs(5), s.next())
            .await
            .expect("an item within 5 s")
            .expect("the stream is open")
            .expect("no error")
    }

    async fn no_item<R: Stored>(s: &mut FindStream<R>) {
        let got = tokio::time::timeout(Duration::from_millis(50), s.next()).await;
        assert!(got.is_err(), "unexpected item: {got:?}");
    }

    #[tokio::test]
    async fn watch_gets_current_state_then_updates_then_deletes() {
        let store = memory();
        let reg = chain(&store);
        let cx = &mut Cx::server();
        reg.register(cx, nse("a", &["svc"])).await.unwrap();
        reg.register(cx, nse("other", &["svc2"])).await.unwrap();

        let mut w = watch(&reg, cx, by_service("svc")).await;
        let first = next_item(&mut w).await;
        assert_eq!((first.resource.name.as_str(), first.deleted), ("a", false));
        no_item(&mut w).await;

        let mut changed = nse("a", &["svc"]);
        changed.url = "tcp://moved:1".into();
        reg.register(cx, changed).await.unwrap();
        reg.register(cx, nse("b", &["svc"])).await.unwrap();
        reg.register(cx, nse("c", &["svc3"])).await.unwrap();
        let upd = next_item(&mut w).await;
        assert_eq!(
            (upd.resource.url.as_str(), upd.deleted),
            ("tcp://moved:1", false)
        );
        assert_eq!(next_item(&mut w).await.resource.name, "b");

        reg.unregister(cx, nse("a", &[])).await.unwrap();
        let del = next_item(&mut w).await;
        assert_eq!((del.resource.name.as_str(), del.deleted), ("a", true));
        assert_eq!(
            del.resource.url, "tcp://moved:1",
            "the delete carries the stored entry"
        );
        no_item(&mut w).await;
    }

    #[tokio::test]
    async fn find_without_watch_lists_matches_and_ends() {
        let store = memory();
        let reg = chain(&store);
        let cx = &mut Cx::server();
        for (n, s) in [("a", "x"), ("b", "x"), ("c", "y")] {
            reg.register(cx, nse(n, &[s])).await.unwrap();
        }
        let mut names: Vec<_> = reg
            .list(cx, by_service("x"))
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.name)
            .collect();
        names.sort();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(reg.list(cx, by_service("zzz")).await.unwrap(), []);
        assert_eq!(reg.list(cx, Default::default()).await.unwrap().len(), 3);
        assert_eq!(store.watchers(), 0);
    }

    #[tokio::test]
    async fn a_watcher_that_never_reads_does_not_block_registrations_and_later_relists() {
        let store = memory();
        let reg = chain(&store);
        let cx = &mut Cx::server();
        reg.register(cx, nse("gone", &["svc"])).await.unwrap();
        let mut w = watch(&reg, cx, by_service("svc")).await;
        assert_eq!(next_item(&mut w).await.resource.name, "gone");

        tokio::time::timeout(Duration::from_secs(10), async {
            for i in 0..1000 {
                reg.register(&mut Cx::server(), nse(&format!("nse-{i}"), &["svc"]))
                    .await
                    .unwrap();
            }
            reg.unregister(&mut Cx::server(), nse("gone", &[]))
                .await
                .unwrap();
        })
        .await
        .expect("registrations never wait for a watcher");
        assert_eq!(store.len(), 1000);

        // The watcher re-lists: the delete it missed, then the current state.
        let first = next_item(&mut w).await;
        assert_eq!(
            (first.resource.name.as_str(), first.deleted),
            ("gone", true)
        );
        let mut seen = HashSet::new();
        for _ in 0..1000 {
            let item = next_item(&mut w).await;
            assert!(!item.deleted);
            seen.insert(item.resource.name);
        }
        assert_eq!(seen.len(), 1000);
        no_item(&mut w).await;

        // And then follows changes as usual.
        reg.unregister(cx, nse("nse-7", &[])).await.unwrap();
        let del = next_item(&mut w).await;
        assert_eq!((del.resource.name.as_str(), del.deleted), ("nse-7", true));
    }

    #[tokio::test]
    async fn a_dropped_watcher_leaves_nothing_behind() {
        let store = memory::<NetworkServiceEndpoint>();
        let reg = chain(&store);
        let cx = &mut Cx::server();
        let w1 = watch(&reg, cx, Default::default()).await;
        let mut w2 = watch(&reg, cx, Default::default()).await;
        assert_eq!(store.watchers(), 2);
        drop(w1);
        assert_eq!(store.watchers(), 1);
        reg.register(cx, nse("a", &["s"])).await.unwrap();
        assert_eq!(next_item(&mut w2).await.resource.name, "a");
        drop(w2);
        assert_eq!(store.watchers(), 0);
    }

    #[tokio::test]
    async fn a_watch_stream_ends_when_the_store_is_gone() {
        let store = memory::<NetworkServiceEndpoint>();
        let mut w = watch(&chain(&store), &mut Cx::server(), Default::default()).await;
        drop(store);
        let end = tokio::time::timeout(Duration::from_secs(5), w.next())
            .await
            .unwrap();
        assert!(end.is_none());
    }

    #[tokio::test]
    async fn an_entry_that_stops_matching_is_reported_deleted_to_the_watcher() {
        let store = memory();
        let reg = chain(&store);
        let cx = &mut Cx::server();
        reg.register(cx, nse("a", &["x"])).await.unwrap();
        let mut w = watch(&reg, cx, by_service("x")).await;
        next_item(&mut w).await;
        reg.register(cx, nse("a", &["y"])).await.unwrap();
        let del = next_item(&mut w).await;
        assert_eq!(
            (del.resource.network_service_names.as_slice(), del.deleted),
            (&["x".to_string()][..], true)
        );
        assert!(
            reg.list(cx, by_service("x")).await.unwrap().is_empty(),
            "the index follows the change"
        );
        assert_eq!(reg.list(cx, by_service("y")).await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn find_by_service_name_among_10000_endpoints_returns_exactly_the_subset() {
        // Speed is measured by the registry benchmark (BENCHMARKS.md), not here.
        let store = memory();
        let reg = chain(&store);
        let cx = &mut Cx::server();
        for i in 0..10_000 {
            let e = nse(
                &format!("nse-{i}"),
                &[&format!("svc-{}", i % 100), "common"],
            );
            reg.register(cx, e).await.unwrap();
        }
        let found = reg.list(cx, nse("", &["common", "svc-42"])).await.unwrap();
        let mut names: Vec<usize> = found
            .iter()
            .map(|e| e.name.trim_start_matches("nse-").parse().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, (0..100).map(|k| k * 100 + 42).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn expired_endpoints_are_not_found() {
        let store = memory();
        let reg = chain(&store);
        let cx = &mut Cx::server();
        let past = SystemTime::now() - Duration::from_secs(1);
        let future = SystemTime::now() + Duration::from_secs(60);
        reg.register(
            cx,
            NetworkServiceEndpoint {
                expiration_time: Some(past.into()),
                ..nse("old", &["s"])
            },
        )
        .await
        .unwrap();
        reg.register(
            cx,
            NetworkServiceEndpoint {
                expiration_time: Some(future.into()),
                ..nse("new", &["s"])
            },
        )
        .await
        .unwrap();
        reg.register(cx, nse("forever", &["s"])).await.unwrap();
        let mut names: Vec<_> = reg
            .list(cx, by_service("s"))
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.name)
            .collect();
        names.sort();
        assert_eq!(names, ["forever", "new"]);
        assert!(reg.list(cx, nse("old", &[])).await.unwrap().is_empty());
        assert!(
            store.get("old").is_some(),
            "removal is expire's job, not the store's"
        );
    }

    #[tokio::test]
    async fn a_refresh_keeps_the_initial_registration_time() {
        let store = memory();
        let reg = chain(&store);
        let cx = &mut Cx::server();
        let first = reg.register(cx, nse("a", &["s"])).await.unwrap();
        let t0 = first
            .initial_registration_time
            .expect("set on first registration");
        let again = NetworkServiceEndpoint {
            initial_registration_time: Some(Timestamp {
                seconds: 1,
                nanos: 0,
            }),
            ..nse("a", &["s"])
        };
        let second = reg.register(cx, again).await.unwrap();
        assert_eq!(second.initial_registration_time, Some(t0));
        assert_eq!(store.get("a").unwrap().initial_registration_time, Some(t0));

        reg.unregister(cx, nse("a", &[])).await.unwrap();
        let given = Timestamp {
            seconds: 7,
            nanos: 0,
        };
        let fresh = NetworkServiceEndpoint {
            initial_registration_time: Some(given),
            ..nse("a", &["s"])
        };
        assert_eq!(
            reg.register(cx, fresh)
                .await
                .unwrap()
                .initial_registration_time,
            Some(given)
        );
    }

    #[tokio::test]
    async fn a_network_service_without_payload_gets_ip_and_unknown_unregister_is_ok() {
        let store = memory::<NetworkService>();
        let reg = chain(&store);
        let cx = &mut Cx::server();
        let ns = reg
            .register(
                cx,
                NetworkService {
                    name: "vpn".into(),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        assert_eq!(ns.payload, "IP");
        let eth = NetworkService {
            name: "l2".into(),
            payload: "ETHERNET".into(),
            ..Default::default()
        };
        assert_eq!(reg.register(cx, eth).await.unwrap().payload, "ETHERNET");
        let ip_only = reg
            .list(
                cx,
                NetworkService {
                    payload: "IP".into(),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        assert_eq!(ip_only, [ns]);
        reg.unregister(
            cx,
            NetworkService {
                name: "nope".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        assert_eq!(store.len(), 2);
        let e = reg
            .register(cx, NetworkService::default())
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
    }
}
