//! `watch_reconnect`: a registry client's watching Find survives a broken stream.
//!
//! What it does: for a Find with `watch = true`, it returns a stream that, when the
//! stream from the rest of the chain fails or ends (the registry restarted, the
//! connection broke), issues the same Find again through the rest of the chain, with
//! backoff, and goes on streaming. The new stream starts with the current matches, so
//! a consumer sees every entry again (as updates) and misses no change for long. A Find
//! without `watch`, Register and Unregister pass through.
//!
//! State: none of its own; each reconnecting stream holds the rest of the chain and the
//! query until the consumer drops it.
//!
//! Failure handled: the first Find failing is returned to the caller as is; later
//! failures are retried after a [`Backoff`] of 100 ms doubling to 5 s, never in a tight
//! loop.

use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;

use super::{FindStream, Query, RegistryHandler, RegistryNext, Resource};
use crate::core::rt::Backoff;
use crate::core::Cx;
use crate::Result;

const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// See the [module docs](self).
#[derive(Debug, Clone, Copy, Default)]
pub struct WatchReconnect;

/// The `watch_reconnect` registry handler.
pub fn watch_reconnect() -> WatchReconnect {
    WatchReconnect
}

struct Reconnecting<R: Resource> {
    current: Option<FindStream<R>>,
    next: RegistryNext<R>,
    query: Query<R>,
    cx: Cx,
    backoff: Backoff,
    /// Failed Finds in a row: the next pause's attempt.
    failures: u32,
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
                    if let Some(stream) = s.current.as_mut() {
                        match stream.next().await {
                            Some(Ok(item)) => return Some((Ok(item), s)),
                            Some(Err(e)) => {
                                tracing::debug!(kind = R::KIND, error = %e, "watch broke; finding again");
                            }
                            None => tracing::debug!(kind = R::KIND, "watch ended; finding again"),
                        }
                        s.current = None;
                    }
                    tokio::time::sleep(s.backoff.wait(s.failures)).await;
                    match s.next.clone().find(&mut s.cx, s.query.clone()).await {
                        Ok(stream) => {
                            s.current = Some(stream);
                            s.failures = 0;
                        }
                        Err(e) => {
                            tracing::debug!(kind = R::KIND, error = %e, "finding again failed");
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
    use crate::registry::{Found, RegistryChain};
    use crate::Error;
    use nsm_proto::registry::NetworkServiceEndpoint;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    /// Each watching Find yields one entry named after the attempt, then breaks (odd
    /// attempts end with an error, even ones just end); the 3rd Find fails outright.
    #[derive(Default)]
    struct Flaky(AtomicUsize);

    #[async_trait]
    impl RegistryHandler<NetworkServiceEndpoint> for Arc<Flaky> {
        async fn find(
            &self,
            _: &mut Cx,
            _: Query<NetworkServiceEndpoint>,
            _: RegistryNext<NetworkServiceEndpoint>,
        ) -> Result<FindStream<NetworkServiceEndpoint>> {
            let n = self.0.fetch_add(1, Ordering::SeqCst);
            if n == 2 {
                return Err(Error::unavailable("registry down"));
            }
            let item = Ok(Found {
                resource: NetworkServiceEndpoint {
                    name: format!("attempt-{n}"),
                    ..Default::default()
                },
                deleted: false,
            });
            let end: Vec<Result<Found<NetworkServiceEndpoint>>> = if n % 2 == 1 {
                vec![item, Err(Error::unavailable("stream broke"))]
            } else {
                vec![item]
            };
            Ok(Box::pin(futures::stream::iter(end)))
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_broken_watch_is_found_again_and_the_consumer_sees_no_error() {
        let flaky = Arc::new(Flaky::default());
        let chain = RegistryChain::<NetworkServiceEndpoint>::builder()
            .push(watch_reconnect())
            .push(flaky.clone())
            .build();
        let mut stream = chain
            .find(
                &mut Cx::client(),
                Query {
                    template: NetworkServiceEndpoint::default(),
                    watch: true,
                },
            )
            .await
            .unwrap();
        let mut names = Vec::new();
        for _ in 0..3 {
            names.push(stream.next().await.unwrap().unwrap().resource.name);
        }
        // attempt-2 failed outright and was retried after a backoff.
        assert_eq!(names, ["attempt-0", "attempt-1", "attempt-3"]);
        assert_eq!(flaky.0.load(Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn a_find_without_watch_passes_through_and_ends() {
        let flaky = Arc::new(Flaky::default());
        let chain = RegistryChain::<NetworkServiceEndpoint>::builder()
            .push(watch_reconnect())
            .push(flaky.clone())
            .build();
        let all = chain
            .list(&mut Cx::client(), NetworkServiceEndpoint::default())
            .await
            .unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!(flaky.0.load(Ordering::SeqCst), 1);
    }
}
