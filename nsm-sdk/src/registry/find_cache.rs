//! `find_cache`: repeated Finds answered from memory, kept fresh by one watching Find
//! per distinct query.
//!
//! What it does: a Find without `watch` whose template was seen before is answered
//! from memory. The first time a template is seen, the Find goes on as usual (its
//! answer also fills the cache) and the cache opens **one watching Find** for the same
//! template through the rest of the chain; the watch's entries and `deleted` events keep
//! the cached answer current, so later Finds need no call. Register and Unregister that
//! pass through this handler also update every cached answer they touch at once
//! (read-your-writes for everything registered through the same front); changes made
//! elsewhere arrive with the watch, a few milliseconds later.
//!
//! A watching Find for a template whose answer is cached is served from the cache
//! too: the current entries, then every change the cache's own watch (or a write
//! through it) brings. So a thousand watchers of one network service (hops that each
//! watch it, as `netsvc_monitor` does once per service) cost the registry one watch,
//! not a thousand. A watcher that
//! falls more than [`WATCH_BUFFER`] changes behind gets an Unavailable error ending its
//! stream (`watch_reconnect` in front of the cache then finds again and starts from the
//! current entries); it never slows the others down. A watching Find for a template
//! not cached passes through.
//!
//! A Request through a manager and a forwarder makes six registry Finds (the forwarders
//! and the service at the manager; the service and its endpoints at the forwarder,
//! through the manager's front): with this handler in front of the registry client
//! of both, steady-state Requests make none (BENCHMARKS.md, issue 2).
//!
//! State: per distinct template, the matching entries by name, whether the answer is
//! complete yet, and when it was last used; at most [`FindCache::max_queries`]
//! templates (default 4,096). A template unused for [`FindCache::idle`] (default 60 s)
//! and watched by nobody is dropped with its watch when the next new template arrives. The watches are tasks
//! of the cache, stopped by its root token (`root`) or when the cache is dropped; they
//! are node-level, not per connection, so [`live_tasks`](crate::core::live_tasks) does
//! not count them.
//!
//! Failure handled: when a watch fails or ends (the registry restarted, the connection
//! broke), its template is forgotten and the next Find for it goes to the registry
//! again (and opens a new watch), so a broken watch never serves stale answers for
//! long; a failing first Find is returned as is and caches nothing.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{FindStream, Found, Matches, Query, RegistryHandler, RegistryNext, Resource};
use crate::core::Cx;
use crate::Result;

/// Templates unused for this long are dropped (with their watch).
pub const DEFAULT_IDLE: Duration = Duration::from_secs(60);
/// At most this many templates are cached.
pub const DEFAULT_MAX_QUERIES: usize = 4096;
/// How many changes a watcher served from the cache may fall behind before its stream
/// ends with Unavailable.
pub const WATCH_BUFFER: usize = 256;

/// See the [module docs](self).
pub struct FindCache<R: Resource> {
    inner: Arc<Inner<R>>,
}

impl<R: Resource> Clone for FindCache<R> {
    fn clone(&self) -> Self {
        FindCache {
            inner: self.inner.clone(),
        }
    }
}

impl<R: Resource> std::fmt::Debug for FindCache<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FindCache")
            .field("kind", &R::KIND)
            .field("queries", &self.queries())
            .finish()
    }
}

struct Inner<R: Resource> {
    /// Cached templates, bucketed by the template's name (Finds by name are the most
    /// common; the others share the "" bucket).
    entries: Mutex<HashMap<String, Vec<Arc<Entry<R>>>>>,
    root: CancellationToken,
    idle: Duration,
    max: usize,
}

impl<R: Resource> Drop for Inner<R> {
    fn drop(&mut self) {
        self.root.cancel();
    }
}

struct Entry<R> {
    template: R,
    cancel: CancellationToken,
    state: Mutex<EntryState<R>>,
    /// Every change, for the watchers served from the cache (sent under the state lock,
    /// so a new watcher's snapshot and its first change never overlap or miss).
    events: tokio::sync::broadcast::Sender<Found<R>>,
}

struct EntryState<R> {
    items: BTreeMap<String, R>,
    /// Names the watch or a write through this handler has spoken about: a plain
    /// Find's (possibly older) answer does not override them.
    touched: HashSet<String>,
    ready: bool,
    last_used: Instant,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl<R: Resource> Entry<R> {
    fn apply(&self, found: Found<R>) {
        let mut s = lock(&self.state);
        let name = found.resource.name().to_string();
        s.touched.insert(name.clone());
        let changed = if found.deleted {
            s.items.remove(&name).is_some()
        } else {
            s.items.get(&name) != Some(&found.resource)
        };
        if !changed {
            return;
        }
        if !found.deleted {
            s.items.insert(name, found.resource.clone());
        }
        // No receiver is fine: nobody watches from the cache.
        let _ = self.events.send(found);
    }

    /// The current entries and a receiver of every later change, or None while the
    /// answer is not complete.
    fn subscribe(&self) -> Option<(Vec<R>, tokio::sync::broadcast::Receiver<Found<R>>)> {
        let mut s = lock(&self.state);
        if !s.ready {
            return None;
        }
        s.last_used = Instant::now();
        Some((s.items.values().cloned().collect(), self.events.subscribe()))
    }

    /// Merges a plain Find's answer: adds what the watch has not spoken about yet.
    fn fill(&self, answer: &[Found<R>]) {
        let mut s = lock(&self.state);
        for f in answer {
            let name = f.resource.name();
            if !f.deleted && !s.touched.contains(name) {
                s.items.insert(name.to_string(), f.resource.clone());
            }
        }
        s.ready = true;
    }

    fn answer(&self) -> Option<Vec<R>> {
        let mut s = lock(&self.state);
        if !s.ready {
            return None;
        }
        s.last_used = Instant::now();
        Some(s.items.values().cloned().collect())
    }
}

/// The `find_cache` registry handler with the default limits.
pub fn find_cache<R: Resource + Matches>() -> FindCache<R> {
    FindCache {
        inner: Arc::new(Inner {
            entries: Mutex::new(HashMap::new()),
            root: CancellationToken::new(),
            idle: DEFAULT_IDLE,
            max: DEFAULT_MAX_QUERIES,
        }),
    }
}

impl<R: Resource + Matches> FindCache<R> {
    /// Its watches stop when `root` is cancelled; dropping the cache cancels `root`
    /// (give it a child token).
    pub fn root(self, root: CancellationToken) -> Self {
        self.with(|i| i.root = root)
    }

    /// Drops templates unused for this long (default [`DEFAULT_IDLE`]).
    pub fn idle(self, idle: Duration) -> Self {
        self.with(|i| i.idle = idle)
    }

    /// Caches at most this many templates (default [`DEFAULT_MAX_QUERIES`]); beyond it,
    /// Finds for new templates go to the registry uncached.
    pub fn max_queries(self, max: usize) -> Self {
        self.with(|i| i.max = max)
    }

    fn with(self, f: impl FnOnce(&mut Inner<R>)) -> Self {
        let mut inner = match Arc::try_unwrap(self.inner) {
            Ok(inner) => inner,
            // Builder use only: a shared cache keeps its settings.
            Err(shared) => return FindCache { inner: shared },
        };
        f(&mut inner);
        FindCache {
            inner: Arc::new(inner),
        }
    }
}

impl<R: Resource> FindCache<R> {
    /// How many templates are cached now.
    pub fn queries(&self) -> usize {
        lock(&self.inner.entries).values().map(Vec::len).sum()
    }
}

impl<R: Resource + Matches> Inner<R> {
    fn lookup(&self, template: &R) -> Option<Arc<Entry<R>>> {
        lock(&self.entries)
            .get(template.name())
            .and_then(|b| b.iter().find(|e| e.template == *template).cloned())
    }

    /// The entry for `template`, created (with `true`) when it is new and there is room.
    fn entry(&self, template: &R) -> Option<(Arc<Entry<R>>, bool)> {
        let mut entries = lock(&self.entries);
        if let Some(e) = entries
            .get(template.name())
            .and_then(|b| b.iter().find(|e| e.template == *template))
        {
            return Some((e.clone(), false));
        }
        let now = Instant::now();
        let idle = self.idle;
        entries.retain(|_, bucket| {
            bucket.retain(|e| {
                let s = lock(&e.state);
                let keep = !s.ready
                    || now.duration_since(s.last_used) < idle
                    || e.events.receiver_count() > 0;
                if !keep {
                    e.cancel.cancel();
                }
                keep
            });
            !bucket.is_empty()
        });
        if entries.values().map(Vec::len).sum::<usize>() >= self.max {
            return None;
        }
        let entry = Arc::new(Entry {
            template: template.clone(),
            events: tokio::sync::broadcast::channel(WATCH_BUFFER).0,
            cancel: self.root.child_token(),
            state: Mutex::new(EntryState {
                items: BTreeMap::new(),
                touched: HashSet::new(),
                ready: false,
                last_used: now,
            }),
        });
        entries
            .entry(template.name().to_string())
            .or_default()
            .push(entry.clone());
        Some((entry, true))
    }

    fn forget(&self, entry: &Arc<Entry<R>>) {
        entry.cancel.cancel();
        let mut entries = lock(&self.entries);
        if let Some(bucket) = entries.get_mut(entry.template.name()) {
            bucket.retain(|e| !Arc::ptr_eq(e, entry));
            if bucket.is_empty() {
                entries.remove(entry.template.name());
            }
        }
    }

    fn each(&self, mut f: impl FnMut(&Entry<R>)) {
        let all: Vec<Arc<Entry<R>>> = lock(&self.entries).values().flatten().cloned().collect();
        for e in &all {
            f(e);
        }
    }
}

/// Keeps one template's answer current from a watching Find; forgets the template when
/// the watch breaks.
async fn watch<R: Resource + Matches>(
    inner: Weak<Inner<R>>,
    entry: Arc<Entry<R>>,
    mut cx: Cx,
    next: RegistryNext<R>,
) {
    cx.set_deadline(None);
    let query = Query {
        template: entry.template.clone(),
        watch: true,
    };
    let outcome = tokio::select! {
        _ = entry.cancel.cancelled() => return,
        s = next.find(&mut cx, query) => s,
    };
    match outcome {
        Ok(mut stream) => loop {
            let item = tokio::select! {
                _ = entry.cancel.cancelled() => return,
                item = stream.next() => item,
            };
            match item {
                Some(Ok(found)) => entry.apply(found),
                Some(Err(e)) => {
                    tracing::debug!(kind = R::KIND, error = %e, "cache watch broke; forgetting its answer");
                    break;
                }
                None => {
                    tracing::debug!(kind = R::KIND, "cache watch ended; forgetting its answer");
                    break;
                }
            }
        },
        Err(e) => tracing::debug!(kind = R::KIND, error = %e, "cache watch could not start"),
    }
    if let Some(inner) = inner.upgrade() {
        inner.forget(&entry);
    }
}

fn answer_stream<R: Resource>(items: Vec<R>) -> FindStream<R> {
    Box::pin(futures::stream::iter(items.into_iter().map(|resource| {
        Ok(Found {
            resource,
            deleted: false,
        })
    })))
}

/// The current entries, then the changes; ends when the cache forgets the template
/// (its sender is dropped) and with Unavailable when this watcher lags.
fn watch_stream<R: Resource>(
    items: Vec<R>,
    rx: tokio::sync::broadcast::Receiver<Found<R>>,
) -> FindStream<R> {
    use tokio::sync::broadcast::error::RecvError;
    let changes = futures::stream::unfold(Some(rx), |rx| async move {
        let mut rx = rx?;
        match rx.recv().await {
            Ok(found) => Some((Ok(found), Some(rx))),
            Err(RecvError::Closed) => None,
            Err(RecvError::Lagged(n)) => Some((
                Err(crate::Error::unavailable(format!(
                    "registry watch fell {n} changes behind; find again"
                ))),
                None,
            )),
        }
    });
    Box::pin(answer_stream(items).chain(changes))
}

#[async_trait]
impl<R: Resource + Matches> RegistryHandler<R> for FindCache<R> {
    async fn register(&self, cx: &mut Cx, r: R, next: RegistryNext<R>) -> Result<R> {
        let stored = next.register(cx, r).await?;
        self.inner.each(|e| {
            e.apply(Found {
                resource: stored.clone(),
                deleted: !stored.matches(&e.template),
            })
        });
        Ok(stored)
    }

    async fn find(
        &self,
        cx: &mut Cx,
        query: Query<R>,
        next: RegistryNext<R>,
    ) -> Result<FindStream<R>> {
        if query.watch {
            return match self
                .inner
                .lookup(&query.template)
                .and_then(|e| e.subscribe())
            {
                Some((items, rx)) => Ok(watch_stream(items, rx)),
                None => next.find(cx, query).await,
            };
        }
        if let Some(items) = self.inner.lookup(&query.template).and_then(|e| e.answer()) {
            return Ok(answer_stream(items));
        }
        let entry = match self.inner.entry(&query.template) {
            Some((entry, new)) => {
                if new {
                    tokio::spawn(watch(
                        Arc::downgrade(&self.inner),
                        entry.clone(),
                        cx.clone(),
                        next.clone(),
                    ));
                }
                Some(entry)
            }
            None => None,
        };
        let stream = next.find(cx, query).await?;
        let answer: Vec<Found<R>> = stream
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<Result<_>>()?;
        if let Some(entry) = entry {
            entry.fill(&answer);
        }
        Ok(Box::pin(futures::stream::iter(answer.into_iter().map(Ok))))
    }

    async fn unregister(&self, cx: &mut Cx, r: R, next: RegistryNext<R>) -> Result<()> {
        next.unregister(cx, r.clone()).await?;
        self.inner.each(|e| {
            e.apply(Found {
                resource: r.clone(),
                deleted: true,
            })
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::Side;
    use crate::registry::{memory, RegistryChain};
    use nsm_proto::registry::NetworkServiceEndpoint;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Counts the Finds that reach it, by kind.
    #[derive(Default)]
    struct Calls {
        plain: AtomicUsize,
        watching: AtomicUsize,
    }

    #[async_trait]
    impl RegistryHandler<NetworkServiceEndpoint> for Arc<Calls> {
        async fn find(
            &self,
            cx: &mut Cx,
            query: Query<NetworkServiceEndpoint>,
            next: RegistryNext<NetworkServiceEndpoint>,
        ) -> Result<FindStream<NetworkServiceEndpoint>> {
            if query.watch {
                self.watching.fetch_add(1, Ordering::SeqCst);
            } else {
                self.plain.fetch_add(1, Ordering::SeqCst);
            }
            next.find(cx, query).await
        }
    }

    fn nse(name: &str, service: &str) -> NetworkServiceEndpoint {
        NetworkServiceEndpoint {
            name: name.into(),
            network_service_names: vec![service.into()],
            url: format!("unix:///{name}.sock"),
            ..Default::default()
        }
    }

    fn by_service(service: &str) -> NetworkServiceEndpoint {
        NetworkServiceEndpoint {
            network_service_names: vec![service.into()],
            ..Default::default()
        }
    }

    fn cx() -> Cx {
        Cx::new(Side::Server)
    }

    async fn names(
        chain: &RegistryChain<NetworkServiceEndpoint>,
        t: NetworkServiceEndpoint,
    ) -> Vec<String> {
        let mut v: Vec<String> = chain
            .list(&mut cx(), t)
            .await
            .unwrap()
            .into_iter()
            .map(|n| n.name)
            .collect();
        v.sort();
        v
    }

    /// The cache in front of a counter in front of a store; registrations straight to
    /// the store bypass the cache (as another node's would).
    fn setup() -> (
        RegistryChain<NetworkServiceEndpoint>,
        RegistryChain<NetworkServiceEndpoint>,
        Arc<Calls>,
        FindCache<NetworkServiceEndpoint>,
    ) {
        let store = RegistryChain::builder().push(memory()).build();
        let calls = Arc::new(Calls::default());
        let cache = find_cache();
        let front = RegistryChain::builder()
            .push(cache.clone())
            .push(calls.clone())
            .push(store.clone())
            .build();
        (front, store, calls, cache)
    }

    async fn eventually(what: &str, mut f: impl AsyncFnMut() -> bool) {
        let start = Instant::now();
        while !f().await {
            assert!(start.elapsed() < Duration::from_secs(5), "{what}");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    #[tokio::test]
    async fn a_repeated_find_is_answered_from_memory_after_one_call_and_one_watch() {
        let (front, store, calls, cache) = setup();
        store.register(&mut cx(), nse("a", "svc")).await.unwrap();
        store.register(&mut cx(), nse("b", "svc")).await.unwrap();
        store.register(&mut cx(), nse("c", "other")).await.unwrap();
        for _ in 0..5 {
            assert_eq!(names(&front, by_service("svc")).await, ["a", "b"]);
        }
        assert_eq!(calls.plain.load(Ordering::SeqCst), 1);
        eventually("one watch", async || {
            calls.watching.load(Ordering::SeqCst) == 1
        })
        .await;
        assert_eq!(cache.queries(), 1);
        // Another template is another entry with its own watch.
        assert_eq!(names(&front, by_service("other")).await, ["c"]);
        assert_eq!(calls.plain.load(Ordering::SeqCst), 2);
        assert_eq!(cache.queries(), 2);
    }

    #[tokio::test]
    async fn changes_made_elsewhere_arrive_through_the_watch() {
        let (front, store, calls, _cache) = setup();
        store.register(&mut cx(), nse("a", "svc")).await.unwrap();
        assert_eq!(names(&front, by_service("svc")).await, ["a"]);
        store.register(&mut cx(), nse("b", "svc")).await.unwrap();
        eventually("b added", async || {
            names(&front, by_service("svc")).await == ["a", "b"]
        })
        .await;
        store.unregister(&mut cx(), nse("a", "svc")).await.unwrap();
        eventually("a removed", async || {
            names(&front, by_service("svc")).await == ["b"]
        })
        .await;
        // An entry that stops matching leaves the answer.
        store.register(&mut cx(), nse("b", "moved")).await.unwrap();
        eventually("b moved", async || {
            names(&front, by_service("svc")).await.is_empty()
        })
        .await;
        assert_eq!(calls.plain.load(Ordering::SeqCst), 1, "all from memory");
    }

    #[tokio::test]
    async fn writes_through_the_cache_are_seen_at_once() {
        let (front, _store, calls, _cache) = setup();
        assert!(names(&front, by_service("svc")).await.is_empty());
        front.register(&mut cx(), nse("a", "svc")).await.unwrap();
        assert_eq!(names(&front, by_service("svc")).await, ["a"]);
        front
            .register(&mut cx(), nse("a", "elsewhere"))
            .await
            .unwrap();
        assert!(names(&front, by_service("svc")).await.is_empty());
        front.register(&mut cx(), nse("b", "svc")).await.unwrap();
        front.unregister(&mut cx(), nse("b", "svc")).await.unwrap();
        assert!(names(&front, by_service("svc")).await.is_empty());
        assert_eq!(calls.plain.load(Ordering::SeqCst), 1);
    }

    /// A store whose watching Finds end at once: the cache must not keep answering.
    struct ShortWatch;

    #[async_trait]
    impl RegistryHandler<NetworkServiceEndpoint> for ShortWatch {
        async fn find(
            &self,
            cx: &mut Cx,
            mut query: Query<NetworkServiceEndpoint>,
            next: RegistryNext<NetworkServiceEndpoint>,
        ) -> Result<FindStream<NetworkServiceEndpoint>> {
            query.watch = false;
            next.find(cx, query).await
        }
    }

    #[tokio::test]
    async fn a_broken_watch_forgets_its_template_and_the_next_find_asks_again() {
        let store = RegistryChain::builder().push(memory()).build();
        let calls = Arc::new(Calls::default());
        let cache = find_cache();
        let front = RegistryChain::builder()
            .push(cache.clone())
            .push(calls.clone())
            .push(ShortWatch)
            .push(store.clone())
            .build();
        store.register(&mut cx(), nse("a", "svc")).await.unwrap();
        assert_eq!(names(&front, by_service("svc")).await, ["a"]);
        eventually("forgotten", async || cache.queries() == 0).await;
        store.register(&mut cx(), nse("b", "svc")).await.unwrap();
        assert_eq!(names(&front, by_service("svc")).await, ["a", "b"]);
        assert_eq!(calls.plain.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_failing_find_is_returned_and_watching_finds_pass_through() {
        struct Down;
        #[async_trait]
        impl RegistryHandler<NetworkServiceEndpoint> for Down {
            async fn find(
                &self,
                _: &mut Cx,
                _: Query<NetworkServiceEndpoint>,
                _: RegistryNext<NetworkServiceEndpoint>,
            ) -> Result<FindStream<NetworkServiceEndpoint>> {
                Err(crate::Error::unavailable("registry down"))
            }
        }
        let cache = find_cache();
        let front = RegistryChain::builder()
            .push(cache.clone())
            .push(Down)
            .build();
        let err = front.list(&mut cx(), by_service("svc")).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unavailable);
        eventually("nothing cached", async || cache.queries() == 0).await;

        let (front, _store, calls, cache) = setup();
        let q = Query {
            template: by_service("svc"),
            watch: true,
        };
        drop(front.find(&mut cx(), q).await.unwrap());
        assert_eq!(calls.watching.load(Ordering::SeqCst), 1);
        assert_eq!(cache.queries(), 0);
    }

    fn watch_query(service: &str) -> Query<NetworkServiceEndpoint> {
        Query {
            template: by_service(service),
            watch: true,
        }
    }

    async fn next_item(s: &mut FindStream<NetworkServiceEndpoint>) -> (String, bool) {
        let f = tokio::time::timeout(Duration::from_secs(5), s.next())
            .await
            .expect("an item in time")
            .expect("the stream goes on")
            .expect("no error");
        (f.resource.name, f.deleted)
    }

    #[tokio::test]
    async fn watchers_of_a_cached_template_share_the_cache_watch_and_see_every_change() {
        let (front, store, calls, _cache) = setup();
        store.register(&mut cx(), nse("a", "svc")).await.unwrap();
        assert_eq!(names(&front, by_service("svc")).await, ["a"]);
        eventually("cache watch open", async || {
            calls.watching.load(Ordering::SeqCst) == 1
        })
        .await;
        let mut watchers = Vec::new();
        for _ in 0..100 {
            let mut w = front.find(&mut cx(), watch_query("svc")).await.unwrap();
            assert_eq!(next_item(&mut w).await, ("a".to_string(), false));
            watchers.push(w);
        }
        assert_eq!(
            calls.watching.load(Ordering::SeqCst),
            1,
            "no watch per watcher"
        );
        store.register(&mut cx(), nse("b", "svc")).await.unwrap();
        store.unregister(&mut cx(), nse("a", "svc")).await.unwrap();
        front.register(&mut cx(), nse("c", "svc")).await.unwrap();
        for w in &mut watchers {
            let mut seen = vec![next_item(w).await, next_item(w).await, next_item(w).await];
            seen.sort();
            assert_eq!(
                seen,
                [
                    ("a".to_string(), true),
                    ("b".to_string(), false),
                    ("c".to_string(), false)
                ]
            );
        }
    }

    #[tokio::test]
    async fn a_lagging_watcher_gets_an_error_and_blocks_nobody() {
        let (front, _store, _calls, _cache) = setup();
        assert!(names(&front, by_service("svc")).await.is_empty());
        let mut slow = front.find(&mut cx(), watch_query("svc")).await.unwrap();
        let mut quick = front.find(&mut cx(), watch_query("svc")).await.unwrap();
        for i in 0..WATCH_BUFFER + 10 {
            front
                .register(&mut cx(), nse(&format!("e{i}"), "svc"))
                .await
                .unwrap();
            assert_eq!(next_item(&mut quick).await, (format!("e{i}"), false));
        }
        let err = tokio::time::timeout(Duration::from_secs(5), slow.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unavailable);
        assert!(slow.next().await.is_none(), "the lagging stream ends");
    }

    #[tokio::test(start_paused = true)]
    async fn idle_templates_are_dropped_with_their_watch_and_the_count_is_bounded() {
        let store = RegistryChain::builder().push(memory()).build();
        let cache = find_cache().idle(Duration::from_secs(10)).max_queries(2);
        let front = RegistryChain::builder()
            .push(cache.clone())
            .push(store.clone())
            .build();
        names(&front, by_service("a")).await;
        names(&front, by_service("b")).await;
        names(&front, by_service("c")).await; // no room: answered, not cached
        assert_eq!(cache.queries(), 2);
        tokio::time::advance(Duration::from_secs(11)).await;
        names(&front, by_service("c")).await; // the idle two make room
        assert_eq!(cache.queries(), 1);
        // A template someone watches from the cache is not idle.
        let _w = front.find(&mut cx(), watch_query("c")).await.unwrap();
        tokio::time::advance(Duration::from_secs(11)).await;
        names(&front, by_service("d")).await;
        assert_eq!(cache.queries(), 2, "c is watched, d is new");
    }
}
