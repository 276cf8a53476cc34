//! `watch_reconnect`: a registry client's watching Find survives a broken stream.
//!
//! What it does: for a Find with `watch = true`, it returns a stream that, when the
//! stream from the rest of the chain fails or ends (the registry restarted, the
//! connection broke, the replica died and [`grpc_registry`](crate::transport::grpc_registry)
//! moved to the next one), opens the same watching Find again through the rest of the
//! chain, with backoff, then **re-lists and diffs**: a plain Find of the same template,
//! compared with what the consumer was told, becomes a `deleted` item for each entry
//! that went away while the watch was down and an item for each one that is new or
//! changed. The new watch then streams on, with what the consumer already knows left
//! out. So a consumer sees neither a gap (a deletion missed while reconnecting) nor a
//! duplicate (every entry sent again). Items identical to what the consumer knows, and
//! deletions of entries it never saw, are left out of the first stream too. A Find
//! without `watch`, Register and Unregister pass through.
//!
//! The watch is opened before the re-list so no change falls between them; a change in
//! the moment between the two may reach the consumer twice (the re-list's version, then
//! the watch's own events ending with the same final state), never be lost.
//!
//! State: each reconnecting stream holds the rest of the chain, the query and the
//! entries its consumer knows (by name), until the consumer drops it.
//!
//! Failure handled: the first Find failing is returned to the caller as is; later
//! failures (of the watch or of the re-list) are retried after a [`Backoff`] of 100 ms
//! doubling to 5 s, never in a tight loop.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;

use super::{FindStream, Found, Query, RegistryHandler, RegistryNext, Resource};
use crate::core::rt::Backoff;
use crate::core::Cx;
use crate::Result;

const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How long the re-list after a reconnect may take.
const RELIST_TIMEOUT: Duration = Duration::from_secs(15);

/// See the [module docs](self).
#[derive(Debug, Clone, Copy, Default)]
pub struct WatchReconnect;

/// The `watch_reconnect` registry handler.
pub fn watch_reconnect() -> WatchReconnect {
    WatchReconnect
}

struct Reconnecting<R: Resource> {
    current: Option<FindStream<R>>,
    /// The re-list's differences, handed out before the new watch's items.
    pending: VecDeque<Found<R>>,
    /// What the consumer has been told is there, by name.
    known: HashMap<String, R>,
    next: RegistryNext<R>,
    query: Query<R>,
    cx: Cx,
    backoff: Backoff,
    /// Failed Finds in a row: the next pause's attempt.
    failures: u32,
}

impl<R: Resource> Reconnecting<R> {
    /// Records an item of a watch; false when the consumer knows it already.
    fn learn(&mut self, found: &Found<R>) -> bool {
        let name = found.resource.name();
        if found.deleted {
            return self.known.remove(name).is_some();
        }
        if self.known.get(name) == Some(&found.resource) {
            return false;
        }
        self.known.insert(name.to_string(), found.resource.clone());
        true
    }

    /// Opens the watch again, then re-lists and queues the differences.
    async fn reopen(&mut self) -> Result<()> {
        let watch = self
            .next
            .clone()
            .find(&mut self.cx, self.query.clone())
            .await?;
        let mut list_cx = self.cx.clone().with_timeout(RELIST_TIMEOUT);
        let mut listed = self
            .next
            .clone()
            .find(
                &mut list_cx,
                Query {
                    template: self.query.template.clone(),
                    watch: false,
                },
            )
            .await?;
        let mut now = HashMap::new();
        while let Some(item) = listed.next().await {
            let item = item?;
            if !item.deleted {
                now.insert(item.resource.name().to_string(), item.resource);
            }
        }
        let mut gone: Vec<R> = self
            .known
            .iter()
            .filter(|(name, _)| !now.contains_key(*name))
            .map(|(_, r)| r.clone())
            .collect();
        gone.sort_by(|a, b| a.name().cmp(b.name()));
        let mut changed: Vec<R> = now
            .iter()
            .filter(|(name, r)| self.known.get(*name) != Some(*r))
            .map(|(_, r)| r.clone())
            .collect();
        changed.sort_by(|a, b| a.name().cmp(b.name()));
        tracing::debug!(
            kind = R::KIND,
            gone = gone.len(),
            changed = changed.len(),
            "watch found again; re-listed"
        );
        self.pending.clear();
        self.pending.extend(gone.into_iter().map(|resource| Found {
            resource,
            deleted: true,
        }));
        self.pending
            .extend(changed.into_iter().map(|resource| Found {
                resource,
                deleted: false,
            }));
        self.known = now;
        self.current = Some(watch);
        Ok(())
    }
}

#[async_trait]
impl<R: Resource> RegistryHandler<R> for WatchReconnect {
    async fn find(
        &self,
        cx: &mut Cx,
        query: Query<R>,
        next: RegistryNext<R>,
    ) -> Result<FindStream<R>> {
        if !query.watch {
            return next.find(cx, query).await;
        }
        let first = next.clone().find(cx, query.clone()).await?;
        // A watch outlives the call that opened it: later Finds get no deadline.
        let mut later = cx.clone();
        later.set_deadline(None);
        let state = Reconnecting {
            current: Some(first),
            pending: VecDeque::new(),
            known: HashMap::new(),
            next,
            query,
            cx: later,
            backoff: Backoff::new(BACKOFF_START, BACKOFF_MAX),
            failures: 0,
        };
        Ok(Box::pin(futures::stream::unfold(
            state,
            |mut s| async move {
                loop {
                    if let Some(found) = s.pending.pop_front() {
                        return Some((Ok(found), s));
                    }
                    if let Some(stream) = s.current.as_mut() {
                        match stream.next().await {
                            Some(Ok(item)) => {
                                if s.learn(&item) {
                                    return Some((Ok(item), s));
                                }
                                continue;
                            }
                            Some(Err(e)) => {
                                tracing::debug!(kind = R::KIND, error = %e, "watch broke; finding again");
                            }
                            None => tracing::debug!(kind = R::KIND, "watch ended; finding again"),
                        }
                        s.current = None;
                    }
                    tokio::time::sleep(s.backoff.wait(s.failures)).await;
                    match s.reopen().await {
                        Ok(()) => s.failures = 0,
                        Err(e) => {
                            tracing::debug!(kind = R::KIND, error = %e, "finding again failed");
                            s.current = None;
                            s.failures = s.failures.saturating_add(1);
                        }
                    }
                }
            },
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::{memory, Found, Memory, RegistryChain};
    use crate::Error;
    use nsm_proto::registry::NetworkServiceEndpoint;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;

    /// Stands for the link to the registry: `cut` breaks every open watch with
    /// Unavailable, and while `down` every Find fails.
    struct Link {
        cuts: tokio::sync::watch::Sender<u64>,
        down: AtomicBool,
        finds: AtomicUsize,
    }

    impl Link {
        fn new() -> Arc<Self> {
            Arc::new(Link {
                cuts: tokio::sync::watch::channel(0).0,
                down: AtomicBool::new(false),
                finds: AtomicUsize::new(0),
            })
        }
        fn cut(&self) {
            self.down.store(true, Ordering::SeqCst);
            self.cuts.send_modify(|n| *n += 1);
        }
        fn restore(&self) {
            self.down.store(false, Ordering::SeqCst);
        }
    }

    #[async_trait]
    impl RegistryHandler<NetworkServiceEndpoint> for Arc<Link> {
        async fn find(
            &self,
            cx: &mut Cx,
            query: Query<NetworkServiceEndpoint>,
            next: RegistryNext<NetworkServiceEndpoint>,
        ) -> Result<FindStream<NetworkServiceEndpoint>> {
            self.finds.fetch_add(1, Ordering::SeqCst);
            if self.down.load(Ordering::SeqCst) {
                return Err(Error::unavailable("registry down"));
            }
            let watching = query.watch;
            let stream = next.find(cx, query).await?;
            if !watching {
                return Ok(stream);
            }
            let mut cuts = self.cuts.subscribe();
            let broken =
                futures::stream::once(async { Err(Error::unavailable("connection broke")) });
            Ok(stream
                .take_until(async move { cuts.changed().await })
                .chain(broken)
                .boxed())
        }
    }

    fn nse(name: &str, url: &str) -> NetworkServiceEndpoint {
        NetworkServiceEndpoint {
            name: name.into(),
            url: url.into(),
            ..Default::default()
        }
    }

    fn found(name: &str, url: &str, deleted: bool) -> Found<NetworkServiceEndpoint> {
        Found {
            resource: nse(name, url),
            deleted,
        }
    }

    /// The next item as (name, url, deleted): the store stamps registration times.
    async fn next_found(stream: &mut FindStream<NetworkServiceEndpoint>) -> (String, String, bool) {
        let f = tokio::time::timeout(Duration::from_secs(30), stream.next())
            .await
            .expect("an item")
            .expect("the stream is open")
            .expect("the consumer sees no error");
        (f.resource.name, f.resource.url, f.deleted)
    }

    fn seen(name: &str, url: &str, deleted: bool) -> (String, String, bool) {
        (name.into(), url.into(), deleted)
    }

    async fn nothing_more(stream: &mut FindStream<NetworkServiceEndpoint>) {
        if let Ok(item) = tokio::time::timeout(Duration::from_secs(10), stream.next()).await {
            panic!("nothing more expected, got {item:?}");
        }
    }

    fn setup() -> (
        Memory<NetworkServiceEndpoint>,
        Arc<Link>,
        RegistryChain<NetworkServiceEndpoint>,
    ) {
        let store = memory::<NetworkServiceEndpoint>();
        let link = Link::new();
        let chain = RegistryChain::builder()
            .push(watch_reconnect())
            .push(link.clone())
            .push(store.clone())
            .build();
        (store, link, chain)
    }

    async fn watch_all(
        chain: &RegistryChain<NetworkServiceEndpoint>,
    ) -> FindStream<NetworkServiceEndpoint> {
        chain
            .find(
                &mut Cx::client(),
                Query {
                    template: NetworkServiceEndpoint::default(),
                    watch: true,
                },
            )
            .await
            .unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn a_broken_watch_is_found_again_and_the_consumer_gets_only_what_changed_meanwhile() {
        let (store, link, chain) = setup();
        let direct = RegistryChain::builder().push(store.clone()).build();
        let mut cx = Cx::client();
        for n in ["a", "b", "c"] {
            direct.register(&mut cx, nse(n, "tcp://x:1")).await.unwrap();
        }
        let mut stream = watch_all(&chain).await;
        let mut first = Vec::new();
        for _ in 0..3 {
            first.push(next_found(&mut stream).await);
        }
        first.sort();
        let expected: Vec<_> = ["a", "b", "c"].map(|n| seen(n, "tcp://x:1", false)).into();
        assert_eq!(first, expected);

        // The link breaks; while it is down (Finds fail, retried with backoff) one entry
        // goes away, one changes and one is added.
        link.cut();
        // The consumer waits meanwhile: its stream keeps trying.
        tokio::select! {
            item = stream.next() => panic!("nothing while the link is down, got {item:?}"),
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
        direct
            .unregister(&mut cx, nse("a", "tcp://x:1"))
            .await
            .unwrap();
        direct
            .register(&mut cx, nse("b", "tcp://x:2"))
            .await
            .unwrap();
        direct
            .register(&mut cx, nse("d", "tcp://x:1"))
            .await
            .unwrap();
        let failed_finds = link.finds.load(Ordering::SeqCst);
        assert!(
            failed_finds >= 3,
            "retried with backoff while down: {failed_finds} Finds"
        );
        link.restore();

        // Exactly the differences: no gap (the deletion), no duplicate (c again).
        assert_eq!(next_found(&mut stream).await, seen("a", "tcp://x:1", true));
        assert_eq!(next_found(&mut stream).await, seen("b", "tcp://x:2", false));
        assert_eq!(next_found(&mut stream).await, seen("d", "tcp://x:1", false));
        nothing_more(&mut stream).await;

        // The new watch streams on.
        direct
            .unregister(&mut cx, nse("c", "tcp://x:1"))
            .await
            .unwrap();
        assert_eq!(next_found(&mut stream).await, seen("c", "tcp://x:1", true));
    }

    /// Each Find yields one entry; counts the Finds.
    #[derive(Default)]
    struct Counting(AtomicUsize);

    #[async_trait]
    impl RegistryHandler<NetworkServiceEndpoint> for Arc<Counting> {
        async fn find(
            &self,
            _: &mut Cx,
            _: Query<NetworkServiceEndpoint>,
            _: RegistryNext<NetworkServiceEndpoint>,
        ) -> Result<FindStream<NetworkServiceEndpoint>> {
            self.0.fetch_add(1, Ordering::SeqCst);
            let item = Ok(found("one", "tcp://x:1", false));
            Ok(Box::pin(futures::stream::iter(vec![item])))
        }
    }

    #[tokio::test]
    async fn a_find_without_watch_passes_through_and_ends() {
        let counting = Arc::new(Counting::default());
        let chain = RegistryChain::<NetworkServiceEndpoint>::builder()
            .push(watch_reconnect())
            .push(counting.clone())
            .build();
        let all = chain
            .list(&mut Cx::client(), NetworkServiceEndpoint::default())
            .await
            .unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!(counting.0.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_first_find_that_fails_is_the_callers_error() {
        let (_store, link, chain) = setup();
        link.cut();
        let e = chain
            .find(
                &mut Cx::client(),
                Query {
                    template: NetworkServiceEndpoint::default(),
                    watch: true,
                },
            )
            .await
            .err()
            .expect("the first Find fails");
        assert_eq!(e.code(), tonic::Code::Unavailable);
    }
}
