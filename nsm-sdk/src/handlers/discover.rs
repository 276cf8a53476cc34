//! `discover`: finds the network service and the endpoints that may serve a request.
//!
//! What it does (server side, in the forwarder): on Request it looks the network service
//! up by name and then either
//! - the endpoint the connection names (`network_service_endpoint_name`, set on a
//!   refresh, or by the previous forwarder of a remote path): it must still be
//!   registered, serve the service and not be expired; or
//! - every registered, unexpired endpoint of the service, narrowed by the service's
//!   `matches` against the connection labels ([`match_endpoints`]).
//!
//! It puts the result in [`Cx::ext`] as [`Candidates`] for a selector (`round_robin`)
//! further down the chain. On Close of a connection that names its endpoint it looks
//! that endpoint up (so the selector knows where to send the Close) unless the
//! connection already remembers where its endpoint is; the Close goes on either way.
//!
//! State: none.
//!
//! Failure handled: a request without a service is InvalidArgument; an unknown service,
//! a named endpoint that is gone (heal then reselects) or no matching endpoint is
//! NotFound; a registry failure is returned as is on Request, and only logged on Close
//! (Close must reach downstream even when the registry is dead).

use std::time::SystemTime;

use async_trait::async_trait;
use nsm_proto::connection::Connection;
use nsm_proto::networkservice::NetworkServiceRequest;
use nsm_proto::registry::{NetworkService, NetworkServiceEndpoint};
use tracing::{debug, warn};

use crate::core::{Cx, Handler, Next};
use crate::handlers::selection::{fmt_labels, registry_cx, Candidates, SelectedEndpoint};
use crate::registry::select::{is_expired, match_endpoints};
use crate::registry::Registries;
use crate::{Error, Result};

/// See the [module docs](self).
#[derive(Debug, Clone)]
#[must_use]
pub struct Discover {
    registries: Registries,
}

/// The `discover` handler, looking services and endpoints up in `registries`.
pub fn discover(registries: Registries) -> Discover {
    Discover { registries }
}

impl Discover {
    async fn find_ns(&self, cx: &Cx, name: &str) -> Result<Option<NetworkService>> {
        let template = NetworkService {
            name: name.to_string(),
            ..Default::default()
        };
        let found = self
            .registries
            .ns
            .list(&mut registry_cx(cx), template)
            .await?;
        Ok(found.into_iter().find(|ns| ns.name == name))
    }

    async fn find_nse(&self, cx: &Cx, name: &str) -> Result<Option<NetworkServiceEndpoint>> {
        let template = NetworkServiceEndpoint {
            name: name.to_string(),
            ..Default::default()
        };
        let found = self
            .registries
            .nse
            .list(&mut registry_cx(cx), template)
            .await?;
        Ok(found.into_iter().find(|nse| nse.name == name))
    }

    async fn find_nses(&self, cx: &Cx, service: &str) -> Result<Vec<NetworkServiceEndpoint>> {
        let template = NetworkServiceEndpoint {
            network_service_names: vec![service.to_string()],
            ..Default::default()
        };
        self.registries
            .nse
            .list(&mut registry_cx(cx), template)
            .await
    }

    async fn candidates(&self, cx: &Cx, conn: &Connection) -> Result<Candidates> {
        let service = conn.network_service.as_str();
        if service.is_empty() {
            return Err(Error::invalid("the request names no network service"));
        }
        // Endpoints may serve a service nobody registered (or that a restarted registry
        // lost): it then behaves as one without matches. Only a service with neither a
        // registration nor an endpoint is unknown.
        let registered_ns = self.find_ns(cx, service).await?;
        let known = registered_ns.is_some();
        let ns = registered_ns.unwrap_or_else(|| NetworkService {
            name: service.to_string(),
            payload: "IP".into(),
            ..Default::default()
        });
        let unknown = || Error::not_found(format!("network service {service} not found"));
        let now = SystemTime::now();
        let serves = |nse: &NetworkServiceEndpoint| {
            nse.network_service_names.iter().any(|s| s == service) && !is_expired(nse, now)
        };
        let named = conn.network_service_endpoint_name.as_str();
        if !named.is_empty() {
            return match self.find_nse(cx, named).await? {
                Some(nse) if serves(&nse) => Ok(Candidates { ns, nses: vec![nse] }),
                _ if !known => Err(unknown()),
                _ => Err(Error::not_found(format!(
                    "endpoint {named} of network service {service} is gone (unregistered, expired or no longer serving it)"
                ))),
            };
        }
        let registered: Vec<_> = self
            .find_nses(cx, service)
            .await?
            .into_iter()
            .filter(|nse| serves(nse))
            .collect();
        if registered.is_empty() && !known {
            return Err(unknown());
        }
        let nses = match_endpoints(&ns, &conn.labels, &registered);
        if nses.is_empty() {
            return Err(Error::not_found(format!(
                "no endpoint for network service {service} (labels {}; {} registered and unexpired)",
                fmt_labels(&conn.labels),
                registered.len()
            )));
        }
        Ok(Candidates { ns, nses })
    }
}

#[async_trait]
impl Handler for Discover {
    async fn request(
        &self,
        cx: &mut Cx,
        req: NetworkServiceRequest,
        next: Next,
    ) -> Result<Connection> {
        let candidates = match req.connection.as_ref() {
            Some(conn) => self.candidates(cx, conn).await?,
            None => self.candidates(cx, &Connection::default()).await?,
        };
        debug!(
            service = %candidates.ns.name,
            candidates = ?candidates.nses.iter().map(|n| n.name.as_str()).collect::<Vec<_>>(),
            "discovered endpoints"
        );
        cx.ext_mut().insert(candidates);
        next.request(cx, req).await
    }

    async fn close(&self, cx: &mut Cx, conn: Connection, next: Next) -> Result<()> {
        let name = conn.network_service_endpoint_name.as_str();
        let known = cx
            .conn()
            .and_then(|c| c.get_state::<SelectedEndpoint>())
            .is_some_and(|s| s.knows(name));
        if !name.is_empty() && !known {
            match self.find_nse(cx, name).await {
                Ok(Some(nse)) => {
                    let ns = NetworkService {
                        name: conn.network_service.clone(),
                        ..Default::default()
                    };
                    cx.ext_mut().insert(Candidates {
                        ns,
                        nses: vec![nse],
                    });
                }
                Ok(None) => debug!(endpoint = %name, "endpoint is gone; closing downstream anyway"),
                Err(e) => {
                    warn!(endpoint = %name, error = %e, "registry lookup failed; closing downstream anyway")
                }
            }
        }
        next.close(cx, conn).await
    }
}

/// Test scaffolding shared by the selection handlers: a Vec-backed registry and a
/// downstream that records where calls went and fails for chosen URLs.
#[cfg(test)]
pub(crate) mod test_support {
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    use async_trait::async_trait;
    use nsm_proto::connection::{Connection, Path, PathSegment};
    use nsm_proto::networkservice::NetworkServiceRequest;
    use nsm_proto::registry::{NetworkService, NetworkServiceEndpoint, NetworkServiceLabels};

    use crate::core::{Cx, Handler, Next};
    use crate::registry::{
        FindStream, Found, Query, Registries, RegistryChain, RegistryHandler, RegistryNext,
    };
    use crate::transport::ClientUrl;
    use crate::{Error, Result};

    /// A registry over two Vecs that can be switched off.
    #[derive(Default)]
    pub(crate) struct FakeRegistry {
        ns: Mutex<Vec<NetworkService>>,
        nse: Mutex<Vec<NetworkServiceEndpoint>>,
        down: AtomicBool,
        finds: AtomicUsize,
    }

    impl FakeRegistry {
        pub(crate) fn new() -> Arc<Self> {
            Arc::default()
        }
        pub(crate) fn put_ns(&self, ns: NetworkService) {
            let mut all = self.ns.lock().unwrap();
            all.retain(|n| n.name != ns.name);
            all.push(ns);
        }
        pub(crate) fn put_nse(&self, nse: NetworkServiceEndpoint) {
            let mut all = self.nse.lock().unwrap();
            all.retain(|n| n.name != nse.name);
            all.push(nse);
        }
        pub(crate) fn remove_nse(&self, name: &str) {
            self.nse.lock().unwrap().retain(|n| n.name != name);
        }
        pub(crate) fn set_down(&self, down: bool) {
            self.down.store(down, Ordering::SeqCst);
        }
        pub(crate) fn finds(&self) -> usize {
            self.finds.load(Ordering::SeqCst)
        }
        pub(crate) fn registries(self: &Arc<Self>) -> Registries {
            Registries {
                ns: RegistryChain::builder().push(NsFront(self.clone())).build(),
                nse: RegistryChain::builder()
                    .push(NseFront(self.clone()))
                    .build(),
            }
        }
        /// Counts a Find and answers it with the entries of `all` that `keep` lets
        /// through, or fails while the registry is down.
        fn find<R: Clone + Send + 'static>(
            &self,
            all: &Mutex<Vec<R>>,
            keep: impl Fn(&R) -> bool,
        ) -> Result<FindStream<R>> {
            self.finds.fetch_add(1, Ordering::SeqCst);
            if self.down.load(Ordering::SeqCst) {
                return Err(Error::unavailable("registry is down"));
            }
            let found: Vec<R> = all
                .lock()
                .unwrap()
                .iter()
                .filter(|r| keep(r))
                .cloned()
                .collect();
            Ok(stream(found))
        }
    }

    fn stream<R: Send + 'static>(items: Vec<R>) -> FindStream<R> {
        Box::pin(futures::stream::iter(items.into_iter().map(|resource| {
            Ok(Found {
                resource,
                deleted: false,
            })
        })))
    }

    struct NsFront(Arc<FakeRegistry>);
    struct NseFront(Arc<FakeRegistry>);

    #[async_trait]
    impl RegistryHandler<NetworkService> for NsFront {
        async fn find(
            &self,
            _: &mut Cx,
            q: Query<NetworkService>,
            _: RegistryNext<NetworkService>,
        ) -> Result<FindStream<NetworkService>> {
            let t = q.template;
            self.0
                .find(&self.0.ns, |n| t.name.is_empty() || n.name == t.name)
        }
    }

    #[async_trait]
    impl RegistryHandler<NetworkServiceEndpoint> for NseFront {
        async fn find(
            &self,
            _: &mut Cx,
            q: Query<NetworkServiceEndpoint>,
            _: RegistryNext<NetworkServiceEndpoint>,
        ) -> Result<FindStream<NetworkServiceEndpoint>> {
            let t = q.template;
            self.0.find(&self.0.nse, |n| {
                (t.name.is_empty() || n.name == t.name)
                    && t.network_service_names
                        .iter()
                        .all(|s| n.network_service_names.contains(s))
                    && n.url.contains(&t.url)
            })
        }
    }

    pub(crate) fn labels(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    pub(crate) fn nse(
        name: &str,
        service: &str,
        url: &str,
        l: &[(&str, &str)],
    ) -> NetworkServiceEndpoint {
        NetworkServiceEndpoint {
            name: name.into(),
            network_service_names: vec![service.into()],
            network_service_labels: HashMap::from([(
                service.to_string(),
                NetworkServiceLabels { labels: labels(l) },
            )]),
            url: url.into(),
            ..Default::default()
        }
    }

    pub(crate) fn ns(name: &str) -> NetworkService {
        NetworkService {
            name: name.into(),
            ..Default::default()
        }
    }

    /// A first request from an NSC for `service`: one path segment `nsc` with id `id`.
    pub(crate) fn request(id: &str, service: &str, l: &[(&str, &str)]) -> NetworkServiceRequest {
        NetworkServiceRequest {
            connection: Some(Connection {
                id: id.into(),
                network_service: service.into(),
                labels: labels(l),
                path: Some(Path {
                    index: 0,
                    path_segments: vec![PathSegment {
                        name: "nsc".into(),
                        id: id.into(),
                        ..Default::default()
                    }],
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// The next hop: records `request <url> <nse>` / `close <url> <nse>`, fails for the
    /// URLs it was told to, and on success appends the segment of the hop listening at
    /// that URL (as a real next hop's `update_path` would).
    #[derive(Default)]
    pub(crate) struct Downstream {
        log: Mutex<Vec<String>>,
        fail: Mutex<HashMap<String, Error>>,
        hops: Mutex<HashMap<String, String>>,
    }

    impl Downstream {
        pub(crate) fn new() -> Arc<Self> {
            Arc::default()
        }
        pub(crate) fn fail(&self, url: &str, e: Error) {
            self.fail.lock().unwrap().insert(url.into(), e);
        }
        pub(crate) fn heal(&self, url: &str) {
            self.fail.lock().unwrap().remove(url);
        }
        pub(crate) fn hop(&self, url: &str, name: &str) {
            self.hops.lock().unwrap().insert(url.into(), name.into());
        }
        pub(crate) fn take(&self) -> Vec<String> {
            std::mem::take(&mut *self.log.lock().unwrap())
        }
    }

    fn url_of(cx: &Cx) -> String {
        cx.ext()
            .get::<ClientUrl>()
            .map_or_else(|| "-".to_string(), |u| u.0.to_string())
    }

    #[async_trait]
    impl Handler for Downstream {
        async fn request(
            &self,
            cx: &mut Cx,
            req: NetworkServiceRequest,
            _: Next,
        ) -> Result<Connection> {
            let url = url_of(cx);
            let mut conn = req.connection.unwrap_or_default();
            self.log.lock().unwrap().push(format!(
                "request {url} {}",
                conn.network_service_endpoint_name
            ));
            if let Some(e) = self.fail.lock().unwrap().get(&url) {
                return Err(e.clone());
            }
            if let Some(hop) = self.hops.lock().unwrap().get(&url) {
                let path = conn.path.get_or_insert_with(Default::default);
                let at = path.index as usize + 1;
                path.path_segments.truncate(at);
                path.path_segments.push(PathSegment {
                    name: hop.clone(),
                    id: format!("{hop}-id"),
                    ..Default::default()
                });
            }
            Ok(conn)
        }

        async fn close(&self, cx: &mut Cx, conn: Connection, _: Next) -> Result<()> {
            let url = url_of(cx);
            self.log.lock().unwrap().push(format!(
                "close {url} {}",
                conn.network_service_endpoint_name
            ));
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::test_support::*;
    use super::*;
    use crate::core::Chain;
    use nsm_proto::registry::{Destination, Match};

    /// Puts the candidates it sees into the connection's labels, so tests can read them.
    struct Peek;

    #[async_trait]
    impl Handler for Peek {
        async fn request(
            &self,
            cx: &mut Cx,
            mut req: NetworkServiceRequest,
            next: Next,
        ) -> Result<Connection> {
            let names = cx.ext().get::<Candidates>().map_or("-".to_string(), |c| {
                c.nses
                    .iter()
                    .map(|n| n.name.as_str())
                    .collect::<Vec<_>>()
                    .join(",")
            });
            req.connection
                .get_or_insert_with(Default::default)
                .labels
                .insert("candidates".into(), names);
            next.request(cx, req).await
        }
        async fn close(&self, cx: &mut Cx, conn: Connection, next: Next) -> Result<()> {
            let names = cx.ext().get::<Candidates>().map_or("-".to_string(), |c| {
                c.nses
                    .iter()
                    .map(|n| n.url.as_str())
                    .collect::<Vec<_>>()
                    .join(",")
            });
            let mut conn = conn;
            conn.payload = names;
            if conn.payload != "-" {
                return Err(Error::internal(conn.payload));
            }
            next.close(cx, conn).await
        }
    }

    fn chain(reg: &Arc<FakeRegistry>) -> Chain {
        Chain::builder()
            .push(discover(reg.registries()))
            .push(Peek)
            .build()
    }

    async fn candidates_of(reg: &Arc<FakeRegistry>, req: NetworkServiceRequest) -> Result<String> {
        let conn = chain(reg).request(&mut Cx::server(), req).await?;
        Ok(conn.labels["candidates"].clone())
    }

    fn registry_with_three() -> Arc<FakeRegistry> {
        let reg = FakeRegistry::new();
        reg.put_ns(ns("svc"));
        reg.put_nse(nse("a", "svc", "inmem://a", &[("nodeName", "node-1")]));
        reg.put_nse(nse("b", "svc", "inmem://b", &[("nodeName", "node-2")]));
        reg.put_nse(nse("c", "other", "inmem://c", &[]));
        reg
    }

    #[tokio::test]
    async fn a_request_without_a_service_is_an_invalid_argument() {
        let reg = registry_with_three();
        let e = candidates_of(&reg, request("x", "", &[]))
            .await
            .unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
        let e = chain(&reg)
            .request(&mut Cx::server(), NetworkServiceRequest::default())
            .await
            .unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
    }

    #[tokio::test]
    async fn an_unknown_service_is_not_found() {
        let reg = registry_with_three();
        let e = candidates_of(&reg, request("x", "nope", &[]))
            .await
            .unwrap_err();
        assert!(
            matches!(&e, Error::NotFound(m) if m.contains("network service nope not found")),
            "{e}"
        );
    }

    #[tokio::test]
    async fn every_endpoint_of_the_service_is_a_candidate_without_matches() {
        let reg = registry_with_three();
        assert_eq!(
            candidates_of(&reg, request("x", "svc", &[])).await.unwrap(),
            "a,b"
        );
    }

    #[tokio::test]
    async fn expired_endpoints_are_skipped() {
        let reg = registry_with_three();
        let mut old = nse("b", "svc", "inmem://b", &[]);
        old.expiration_time = Some((SystemTime::now() - Duration::from_secs(5)).into());
        reg.put_nse(old);
        let mut fresh = nse("d", "svc", "inmem://d", &[]);
        fresh.expiration_time = Some((SystemTime::now() + Duration::from_secs(60)).into());
        reg.put_nse(fresh);
        assert_eq!(
            candidates_of(&reg, request("x", "svc", &[])).await.unwrap(),
            "a,d"
        );
    }

    #[tokio::test]
    async fn label_templates_pick_the_endpoint_on_the_clients_node() {
        let reg = registry_with_three();
        reg.put_ns(NetworkService {
            name: "svc".into(),
            matches: vec![Match {
                routes: vec![Destination {
                    destination_selector: labels(&[("nodeName", "{{.nodeName}}")]),
                    weight: 0,
                }],
                ..Default::default()
            }],
            ..Default::default()
        });
        let got = candidates_of(&reg, request("x", "svc", &[("nodeName", "node-2")])).await;
        assert_eq!(got.unwrap(), "b");
        let e = candidates_of(&reg, request("x", "svc", &[("nodeName", "node-9")]))
            .await
            .unwrap_err();
        assert!(
            matches!(&e, Error::NotFound(m) if m.contains("no endpoint for network service svc") && m.contains("nodeName=node-9")),
            "{e}"
        );
    }

    #[tokio::test]
    async fn a_named_endpoint_is_the_only_candidate_while_it_lasts() {
        let reg = registry_with_three();
        let mut req = request("x", "svc", &[]);
        req.connection
            .as_mut()
            .unwrap()
            .network_service_endpoint_name = "b".into();
        assert_eq!(candidates_of(&reg, req.clone()).await.unwrap(), "b");

        // Serving another service does not count.
        let mut other = req.clone();
        other
            .connection
            .as_mut()
            .unwrap()
            .network_service_endpoint_name = "c".into();
        assert!(matches!(
            candidates_of(&reg, other).await,
            Err(Error::NotFound(_))
        ));

        reg.remove_nse("b");
        let e = candidates_of(&reg, req).await.unwrap_err();
        assert!(
            matches!(&e, Error::NotFound(m) if m.contains("endpoint b")),
            "{e}"
        );
    }

    #[tokio::test]
    async fn a_registry_failure_on_request_is_returned() {
        let reg = registry_with_three();
        reg.set_down(true);
        let e = candidates_of(&reg, request("x", "svc", &[]))
            .await
            .unwrap_err();
        assert!(matches!(e, Error::Unavailable(_)), "{e}");
    }

    #[tokio::test]
    async fn close_finds_the_named_endpoint_and_goes_on_when_the_registry_is_dead() {
        let reg = registry_with_three();
        let conn = Connection {
            network_service: "svc".into(),
            network_service_endpoint_name: "b".into(),
            ..Default::default()
        };
        // Peek fails a Close carrying candidates, reporting their URLs.
        let e = chain(&reg)
            .close(&mut Cx::server(), conn.clone())
            .await
            .unwrap_err();
        assert!(matches!(&e, Error::Internal(m) if m == "inmem://b"), "{e}");

        reg.set_down(true);
        chain(&reg)
            .close(&mut Cx::server(), conn.clone())
            .await
            .unwrap();
        reg.set_down(false);
        reg.remove_nse("b");
        chain(&reg).close(&mut Cx::server(), conn).await.unwrap();
    }
}
