//! `netsvc_monitor`: a connection does not stay on an endpoint that its network service
//! no longer allows (SCENARIOS 5.1 item 3).
//!
//! Where it goes: in the chain of the hop that selects endpoints, right after
//! `discover` (the forwarder here; the Go SDK has it in the manager, which selects
//! there):
//!
//! ```text
//! update_path, begin, ..., monitor, ..., discover, netsvc_monitor, round_robin, connect
//! ```
//!
//! What it does:
//! - **check**: a Request that names its endpoint (a refresh, a heal re-request, a
//!   remote hop further down) is refused with NotFound when that endpoint no longer
//!   satisfies the network service's `matches` for the connection's labels
//!   ([`match_endpoints`] applied to the endpoint's registration alone). It reads what
//!   `discover` found ([`Candidates`]), so it costs no registry call. A request that
//!   names no endpoint is not checked: `discover` only offered eligible endpoints.
//! - **watch**: after each successful Request it watches the connection's network
//!   service in the registry (Find with `watch = true`, through the hop's
//!   [`Registries`]). On every version of the service it looks the connection's
//!   endpoint up and applies the same rule. When the endpoint is no longer allowed it
//!   queues a re-request of the connection at this hop ([`ConnHandle::request_event`]):
//!   the check above refuses it, so the refresh fails, this hop's `monitor` reports the
//!   connection DOWN upstream, and the client's `heal` re-requests, is refused again and
//!   reselects (RESELECT_REQUESTED: every hop closes the old path first, and `discover`
//!   selects among the endpoints the service now allows).
//!
//! Why a re-request and not a Close: the event runs in `begin`'s order with the
//! connection's other operations and replays the *last good* request. Had the
//! client's reselect to an allowed endpoint got in first, the re-request is a harmless
//! refresh of the new path, whereas a queued Close would tear that new path down.
//!
//! State: per connection (in `begin`'s handle), the running watch (the service,
//! endpoint and labels it judges), and a generation number fencing off replaced
//! watches. The watch is a task owned by the connection: Close and the end of the hop
//! stop it.
//!
//! Failure handled: a network service changed so that the chosen endpoint is no longer
//! eligible; a watch stream that breaks or ends (the registry or the manager in front
//! of it restarted) is opened again after a backoff with jitter, and the first version
//! it sends is judged again, so a change made meanwhile is not missed. A registry that
//! matches names loosely (a regular expression, a substring) may send other services:
//! only the connection's own service is judged. A deleted service and an endpoint that
//! cannot be found are not judged (the endpoint's death is heal's business). Without a
//! `begin` before it there is nothing to own a watch: the handler only checks.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use nsm_proto::connection::Connection;
use nsm_proto::networkservice::NetworkServiceRequest;
use nsm_proto::registry::{NetworkService, NetworkServiceEndpoint};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::core::{spawn_owned, ConnHandle, Cx, Handler, Next, Side};
use crate::handlers::discover::{fmt_labels, Candidates};
use crate::registry::select::match_endpoints;
use crate::registry::{FindStream, Query, Registries};
use crate::{Error, Result};

/// Default time opening a watch or looking an endpoint up may take.
pub const DEFAULT_REGISTRY_TIMEOUT: Duration = Duration::from_secs(5);
/// Default first pause before a broken watch is opened again.
pub const DEFAULT_BACKOFF_START: Duration = Duration::from_millis(100);
/// Default longest pause before a broken watch is opened again.
pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(5);

/// See the [module docs](self).
#[derive(Clone)]
#[must_use]
pub struct NetsvcMonitor {
    registries: Registries,
    registry_timeout: Duration,
    backoff_start: Duration,
    backoff_max: Duration,
}

impl fmt::Debug for NetsvcMonitor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NetsvcMonitor")
            .field("registry_timeout", &self.registry_timeout)
            .field("backoff_start", &self.backoff_start)
            .field("backoff_max", &self.backoff_max)
            .finish_non_exhaustive()
    }
}

/// The `netsvc_monitor` handler, watching network services and looking endpoints up in
/// `registries` (the same the hop's `discover` uses).
pub fn netsvc_monitor(registries: Registries) -> NetsvcMonitor {
    NetsvcMonitor {
        registries,
        registry_timeout: DEFAULT_REGISTRY_TIMEOUT,
        backoff_start: DEFAULT_BACKOFF_START,
        backoff_max: DEFAULT_BACKOFF_MAX,
    }
}

impl NetsvcMonitor {
    /// How long opening a watch or looking an endpoint up may take (default
    /// [`DEFAULT_REGISTRY_TIMEOUT`]); a watch that cannot be opened in time counts as
    /// broken.
    pub fn registry_timeout(mut self, timeout: Duration) -> Self {
        self.registry_timeout = timeout;
        self
    }

    /// The pause before a broken watch is opened again, and the longest pause; each
    /// failure in a row doubles it, and each pause is drawn between half of it and all
    /// of it (defaults [`DEFAULT_BACKOFF_START`], [`DEFAULT_BACKOFF_MAX`]).
    pub fn backoff(mut self, start: Duration, max: Duration) -> Self {
        self.backoff_start = start.max(Duration::from_millis(1));
        self.backoff_max = max.max(self.backoff_start);
        self
    }

    /// Starts watching for `handle` what `key` says, unless a watch of the same key
    /// still runs.
    fn watch(&self, handle: &ConnHandle, key: Key) {
        let state = handle.state::<WatchState>();
        let mut inner = state.lock();
        if let Some(running) = &inner.running {
            if running.key == key && !running.task.is_finished() {
                return;
            }
        }
        inner.stop();
        let token = handle.cancel_token().child_token();
        let watch = Watch {
            monitor: self.clone(),
            handle: handle.clone(),
            key: key.clone(),
            state: state.clone(),
            generation: inner.generation,
        };
        let task = spawn_owned(token.clone(), watch.run());
        inner.running = Some(Running { key, token, task });
    }
}

/// Whether `nse` may serve a connection with `labels` under `ns`'s matches.
fn eligible(
    ns: &NetworkService,
    labels: &HashMap<String, String>,
    nse: &NetworkServiceEndpoint,
) -> bool {
    !match_endpoints(ns, labels, std::slice::from_ref(nse)).is_empty()
}

/// What a watch judges: the connection's service, its endpoint and its labels.
#[derive(Debug, Clone, PartialEq)]
struct Key {
    service: String,
    endpoint: String,
    labels: HashMap<String, String>,
}

/// Per connection: the running watch and the generation allowed to act.
#[derive(Default)]
struct WatchState(Mutex<WatchInner>);

#[derive(Default)]
struct WatchInner {
    generation: u64,
    running: Option<Running>,
}

struct Running {
    key: Key,
    token: CancellationToken,
    task: JoinHandle<()>,
}

impl WatchState {
    fn lock(&self) -> std::sync::MutexGuard<'_, WatchInner> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn is_current(&self, generation: u64) -> bool {
        self.lock().generation == generation
    }
}

impl WatchInner {
    /// Stops the running watch, if any, and fences off its acting.
    fn stop(&mut self) {
        self.generation += 1;
        if let Some(running) = self.running.take() {
            running.token.cancel();
        }
    }
}

/// One watch task of a connection.
struct Watch {
    monitor: NetsvcMonitor,
    handle: ConnHandle,
    key: Key,
    state: Arc<WatchState>,
    generation: u64,
}

impl Watch {
    fn id(&self) -> &str {
        self.handle.id()
    }

    /// A registry call context: no deadline for a watch (it lives as long as the
    /// connection), `timeout` for a lookup.
    fn registry_cx(timeout: Option<Duration>) -> Cx {
        let cx = Cx::new(Side::Client);
        match timeout {
            Some(t) => cx.with_timeout(t),
            None => cx,
        }
    }

    async fn subscribe(&self) -> Result<FindStream<NetworkService>> {
        let query = Query {
            template: NetworkService {
                name: self.key.service.clone(),
                ..Default::default()
            },
            watch: true,
        };
        let timeout = self.monitor.registry_timeout;
        let mut cx = Self::registry_cx(None);
        tokio::time::timeout(timeout, self.monitor.registries.ns.find(&mut cx, query))
            .await
            .map_err(|_| {
                Error::DeadlineExceeded(format!(
                    "opening a watch of network service {} took longer than {timeout:?}",
                    self.key.service
                ))
            })?
    }

    async fn endpoint(&self) -> Result<Option<NetworkServiceEndpoint>> {
        let template = NetworkServiceEndpoint {
            name: self.key.endpoint.clone(),
            ..Default::default()
        };
        let mut cx = Self::registry_cx(Some(self.monitor.registry_timeout));
        let found = self.monitor.registries.nse.list(&mut cx, template).await?;
        Ok(found.into_iter().find(|nse| nse.name == self.key.endpoint))
    }

    /// Whether `ns` still allows the endpoint (yes when there is nothing to judge).
    async fn allowed(&self, ns: &NetworkService) -> Result<bool> {
        let Some(nse) = self.endpoint().await? else {
            debug!(connection.id = %self.id(), endpoint = %self.key.endpoint, "netsvc_monitor: the endpoint is not registered; nothing to judge");
            return Ok(true);
        };
        Ok(eligible(ns, &self.key.labels, &nse))
    }

    async fn run(self) {
        let mut backoff = None;
        loop {
            match self.subscribe().await {
                Ok(mut versions) => loop {
                    match versions.next().await {
                        Some(Ok(found)) => {
                            if found.deleted || found.resource.name != self.key.service {
                                continue;
                            }
                            backoff = None;
                            match self.allowed(&found.resource).await {
                                Ok(true) => {}
                                Ok(false) => {
                                    if !self.excluded().await {
                                        return;
                                    }
                                }
                                Err(e) => {
                                    warn!(connection.id = %self.id(), endpoint = %self.key.endpoint, error = %e, "netsvc_monitor: cannot look the endpoint up; watching again");
                                    break;
                                }
                            }
                        }
                        Some(Err(e)) => {
                            warn!(connection.id = %self.id(), service = %self.key.service, error = %e, "netsvc_monitor: the watch broke");
                            break;
                        }
                        None => {
                            debug!(connection.id = %self.id(), service = %self.key.service, "netsvc_monitor: the watch ended");
                            break;
                        }
                    }
                },
                Err(e) => {
                    warn!(connection.id = %self.id(), service = %self.key.service, error = %e, "netsvc_monitor: cannot watch the network service");
                }
            }
            self.pause(&mut backoff).await;
        }
    }

    /// The endpoint is no longer allowed: re-request the connection, which the check
    /// refuses. Whether to go on watching (the re-request succeeded after all: the
    /// service changed back, or the connection moved meanwhile).
    async fn excluded(&self) -> bool {
        if !self.state.is_current(self.generation) {
            return false;
        }
        info!(
            connection.id = %self.id(),
            service = %self.key.service,
            endpoint = %self.key.endpoint,
            labels = %fmt_labels(&self.key.labels),
            "netsvc_monitor: the network service no longer allows the endpoint; re-requesting"
        );
        match self.handle.request_event(None).await {
            Ok(_) => true,
            Err(e) => {
                debug!(connection.id = %self.id(), error = %e, "netsvc_monitor: the re-request failed as expected; the client reselects");
                false
            }
        }
    }

    async fn pause(&self, backoff: &mut Option<Duration>) {
        let base = backoff.unwrap_or(self.monitor.backoff_start);
        *backoff = Some(base.saturating_mul(2).min(self.monitor.backoff_max));
        let pause = base.mul_f64(rand::random_range(0.5..=1.0));
        debug!(connection.id = %self.id(), ?pause, "netsvc_monitor: watching again after a pause");
        tokio::time::sleep(pause).await;
    }
}

/// The NotFound of a request whose named endpoint the service no longer allows.
fn refuse(conn: &Connection) -> Error {
    Error::not_found(format!(
        "endpoint {} no longer matches network service {} for labels {}",
        conn.network_service_endpoint_name,
        conn.network_service,
        fmt_labels(&conn.labels)
    ))
}

#[async_trait]
impl Handler for NetsvcMonitor {
    async fn request(
        &self,
        cx: &mut Cx,
        req: NetworkServiceRequest,
        next: Next,
    ) -> Result<Connection> {
        let empty = Connection::default();
        let asked = req.connection.as_ref().unwrap_or(&empty);
        let named = asked.network_service_endpoint_name.as_str();
        if !named.is_empty() {
            let candidates = cx.ext().get::<Candidates>();
            let nse = candidates.and_then(|c| c.nses.iter().find(|n| n.name == named));
            if let (Some(c), Some(nse)) = (candidates, nse) {
                if !eligible(&c.ns, &asked.labels, nse) {
                    let e = refuse(asked);
                    warn!(connection.id = %asked.id, error = %e, "netsvc_monitor: request refused");
                    return Err(e);
                }
            }
        }
        // What selection judged: the labels of the request.
        let labels = cx.conn().map(|_| asked.labels.clone());
        let conn = next.request(cx, req).await?;
        if let (Some(handle), Some(labels)) = (cx.conn(), labels) {
            if !conn.network_service_endpoint_name.is_empty() {
                self.watch(
                    handle,
                    Key {
                        service: conn.network_service.clone(),
                        endpoint: conn.network_service_endpoint_name.clone(),
                        labels,
                    },
                );
            }
        }
        Ok(conn)
    }

    async fn close(&self, cx: &mut Cx, conn: Connection, next: Next) -> Result<()> {
        if let Some(state) = cx.conn().and_then(|h| h.get_state::<WatchState>()) {
            state.lock().stop();
        }
        next.close(cx, conn).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::Chain;
    use crate::handlers::begin::Begin;
    use crate::handlers::{discover, monitor, round_robin, update_path, Monitor};
    use crate::registry::{memory, Memory, RegistryChain, RegistryHandler, RegistryNext};
    use nsm_proto::connection::State;
    use nsm_proto::registry::{Destination, Match, NetworkServiceLabels};
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// The end of the chain: counts what reaches the endpoint.
    #[derive(Clone, Default)]
    struct Endpoint {
        requests: Arc<Mutex<Vec<String>>>,
        closes: Arc<AtomicUsize>,
    }

    #[async_trait]
    impl Handler for Endpoint {
        async fn request(
            &self,
            cx: &mut Cx,
            req: NetworkServiceRequest,
            next: Next,
        ) -> Result<Connection> {
            let name = req
                .connection
                .as_ref()
                .map(|c| c.network_service_endpoint_name.clone())
                .unwrap_or_default();
            self.requests.lock().unwrap().push(name);
            next.request(cx, req).await
        }
        async fn close(&self, cx: &mut Cx, conn: Connection, next: Next) -> Result<()> {
            self.closes.fetch_add(1, Ordering::SeqCst);
            next.close(cx, conn).await
        }
    }

    impl Endpoint {
        fn requests(&self) -> Vec<String> {
            self.requests.lock().unwrap().clone()
        }
        fn closes(&self) -> usize {
            self.closes.load(Ordering::SeqCst)
        }
    }

    /// In front of the service store: a registry that matches names loosely (every
    /// service for any name) and whose first watch ends after its first answer.
    #[derive(Clone, Default)]
    struct Front {
        loose: bool,
        break_first: bool,
        watches: Arc<AtomicUsize>,
    }

    #[async_trait]
    impl RegistryHandler<NetworkService> for Front {
        async fn find(
            &self,
            cx: &mut Cx,
            mut query: Query<NetworkService>,
            next: RegistryNext<NetworkService>,
        ) -> Result<FindStream<NetworkService>> {
            if self.loose {
                query.template.name.clear();
            }
            let watch = query.watch;
            let stream = next.find(cx, query).await?;
            if watch && self.watches.fetch_add(1, Ordering::SeqCst) == 0 && self.break_first {
                return Ok(stream.take(1).boxed());
            }
            Ok(stream)
        }
    }

    /// A forwarder-like hop: monitor, discover, netsvc_monitor, round_robin, endpoint.
    struct Hop {
        chain: Chain,
        monitor: Monitor,
        services: Memory<NetworkService>,
        registries: Registries,
        endpoint: Endpoint,
        front: Front,
        root: CancellationToken,
    }

    fn hop(front: Front) -> Hop {
        let services = memory::<NetworkService>();
        let registries = Registries {
            ns: RegistryChain::builder()
                .push(front.clone())
                .push(services.clone())
                .build(),
            nse: RegistryChain::builder()
                .push(memory::<NetworkServiceEndpoint>())
                .build(),
        };
        let monitor = monitor();
        let endpoint = Endpoint::default();
        let root = CancellationToken::new();
        let chain = Chain::builder()
            .push(update_path("fwd"))
            .push(Begin::new(root.clone(), Duration::from_secs(5)))
            .push(monitor.clone())
            .push(discover(registries.clone()))
            .push(
                netsvc_monitor(registries.clone())
                    .backoff(Duration::from_millis(10), Duration::from_millis(50)),
            )
            .push(round_robin())
            .push(endpoint.clone())
            .build();
        Hop {
            chain,
            monitor,
            services,
            registries,
            endpoint,
            front,
            root,
        }
    }

    fn service(name: &str, matches: Vec<Match>) -> NetworkService {
        NetworkService {
            name: name.into(),
            payload: "IP".into(),
            matches,
            ..Default::default()
        }
    }

    /// A match that allows only the endpoints labelled `experimental=<value>`.
    fn only_experimental(value: &str) -> Vec<Match> {
        vec![Match {
            routes: vec![Destination {
                destination_selector: [("experimental".to_string(), value.to_string())].into(),
                ..Default::default()
            }],
            ..Default::default()
        }]
    }

    fn endpoint(name: &str, services: &[&str], labels: &[(&str, &str)]) -> NetworkServiceEndpoint {
        let labels = NetworkServiceLabels {
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        NetworkServiceEndpoint {
            name: name.into(),
            network_service_names: services.iter().map(|s| s.to_string()).collect(),
            network_service_labels: services
                .iter()
                .map(|s| (s.to_string(), labels.clone()))
                .collect(),
            url: format!("inmem://{name}"),
            ..Default::default()
        }
    }

    impl Hop {
        async fn put_service(&self, ns: NetworkService) {
            self.registries
                .ns
                .register(&mut Cx::client(), ns)
                .await
                .unwrap();
        }
        async fn put_endpoint(&self, nse: NetworkServiceEndpoint) {
            self.registries
                .nse
                .register(&mut Cx::client(), nse)
                .await
                .unwrap();
        }
        fn state(&self, id: &str) -> Option<i32> {
            self.monitor.get(id).map(|c| c.state)
        }
    }

    fn request(service: &str, endpoint: &str) -> NetworkServiceRequest {
        NetworkServiceRequest {
            connection: Some(Connection {
                id: "conn".into(),
                network_service: service.into(),
                network_service_endpoint_name: endpoint.into(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn reselect(conn: &Connection) -> NetworkServiceRequest {
        let mut c = conn.clone();
        c.network_service_endpoint_name.clear();
        c.state = State::ReselectRequested as i32;
        NetworkServiceRequest {
            connection: Some(c),
            ..Default::default()
        }
    }

    async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !check() {
            assert!(tokio::time::Instant::now() < deadline, "{what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Two endpoints, the connection on nse-1 (registered alone first).
    async fn connected(hop: &Hop) -> Connection {
        hop.put_service(service("svc", vec![])).await;
        hop.put_endpoint(endpoint("nse-1", &["svc"], &[])).await;
        let conn = hop
            .chain
            .request(&mut Cx::server(), request("svc", ""))
            .await
            .unwrap();
        assert_eq!(conn.network_service_endpoint_name, "nse-1");
        hop.put_endpoint(endpoint("nse-2", &["svc"], &[("experimental", "true")]))
            .await;
        eventually("the hop watches the service", || {
            hop.services.watchers() == 1
        })
        .await;
        conn
    }

    #[tokio::test(start_paused = true)]
    async fn a_service_change_that_excludes_the_endpoint_reports_the_connection_down() {
        let hop = hop(Front::default());
        let conn = connected(&hop).await;
        hop.put_service(service("svc", only_experimental("true")))
            .await;
        eventually("the connection is reported DOWN", || {
            hop.state(&conn.id) == Some(State::Down as i32)
        })
        .await;
        assert_eq!(
            hop.endpoint.requests(),
            ["nse-1"],
            "the re-request was refused before it reached the endpoint"
        );
        assert_eq!(
            hop.endpoint.closes(),
            0,
            "the client decides: nothing closed yet"
        );

        // The client's heal reselects: the old path is closed, nse-2 is selected.
        let moved = hop
            .chain
            .request(&mut Cx::server(), reselect(&conn))
            .await
            .unwrap();
        assert_eq!(moved.network_service_endpoint_name, "nse-2");
        assert_eq!(hop.endpoint.closes(), 1);
        assert_eq!(hop.state(&conn.id), Some(State::Up as i32));

        // The watch follows the new endpoint: excluding it is noticed again.
        hop.put_service(service("svc", only_experimental("false")))
            .await;
        eventually("the moved connection is reported DOWN", || {
            hop.state(&conn.id) == Some(State::Down as i32)
        })
        .await;
        assert_eq!(hop.endpoint.requests(), ["nse-1", "nse-2"]);
        hop.chain.close(&mut Cx::server(), moved).await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_naming_an_excluded_endpoint_is_not_found() {
        let hop = hop(Front::default());
        hop.put_service(service("svc", only_experimental("true")))
            .await;
        hop.put_endpoint(endpoint("nse-1", &["svc"], &[])).await;
        let err = hop
            .chain
            .request(&mut Cx::server(), request("svc", "nse-1"))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::NotFound, "{err}");
        assert!(err.to_string().contains("no longer matches"), "{err}");
        assert!(hop.endpoint.requests().is_empty());
        // An allowed endpoint named by the request goes through.
        hop.put_endpoint(endpoint("nse-2", &["svc"], &[("experimental", "true")]))
            .await;
        let conn = hop
            .chain
            .request(&mut Cx::server(), request("svc", "nse-2"))
            .await
            .unwrap();
        assert_eq!(conn.network_service_endpoint_name, "nse-2");
    }

    #[tokio::test(start_paused = true)]
    async fn a_change_that_keeps_the_endpoint_allowed_does_nothing() {
        let hop = hop(Front::default());
        let conn = connected(&hop).await;
        // Still allowed: a route that every endpoint satisfies.
        hop.put_service(service(
            "svc",
            vec![Match {
                routes: vec![Destination::default()],
                ..Default::default()
            }],
        ))
        .await;
        // The watch judges versions in order: once the excluding one is acted on, the
        // allowing one was judged before.
        hop.put_service(service("svc", only_experimental("true")))
            .await;
        eventually("the connection is reported DOWN", || {
            hop.state(&conn.id) == Some(State::Down as i32)
        })
        .await;
        assert_eq!(
            hop.endpoint.requests(),
            ["nse-1"],
            "the allowing version caused no re-request"
        );
    }

    /// SCENARIOS 5.10 "netsvcmonitor: groups of similar NSs".
    #[tokio::test(start_paused = true)]
    async fn a_similarly_named_service_is_not_judged() {
        let hop = hop(Front {
            loose: true,
            ..Default::default()
        });
        let conn = connected(&hop).await;
        hop.put_service(service("svc-2", only_experimental("true")))
            .await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(hop.state(&conn.id), Some(State::Up as i32));
        assert_eq!(hop.endpoint.requests(), ["nse-1"]);
        // The watch was alive all along.
        hop.put_service(service("svc", only_experimental("true")))
            .await;
        eventually("the connection is reported DOWN", || {
            hop.state(&conn.id) == Some(State::Down as i32)
        })
        .await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_broken_watch_is_opened_again_and_misses_nothing() {
        let hop = hop(Front {
            break_first: true,
            ..Default::default()
        });
        let conn = connected(&hop).await;
        eventually("watching again", || {
            hop.front.watches.load(Ordering::SeqCst) >= 2 && hop.services.watchers() == 1
        })
        .await;
        hop.put_service(service("svc", only_experimental("true")))
            .await;
        eventually("the connection is reported DOWN", || {
            hop.state(&conn.id) == Some(State::Down as i32)
        })
        .await;
    }

    /// SCENARIOS 5.10 "netsvcmonitor: no leak without Close".
    #[tokio::test(start_paused = true)]
    async fn the_watch_ends_with_the_connection_and_with_the_hop() {
        let hop = hop(Front::default());
        let conn = connected(&hop).await;
        hop.chain.close(&mut Cx::server(), conn).await.unwrap();
        eventually("the watch ended with Close", || {
            hop.services.watchers() == 0
        })
        .await;

        hop.chain
            .request(&mut Cx::server(), request("svc", ""))
            .await
            .unwrap();
        eventually("watching again", || hop.services.watchers() == 1).await;
        hop.root.cancel();
        eventually("the watch ended with the hop", || {
            hop.services.watchers() == 0
        })
        .await;
    }
}
