//! The registry client edge: [`grpc_registry`], the registry handler that ends a
//! registry client chain by calling a remote registry (one URL, or several replicas
//! failing over), for network services and endpoints alike.

use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::future::BoxFuture;
use futures::stream::StreamExt;
use nsm_proto::registry::network_service_endpoint_registry_client::NetworkServiceEndpointRegistryClient;
use nsm_proto::registry::network_service_registry_client::NetworkServiceRegistryClient;
use nsm_proto::registry::{
    NetworkService, NetworkServiceEndpoint, NetworkServiceEndpointQuery,
    NetworkServiceEndpointResponse, NetworkServiceQuery, NetworkServiceResponse,
};
use tonic::codec::Streaming;
use tonic::transport::Channel;
use tonic::{Code, Status};

use super::channels::{answer, from_status, outgoing, Channels};
use crate::core::url::{RegistryUrls, Url};
use crate::core::Cx;
use crate::registry::{
    FindStream, Found, Query, Registries, RegistryChain, RegistryHandler, RegistryNext, Resource,
};
use crate::{Error, Result};

/// How long one replica may take to answer when another is left to try
/// ([`GrpcRegistry::try_timeout`]).
pub const DEFAULT_TRY_TIMEOUT: Duration = Duration::from_millis(500);

/// How long a watching Find may stay silent before its replica is asked whether it is
/// alive ([`GrpcRegistry::probe_after`]).
pub const DEFAULT_PROBE_AFTER: Duration = Duration::from_secs(2);

/// The name a liveness probe looks for: a Find by name, one key in any store.
const PROBE_NAME: &str = "nsm-registry-liveness-probe";

/// See [`grpc_registry`].
pub struct GrpcRegistry<R> {
    channels: Channels,
    urls: RegistryUrls,
    /// The index of the URL calls go to: it moves on when that URL is unavailable and
    /// stays on the one that answers (shared by clones).
    current: Arc<AtomicUsize>,
    try_timeout: Duration,
    probe_after: Duration,
    _resource: PhantomData<fn() -> R>,
}

impl<R> Clone for GrpcRegistry<R> {
    fn clone(&self) -> Self {
        GrpcRegistry {
            channels: self.channels.clone(),
            urls: self.urls.clone(),
            current: self.current.clone(),
            try_timeout: self.try_timeout,
            probe_after: self.probe_after,
            _resource: PhantomData,
        }
    }
}

impl<R: Resource> fmt::Debug for GrpcRegistry<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GrpcRegistry")
            .field("kind", &R::KIND)
            .field("urls", &self.urls.to_string())
            .field("current", &self.current_url())
            .finish()
    }
}

/// The registry handler at the end of a registry client chain: sends Register, Find and
/// Unregister to the registry at `urls` (a [`Url`] or a [`RegistryUrls`] list of
/// replicas) and answers with its replies (it does not call `next`). A handler for both
/// `NetworkService` and `NetworkServiceEndpoint`.
///
/// Find streams the registry's responses as [`Found`] items; a response without its
/// resource is an [`Error::InvalidArgument`] item. Errors map as for [`grpc_client`](super::grpc_client).
///
/// Several replicas: each call goes to the current URL (the first at start); a call that
/// fails with Unavailable (connection refused or broken, or the replica's own store
/// unavailable) is sent again to the next URL, and so on once around the list within the
/// caller's deadline, so no call fails because one replica died while another answers.
/// The URL that answered stays current. A Find stream that breaks with Unavailable moves
/// the current URL on too, so the watching Find that
/// [`watch_reconnect`](crate::registry::watch_reconnect) opens again goes to the next
/// replica. Register and Unregister are idempotent per name, so one sent again after a
/// replica died with it unanswered does no harm.
///
/// A replica that hangs (accepts connections, never answers: a stopped process, a
/// stuck store) is left too. With another URL to try, each try is bounded by the
/// [`try_timeout`](GrpcRegistry::try_timeout) (default [`DEFAULT_TRY_TIMEOUT`]; the
/// last try of the round has the caller's whole deadline), and a try that ends with
/// DeadlineExceeded or Cancelled before the caller's deadline counts as Unavailable.
/// This bounds opening a watching Find too. A watching Find that stays silent is
/// normal, so silence alone proves nothing: after
/// [`probe_after`](GrpcRegistry::probe_after) (default [`DEFAULT_PROBE_AFTER`]) without
/// an item, the replica of the stream is **probed** with a Find by a name nobody
/// registers, bounded by the try timeout; a probe that is not answered (DeadlineExceeded
/// or Unavailable) ends the stream with Unavailable and moves the current URL on, so
/// `watch_reconnect` opens the watch again on the next replica. The probe is an
/// ordinary call, so it works against any registry (no HTTP/2 keepalive policy to
/// agree on) and also catches a replica whose process runs but whose store is stuck. A
/// hung watch is so noticed within `probe_after + try_timeout` (2.5 s by default). With
/// one URL there is nowhere to go: tries have the caller's deadline and watches are
/// not probed.
///
/// A call that timed out on a hung replica may still be carried out when that replica
/// wakes (its grpc-timeout counts from when it reads the call): a late Register is
/// then overwritten by the next refresh, or lapses with its expiration.
pub fn grpc_registry<R: Resource>(
    channels: Channels,
    urls: impl Into<RegistryUrls>,
) -> GrpcRegistry<R> {
    GrpcRegistry {
        channels,
        urls: urls.into(),
        current: Arc::new(AtomicUsize::new(0)),
        try_timeout: DEFAULT_TRY_TIMEOUT,
        probe_after: DEFAULT_PROBE_AFTER,
        _resource: PhantomData,
    }
}

/// Both registries at `urls` ([`grpc_registry`] for network services and endpoints):
/// a plain client of a registry, with nothing in front.
pub fn grpc_registries(channels: Channels, urls: impl Into<RegistryUrls>) -> Registries {
    let urls = urls.into();
    Registries {
        ns: RegistryChain::builder()
            .push(grpc_registry(channels.clone(), urls.clone()))
            .build(),
        nse: RegistryChain::builder()
            .push(grpc_registry(channels, urls))
            .build(),
    }
}

impl<R: Resource> GrpcRegistry<R> {
    /// How long one replica may take to answer while another is left to try (see
    /// [`grpc_registry`]); also the bound of a watch's liveness probe.
    #[must_use]
    pub fn try_timeout(mut self, timeout: Duration) -> Self {
        self.try_timeout = timeout;
        self
    }

    /// How long a watching Find may stay silent before its replica is probed (see
    /// [`grpc_registry`]).
    #[must_use]
    pub fn probe_after(mut self, after: Duration) -> Self {
        self.probe_after = after;
        self
    }

    /// The URL calls go to now.
    pub fn current_url(&self) -> &Url {
        let urls = self.urls.urls();
        &urls[self.current.load(Ordering::Relaxed) % urls.len()]
    }

    /// Runs `call` against the current URL, then against each next one while the answer
    /// is Unavailable (or a try's own deadline passed); returns the answer with the
    /// index of the URL that gave it.
    async fn each_url<T, F, Fut>(&self, cx: &Cx, what: &str, mut call: F) -> Result<(usize, T)>
    where
        F: FnMut(Url, Cx) -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let urls = self.urls.urls();
        let start = self.current.load(Ordering::Relaxed) % urls.len();
        let mut last = None;
        for step in 0..urls.len() {
            let i = (start + step) % urls.len();
            let mut try_cx = cx.clone();
            if step + 1 < urls.len() {
                let bound = tokio::time::Instant::now() + self.try_timeout;
                try_cx.set_deadline(Some(cx.deadline().map_or(bound, |d| d.min(bound))));
            }
            match call(urls[i].clone(), try_cx).await {
                Ok(v) => {
                    self.current.store(i, Ordering::Relaxed);
                    return Ok((i, v));
                }
                Err(e) if urls.len() > 1 && replica_failed(&e, cx) => {
                    moved_from(&self.current, i, urls.len());
                    tracing::warn!(
                        kind = R::KIND,
                        call = what,
                        url = %urls[i],
                        error = %e,
                        "registry replica unavailable; trying the next one"
                    );
                    last = Some(e);
                    if cx.remaining().is_some_and(|left| left.is_zero()) {
                        break;
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| Error::unavailable(format!("{what}: no registry answered"))))
    }
}

/// Whether `e`, the answer of one replica to a call of `cx`, says that replica is not
/// serving: Unavailable, or out of time while the caller still has some (the try's own
/// bound passed, or the replica gave up).
fn replica_failed(e: &Error, cx: &Cx) -> bool {
    match e.code() {
        Code::Unavailable => true,
        Code::DeadlineExceeded | Code::Cancelled => {
            cx.remaining().is_none_or(|left| !left.is_zero())
        }
        _ => false,
    }
}

/// Moves the current URL past `failed`, unless another call moved it already (two calls
/// failing together must not skip the replica after it).
fn moved_from(current: &AtomicUsize, failed: usize, len: usize) {
    let _ = current.compare_exchange(
        failed,
        (failed + 1) % len,
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
}

/// Binds a resource to its generated gRPC client and messages.
trait RegistryWire: Resource {
    type Query: Clone + Send + 'static;
    type Response: Send + 'static;
    const SERVICE: &'static str;
    fn query(q: Query<Self>) -> Self::Query;
    fn found(r: Self::Response) -> (Option<Self>, bool);
    fn register(
        ch: Channel,
        r: tonic::Request<Self>,
    ) -> BoxFuture<'static, Result<tonic::Response<Self>, Status>>;
    #[allow(clippy::type_complexity)]
    fn find(
        ch: Channel,
        q: tonic::Request<Self::Query>,
    ) -> BoxFuture<'static, Result<tonic::Response<Streaming<Self::Response>>, Status>>;
    fn unregister(
        ch: Channel,
        r: tonic::Request<Self>,
    ) -> BoxFuture<'static, Result<tonic::Response<()>, Status>>;
}

/// Binds one resource to its generated client and messages: the two impls differ only
/// in names, so one macro writes both.
macro_rules! registry_wire {
    ($r:ty, $query:ident, $response:ident, $field:ident, $client:ident, $service:literal) => {
        impl RegistryWire for $r {
            type Query = $query;
            type Response = $response;
            const SERVICE: &'static str = $service;
            fn query(q: Query<Self>) -> $query {
                $query {
                    $field: Some(q.template),
                    watch: q.watch,
                }
            }
            fn found(r: $response) -> (Option<Self>, bool) {
                (r.$field, r.deleted)
            }
            fn register(
                ch: Channel,
                r: tonic::Request<Self>,
            ) -> BoxFuture<'static, Result<tonic::Response<Self>, Status>> {
                Box::pin(async move { sized!($client::new(ch)).register(r).await })
            }
            fn find(
                ch: Channel,
                q: tonic::Request<$query>,
            ) -> BoxFuture<'static, Result<tonic::Response<Streaming<$response>>, Status>> {
                Box::pin(async move { sized!($client::new(ch)).find(q).await })
            }
            fn unregister(
                ch: Channel,
                r: tonic::Request<Self>,
            ) -> BoxFuture<'static, Result<tonic::Response<()>, Status>> {
                Box::pin(async move { sized!($client::new(ch)).unregister(r).await })
            }
        }
    };
}

registry_wire!(
    NetworkService,
    NetworkServiceQuery,
    NetworkServiceResponse,
    network_service,
    NetworkServiceRegistryClient,
    "NetworkServiceRegistry"
);
registry_wire!(
    NetworkServiceEndpoint,
    NetworkServiceEndpointQuery,
    NetworkServiceEndpointResponse,
    network_service_endpoint,
    NetworkServiceEndpointRegistryClient,
    "NetworkServiceEndpointRegistry"
);

/// A gRPC call of one resource's client.
type Call<M, T> =
    fn(Channel, tonic::Request<M>) -> BoxFuture<'static, Result<tonic::Response<T>, Status>>;

/// Sends `msg` with `call` to the current URL, then to each next one while unavailable.
async fn call_each<R: RegistryWire, M: Clone, T>(
    reg: &GrpcRegistry<R>,
    cx: &Cx,
    what: &str,
    msg: M,
    call: Call<M, T>,
) -> Result<(usize, T)> {
    reg.each_url(cx, what, |url, cx| {
        let sent = reg
            .channels
            .channel(&url)
            .and_then(|ch| Ok((ch, outgoing(&cx, &url, what, msg.clone())?)));
        async move {
            let (channel, request) = sent?;
            answer(&cx, &url, what, call(channel, request)).await
        }
    })
    .await
}

/// Whether the replica at `url` answers a Find by a name nobody registers within the
/// try timeout; Err when it does not (an answer that is an error other than
/// Unavailable or DeadlineExceeded still proves it alive).
async fn alive<R: RegistryWire>(reg: GrpcRegistry<R>, url: Url) -> Result<()> {
    let cx = Cx::client().with_timeout(reg.try_timeout);
    let what = format!("{}/Find (liveness probe)", R::SERVICE);
    let mut template = R::default();
    template.set_name(PROBE_NAME.to_string());
    let query = R::query(Query {
        template,
        watch: false,
    });
    let probe = async {
        let channel = reg.channels.channel(&url)?;
        let request = outgoing(&cx, &url, &what, query)?;
        let mut items = answer(&cx, &url, &what, R::find(channel, request)).await?;
        while let Some(item) = items.next().await {
            item.map_err(|s| from_status(&url, s))?;
        }
        Ok(())
    };
    let out = tokio::time::timeout(reg.try_timeout, probe)
        .await
        .unwrap_or_else(|_| {
            Err(Error::DeadlineExceeded(format!(
                "{what} to {url}: no answer within {:?}",
                reg.try_timeout
            )))
        });
    match out {
        Err(e) if replica_failed(&e, &Cx::client()) => Err(e),
        _ => Ok(()),
    }
}

/// A watching Find's `items` from the replica at `index`, which is probed
/// ([`alive`]) whenever the stream stays silent for `probe_after`: a replica that does
/// not answer ends the stream with Unavailable and is left.
fn probed<R: RegistryWire>(
    reg: GrpcRegistry<R>,
    index: usize,
    items: FindStream<R>,
) -> FindStream<R> {
    let url = reg.urls.urls()[index].clone();
    let state = Some((items, reg, url));
    futures::stream::unfold(state, move |state| async move {
        let (mut items, reg, url) = state?;
        loop {
            tokio::select! {
                item = items.next() => return item.map(|i| (i, Some((items, reg, url)))),
                () = tokio::time::sleep(reg.probe_after) => {}
            }
            let probe = alive(reg.clone(), url.clone());
            tokio::pin!(probe);
            tokio::select! {
                item = items.next() => return item.map(|i| (i, Some((items, reg, url)))),
                answered = &mut probe => {
                    if let Err(e) = answered {
                        moved_from(&reg.current, index, reg.urls.urls().len());
                        tracing::warn!(
                            kind = R::KIND,
                            url = %url,
                            error = %e,
                            "registry replica of a watch does not answer; leaving it"
                        );
                        let e = Error::unavailable(format!(
                            "the watch's registry replica {url} does not answer: {e}"
                        ));
                        return Some((Err(e), None));
                    }
                }
            }
        }
    })
    .boxed()
}

async fn registry_register<R: RegistryWire>(reg: &GrpcRegistry<R>, cx: &Cx, r: R) -> Result<R> {
    let what = format!("{}/Register", R::SERVICE);
    Ok(call_each(reg, cx, &what, r, R::register).await?.1)
}

async fn registry_find<R: RegistryWire>(
    reg: &GrpcRegistry<R>,
    cx: &Cx,
    query: Query<R>,
) -> Result<FindStream<R>> {
    let what = format!("{}/Find", R::SERVICE);
    let watch = query.watch;
    let (index, responses) = call_each(reg, cx, &what, R::query(query), R::find).await?;
    let urls = reg.urls.urls();
    let url = urls[index].clone();
    let (current, len) = (reg.current.clone(), urls.len());
    let items = responses
        .map(move |item| match item {
            Ok(resp) => match R::found(resp) {
                (Some(resource), deleted) => Ok(Found { resource, deleted }),
                (None, _) => Err(Error::invalid(format!(
                    "a Find response from {url} has no {}",
                    R::KIND
                ))),
            },
            Err(s) => {
                let e = from_status(&url, s);
                if e.code() == Code::Unavailable && len > 1 {
                    // The replica of this stream went away: the Find opened again
                    // goes to the next one.
                    moved_from(&current, index, len);
                }
                Err(e)
            }
        })
        .boxed();
    Ok(if watch && len > 1 {
        probed(reg.clone(), index, items)
    } else {
        items
    })
}

async fn registry_unregister<R: RegistryWire>(reg: &GrpcRegistry<R>, cx: &Cx, r: R) -> Result<()> {
    let what = format!("{}/Unregister", R::SERVICE);
    call_each(reg, cx, &what, r, R::unregister)
        .await
        .map(|_| ())
}

/// The handler of one resource: the gRPC calls are written once, generic over
/// [`RegistryWire`]; the impl is per resource because `RegistryWire` is private.
macro_rules! grpc_registry_handler {
    ($r:ty) => {
        #[async_trait]
        impl RegistryHandler<$r> for GrpcRegistry<$r> {
            async fn register(&self, cx: &mut Cx, r: $r, _next: RegistryNext<$r>) -> Result<$r> {
                registry_register(self, cx, r).await
            }
            async fn find(
                &self,
                cx: &mut Cx,
                query: Query<$r>,
                _next: RegistryNext<$r>,
            ) -> Result<FindStream<$r>> {
                registry_find(self, cx, query).await
            }
            async fn unregister(&self, cx: &mut Cx, r: $r, _next: RegistryNext<$r>) -> Result<()> {
                registry_unregister(self, cx, r).await
            }
        }
    };
}

grpc_registry_handler!(NetworkService);
grpc_registry_handler!(NetworkServiceEndpoint);

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::registry::{memory, watch_reconnect, Memory, RegistryChain};
    use crate::transport::{serve, Server, Services};

    fn nse(name: &str) -> NetworkServiceEndpoint {
        NetworkServiceEndpoint {
            name: name.into(),
            network_service_names: vec!["svc".into()],
            url: format!("tcp://{name}:1"),
            ..Default::default()
        }
    }

    fn cx() -> Cx {
        Cx::client().with_timeout(Duration::from_secs(5))
    }

    /// A replica that stops answering when told to: its calls never return, its Find
    /// streams go silent (as a SIGSTOPped process, seen from the client).
    #[derive(Clone, Default)]
    struct Hang(Arc<std::sync::atomic::AtomicBool>);

    impl Hang {
        fn now(&self) {
            self.0.store(true, Ordering::SeqCst);
        }
        async fn check(&self) {
            if self.0.load(Ordering::SeqCst) {
                futures::future::pending::<()>().await;
            }
        }
    }

    #[async_trait]
    impl RegistryHandler<NetworkServiceEndpoint> for Hang {
        async fn register(
            &self,
            cx: &mut Cx,
            r: NetworkServiceEndpoint,
            next: RegistryNext<NetworkServiceEndpoint>,
        ) -> Result<NetworkServiceEndpoint> {
            self.check().await;
            next.register(cx, r).await
        }
        async fn find(
            &self,
            cx: &mut Cx,
            query: Query<NetworkServiceEndpoint>,
            next: RegistryNext<NetworkServiceEndpoint>,
        ) -> Result<FindStream<NetworkServiceEndpoint>> {
            self.check().await;
            let hung = self.0.clone();
            let items = next.find(cx, query).await?;
            Ok(items
                .filter(move |_| std::future::ready(!hung.load(Ordering::SeqCst)))
                .boxed())
        }
        async fn unregister(
            &self,
            cx: &mut Cx,
            r: NetworkServiceEndpoint,
            next: RegistryNext<NetworkServiceEndpoint>,
        ) -> Result<()> {
            self.check().await;
            next.unregister(cx, r).await
        }
    }

    /// Two replicas of one registry: two servers over one shared store, as two
    /// `nsm-registry` processes over one etcd; the first one hangs when its [`Hang`] is
    /// told.
    async fn replicas() -> (Memory<NetworkServiceEndpoint>, Hang, Server, Server) {
        let store = memory::<NetworkServiceEndpoint>();
        let hang = Hang::default();
        let mut servers = Vec::new();
        for first in [true, false] {
            let url = Url::Memory(format!("replica-{}", uuid::Uuid::new_v4()));
            let mut chain = RegistryChain::builder();
            if first {
                chain = chain.push(hang.clone());
            }
            let chain = chain.push(store.clone()).build();
            servers.push(
                serve(&url, Services::new().nse_registry(chain))
                    .await
                    .unwrap(),
            );
        }
        let b = servers.pop().unwrap();
        let a = servers.pop().unwrap();
        (store, hang, a, b)
    }

    /// A watching Find of every endpoint through `chain`.
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

    #[tokio::test]
    async fn a_call_to_a_hung_replica_moves_on_after_the_try_timeout() {
        let (_store, hang, a, b) = replicas().await;
        let client = grpc_registry::<NetworkServiceEndpoint>(Channels::new(), both(&a, &b))
            .try_timeout(Duration::from_millis(200));
        let chain = RegistryChain::builder().push(client.clone()).build();
        chain.register(&mut cx(), nse("nse-1")).await.unwrap();
        assert_eq!(client.current_url(), a.url());

        hang.now();
        let started = std::time::Instant::now();
        chain.register(&mut cx(), nse("nse-2")).await.unwrap();
        let took = started.elapsed();
        assert_eq!(client.current_url(), b.url());
        assert!(
            took >= Duration::from_millis(200) && took < Duration::from_secs(2),
            "{took:?}: the try timeout, not the caller's 5 s deadline"
        );
        // B is current now: the next call does not wait for A.
        let started = std::time::Instant::now();
        chain.unregister(&mut cx(), nse("nse-1")).await.unwrap();
        assert!(started.elapsed() < Duration::from_millis(200));
    }

    #[tokio::test]
    async fn with_one_url_a_slow_registry_has_the_whole_deadline() {
        let (_store, hang, a, _b) = replicas().await;
        let client = grpc_registry::<NetworkServiceEndpoint>(Channels::new(), a.url().clone())
            .try_timeout(Duration::from_millis(100));
        let chain = RegistryChain::builder().push(client).build();
        hang.now();
        let started = std::time::Instant::now();
        let e = chain
            .register(
                &mut Cx::client().with_timeout(Duration::from_millis(600)),
                nse("nse-1"),
            )
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::DeadlineExceeded, "{e}");
        assert!(started.elapsed() >= Duration::from_millis(550));
    }

    #[tokio::test]
    async fn a_watch_on_a_replica_that_hangs_is_probed_and_reopened_on_the_next() {
        let (_store, hang, a, b) = replicas().await;
        let client = grpc_registry::<NetworkServiceEndpoint>(Channels::new(), both(&a, &b))
            .try_timeout(Duration::from_millis(200))
            .probe_after(Duration::from_millis(300));
        let chain = RegistryChain::builder()
            .push(watch_reconnect())
            .push(client.clone())
            .build();
        let mut watch = watch_all(&chain).await;
        // Silent for longer than probe_after while A answers: the probe keeps it.
        tokio::time::sleep(Duration::from_millis(800)).await;
        assert_eq!(
            client.current_url(),
            a.url(),
            "an answering replica is kept"
        );
        chain.register(&mut cx(), nse("nse-1")).await.unwrap();
        assert_eq!(next(&mut watch).await.resource.name, "nse-1");

        hang.now();
        // Straight through B, so that only the probe can notice A hangs.
        let through_b = RegistryChain::builder()
            .push(grpc_registry::<NetworkServiceEndpoint>(
                Channels::new(),
                b.url().clone(),
            ))
            .build();
        through_b.register(&mut cx(), nse("nse-2")).await.unwrap();
        let started = std::time::Instant::now();
        let seen = next(&mut watch).await;
        assert_eq!(
            (seen.resource.name.as_str(), seen.deleted),
            ("nse-2", false)
        );
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(client.current_url(), b.url());
        through_b.unregister(&mut cx(), nse("nse-1")).await.unwrap();
        let seen = next(&mut watch).await;
        assert_eq!((seen.resource.name.as_str(), seen.deleted), ("nse-1", true));
    }

    fn both(a: &Server, b: &Server) -> RegistryUrls {
        RegistryUrls::new([a.url().clone(), b.url().clone()]).unwrap()
    }

    #[tokio::test]
    async fn calls_move_to_the_next_replica_when_the_current_one_dies() {
        let (store, _hang, a, b) = replicas().await;
        let client = grpc_registry::<NetworkServiceEndpoint>(Channels::new(), both(&a, &b));
        let chain = RegistryChain::builder().push(client.clone()).build();
        chain.register(&mut cx(), nse("nse-1")).await.unwrap();
        assert_eq!(client.current_url(), a.url());

        a.kill();
        // Register, Find and Unregister each succeed: none fails because A died.
        chain.register(&mut cx(), nse("nse-2")).await.unwrap();
        assert_eq!(
            client.current_url(),
            b.url(),
            "B answered: it stays current"
        );
        let mut names: Vec<String> = chain
            .list(&mut cx(), NetworkServiceEndpoint::default())
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.name)
            .collect();
        names.sort();
        assert_eq!(names, ["nse-1", "nse-2"]);
        chain.unregister(&mut cx(), nse("nse-1")).await.unwrap();
        let left = RegistryChain::builder()
            .push(store)
            .build()
            .list(&mut cx(), NetworkServiceEndpoint::default())
            .await
            .unwrap();
        let left: Vec<&str> = left.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(left, ["nse-2"]);
    }

    #[tokio::test]
    async fn with_every_replica_dead_a_call_fails_unavailable_after_trying_each_once() {
        let (_store, _hang, a, b) = replicas().await;
        let client = grpc_registry::<NetworkServiceEndpoint>(Channels::new(), both(&a, &b));
        let chain = RegistryChain::builder().push(client.clone()).build();
        a.kill();
        b.kill();
        let e = chain.register(&mut cx(), nse("nse-1")).await.unwrap_err();
        assert_eq!(e.code(), Code::Unavailable, "{e}");
        // Once around: back at A, which is tried first when it comes back.
        assert_eq!(client.current_url(), a.url());
    }

    #[tokio::test]
    async fn an_answer_that_is_not_unavailable_is_not_sent_to_another_replica() {
        let (_store, _hang, a, b) = replicas().await;
        let client = grpc_registry::<NetworkServiceEndpoint>(Channels::new(), both(&a, &b));
        let chain = RegistryChain::builder().push(client.clone()).build();
        let bad = NetworkServiceEndpoint {
            name: "x".repeat(10_000),
            ..Default::default()
        };
        let e = chain.register(&mut cx(), bad).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e}");
        assert_eq!(client.current_url(), a.url());
    }

    async fn next(w: &mut FindStream<NetworkServiceEndpoint>) -> Found<NetworkServiceEndpoint> {
        tokio::time::timeout(Duration::from_secs(3), w.next())
            .await
            .expect("an item within 3 s")
            .expect("the watch is open")
            .expect("no error reaches the watcher")
    }

    #[tokio::test]
    async fn a_watch_broken_by_a_dead_replica_reopens_on_the_next_one() {
        let (_store, _hang, a, b) = replicas().await;
        let client = grpc_registry::<NetworkServiceEndpoint>(Channels::new(), both(&a, &b));
        let chain = RegistryChain::builder()
            .push(watch_reconnect())
            .push(client.clone())
            .build();
        let mut watch = watch_all(&chain).await;
        chain.register(&mut cx(), nse("nse-1")).await.unwrap();
        assert_eq!(next(&mut watch).await.resource.name, "nse-1");

        a.kill();
        chain.register(&mut cx(), nse("nse-2")).await.unwrap();
        let seen = next(&mut watch).await;
        assert_eq!(
            (seen.resource.name.as_str(), seen.deleted),
            ("nse-2", false)
        );
        assert_eq!(client.current_url(), b.url());
        chain.unregister(&mut cx(), nse("nse-1")).await.unwrap();
        let seen = next(&mut watch).await;
        assert_eq!((seen.resource.name.as_str(), seen.deleted), ("nse-1", true));
    }
}
