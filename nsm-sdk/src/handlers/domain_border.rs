//! `domain_border`: the nsmgr-proxy's choice of the next hop for a Request that crosses
//! its domain's border, in or out.
//!
//! What it does with a request for endpoint `name@D` (the forwarder that selected it
//! names it; this domain is `own`):
//! - `D` is `own` (it comes in from another domain): `@own` is stripped from the
//!   endpoint and network service names, the endpoint is looked up by its local name
//!   in this domain's registry, and the request goes to the URL it is registered with
//!   (its node's manager). On the way back the names get `@own` again, so the caller
//!   sees the names it sent; the endpoint never sees `@own`.
//! - else, the full name is looked up through this domain's registry (which asks its
//!   registry proxy): an endpoint that this domain registered into a floating registry
//!   comes back with its manager's URL, and the request goes there, names unchanged
//!   (it comes in from another domain, for one of ours). An endpoint handed out at one
//!   of this proxy's own URLs (its public one, or one its domain's forwarders reach it
//!   at: [`DomainBorder::internal_urls`]) is another domain's and goes on below.
//! - otherwise the request goes out: to `D`'s nsmgr-proxy found by DNS
//!   (`nsmgr-proxy.nsm-system.<D>`), or, when `D` has none (a floating domain), to the
//!   URL `D`'s registry holds for the endpoint (the nsmgr-proxy of the domain that
//!   registered it).
//!
//! It puts the URL in [`Cx::ext`] as [`ClientUrl`] for `connect`.
//!
//! State: per connection, the route chosen by the last successful Request (URL and
//! whether names were stripped), so a Close goes the same way without lookups.
//!
//! Failure handled: a request that names no endpoint is InvalidArgument (the
//! forwarder before the border selects it); an endpoint that cannot be found here, or
//! a domain without DNS records, is NotFound; an unreachable DNS server or registry
//! is Unavailable. A Close whose route cannot be found is passed on without a URL
//! (logged), as other selectors do.

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use nsm_proto::connection::Connection;
use nsm_proto::networkservice::NetworkServiceRequest;
use nsm_proto::registry::NetworkServiceEndpoint;
use tracing::{debug, warn};

use crate::config::interdomain::{add, split, strip, target};
use crate::core::{Cx, Handler, Next};
use crate::handlers::selection::registry_cx;
use crate::registry::{Registries, RemoteRegistries};
use crate::transport::{ClientUrl, DomainResolver, Url};
use crate::{Error, Result};

/// See the [module docs](self).
#[derive(Clone)]
#[must_use]
pub struct DomainBorder {
    own: String,
    public_url: String,
    internal_urls: Vec<String>,
    registries: Registries,
    dns: DomainResolver,
    remote: Arc<dyn RemoteRegistries>,
}

impl std::fmt::Debug for DomainBorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DomainBorder")
            .field("own", &self.own)
            .field("public_url", &self.public_url)
            .finish()
    }
}

/// The `domain_border` handler of domain `own`, whose nsmgr-proxy other domains reach
/// at `public_url`; `registries` is this domain's registry (with its registry proxy
/// behind it), `dns` finds other domains' nsmgr-proxies and `remote` their registries.
pub fn domain_border(
    own: impl Into<String>,
    public_url: &Url,
    registries: Registries,
    dns: DomainResolver,
    remote: Arc<dyn RemoteRegistries>,
) -> DomainBorder {
    DomainBorder {
        own: own.into(),
        public_url: public_url.to_string(),
        internal_urls: Vec::new(),
        registries,
        dns,
        remote,
    }
}

impl DomainBorder {
    /// The other URLs this proxy is reached at inside its domain (e.g. a unix socket
    /// its forwarders dial, which the registry proxy hands out for other domains'
    /// endpoints): an endpoint found at one of them is not one of ours.
    pub fn internal_urls(mut self, urls: &[Url]) -> Self {
        self.internal_urls = urls.iter().map(Url::to_string).collect();
        self
    }

    fn is_own_url(&self, url: &str) -> bool {
        url == self.public_url || self.internal_urls.iter().any(|u| u == url)
    }
}

/// Where a connection goes.
#[derive(Debug, Clone, PartialEq)]
struct Route {
    url: Url,
    /// The connection came in: `@own` is stripped on the way down.
    strip: bool,
}

#[derive(Default)]
struct ChosenRoute(Mutex<Option<Route>>);

fn by_name(name: &str) -> NetworkServiceEndpoint {
    NetworkServiceEndpoint {
        name: name.to_string(),
        ..Default::default()
    }
}

fn parse_url(nse: &NetworkServiceEndpoint) -> Result<Url> {
    nse.url
        .parse()
        .map_err(|e| Error::not_found(format!("endpoint {} has no usable URL: {e}", nse.name)))
}

impl DomainBorder {
    async fn lookup(
        &self,
        cx: &Cx,
        registries: &Registries,
        name: &str,
    ) -> Result<Option<NetworkServiceEndpoint>> {
        let found = registries
            .nse
            .list(&mut registry_cx(cx), by_name(name))
            .await?;
        Ok(found.into_iter().find(|n| n.name == name))
    }

    async fn route(&self, cx: &Cx, name: &str) -> Result<Route> {
        let Some((_, domain)) = split(name) else {
            return Err(Error::invalid(format!(
                "endpoint {name} names no domain: an nsmgr-proxy only routes name@domain"
            )));
        };
        if domain == self.own {
            let local = target(name);
            let nse = self
                .lookup(cx, &self.registries, local)
                .await?
                .ok_or_else(|| {
                    Error::not_found(format!("endpoint {local} is not registered in {domain}"))
                })?;
            return Ok(Route {
                url: parse_url(&nse)?,
                strip: true,
            });
        }
        if let Some(nse) = self.lookup(cx, &self.registries, name).await? {
            if !self.is_own_url(&nse.url) {
                return Ok(Route {
                    url: parse_url(&nse)?,
                    strip: false,
                });
            }
        }
        match self.dns.nsmgr_proxy_url(domain).await {
            Ok(url) => Ok(Route { url, strip: false }),
            Err(e) if e.code() == tonic::Code::NotFound => {
                // A floating domain: no nsmgr-proxy of its own, its registry knows the
                // border of the domain that registered the endpoint.
                let remote = self.remote.registries(domain).await?;
                let nse = self
                    .lookup(cx, &remote, target(name))
                    .await?
                    .ok_or_else(|| {
                        Error::not_found(format!(
                            "{e}; and {domain}'s registry has no endpoint {}",
                            target(name)
                        ))
                    })?;
                Ok(Route {
                    url: parse_url(&nse)?,
                    strip: false,
                })
            }
            Err(e) => Err(e),
        }
    }

    fn rewrite(&self, conn: &mut Connection) {
        conn.network_service = strip(&conn.network_service, &self.own);
        conn.network_service_endpoint_name = strip(&conn.network_service_endpoint_name, &self.own);
    }

    fn restore(&self, conn: &mut Connection) {
        conn.network_service = add(&conn.network_service, &self.own);
        conn.network_service_endpoint_name = add(&conn.network_service_endpoint_name, &self.own);
    }
}

#[async_trait]
impl Handler for DomainBorder {
    async fn request(
        &self,
        cx: &mut Cx,
        mut req: NetworkServiceRequest,
        next: Next,
    ) -> Result<Connection> {
        let name = req
            .connection
            .as_ref()
            .map(|c| c.network_service_endpoint_name.clone())
            .unwrap_or_default();
        if name.is_empty() {
            return Err(Error::invalid(
                "the request names no endpoint: an nsmgr-proxy needs the endpoint the forwarder selected",
            ));
        }
        let route = self.route(cx, &name).await?;
        debug!(endpoint = %name, url = %route.url, inbound = route.strip, "border route");
        if route.strip {
            if let Some(conn) = req.connection.as_mut() {
                self.rewrite(conn);
            }
        }
        cx.ext_mut().insert(ClientUrl(route.url.clone()));
        let mut conn = next.request(cx, req).await?;
        if route.strip {
            self.restore(&mut conn);
        }
        if let Some(h) = cx.conn() {
            *h.state::<ChosenRoute>()
                .0
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = Some(route);
        }
        Ok(conn)
    }

    async fn close(&self, cx: &mut Cx, mut conn: Connection, next: Next) -> Result<()> {
        let remembered = cx.conn().and_then(|h| {
            h.get_state::<ChosenRoute>()
                .and_then(|s| s.0.lock().unwrap_or_else(|p| p.into_inner()).clone())
        });
        let route = match remembered {
            Some(r) => Some(r),
            None => match self.route(cx, &conn.network_service_endpoint_name).await {
                Ok(r) => Some(r),
                Err(e) => {
                    warn!(endpoint = %conn.network_service_endpoint_name, error = %e, "no route for Close; closing downstream without one");
                    None
                }
            },
        };
        if let Some(route) = route {
            if route.strip {
                self.rewrite(&mut conn);
            }
            cx.ext_mut().insert(ClientUrl(route.url));
        }
        next.close(cx, conn).await
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::core::Chain;
    use crate::handlers::begin;
    use crate::registry::registry_proxy::test_support::{store, Domains};

    /// Records the URL and names each call arrived with.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<(String, String, String)>>>);

    #[async_trait]
    impl Handler for Sink {
        async fn request(
            &self,
            cx: &mut Cx,
            req: NetworkServiceRequest,
            _: Next,
        ) -> Result<Connection> {
            let conn = req.connection.unwrap_or_default();
            self.record(cx, &conn);
            Ok(conn)
        }
        async fn close(&self, cx: &mut Cx, conn: Connection, _: Next) -> Result<()> {
            self.record(cx, &conn);
            Ok(())
        }
    }

    impl Sink {
        fn record(&self, cx: &Cx, conn: &Connection) {
            let url = cx.ext().get::<ClientUrl>().map(|u| u.0.to_string());
            self.0.lock().unwrap().push((
                url.unwrap_or_default(),
                conn.network_service.clone(),
                conn.network_service_endpoint_name.clone(),
            ));
        }
    }

    fn request(id: &str, ns: &str, nse: &str) -> NetworkServiceRequest {
        NetworkServiceRequest {
            connection: Some(Connection {
                id: id.into(),
                network_service: ns.into(),
                network_service_endpoint_name: nse.into(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    async fn register(r: &Registries, name: &str, url: &str) {
        r.nse
            .register(
                &mut Cx::client(),
                NetworkServiceEndpoint {
                    name: name.into(),
                    network_service_names: vec!["ns".into()],
                    url: url.into(),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
    }

    /// A resolver whose server never answers: any DNS use would fail the test.
    fn no_dns() -> DomainResolver {
        let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = silent.local_addr().unwrap();
        std::mem::forget(silent);
        DomainResolver::with_server(addr).timeout(std::time::Duration::from_millis(100))
    }

    #[tokio::test]
    async fn an_incoming_request_loses_our_domain_and_gets_it_back() {
        let own = store();
        register(&own, "final", "inmem://nsmgr-2").await;
        let border = domain_border(
            "c2",
            &"tcp://203.0.113.1:5005".parse().unwrap(),
            own,
            no_dns(),
            Arc::new(Domains(HashMap::new())),
        );
        let sink = Sink::default();
        let chain = Chain::builder()
            .push(begin())
            .push(border)
            .push(sink.clone())
            .build();
        let conn = chain
            .request(&mut Cx::server(), request("1", "ns@c2", "final@c2"))
            .await
            .unwrap();
        assert_eq!(conn.network_service, "ns@c2");
        assert_eq!(conn.network_service_endpoint_name, "final@c2");
        chain.close(&mut Cx::server(), conn).await.unwrap();
        let seen = sink.0.lock().unwrap().clone();
        let down = (
            "inmem://nsmgr-2".to_string(),
            "ns".to_string(),
            "final".to_string(),
        );
        assert_eq!(
            seen,
            [down.clone(), down],
            "request and close go the same way"
        );
    }

    #[tokio::test]
    async fn floating_endpoints_go_to_the_border_their_registry_names() {
        let floating = store();
        register(&floating, "final", "tcp://203.0.113.2:5005").await;
        // Our own registry (through its proxy) hands out our border for it.
        let own = store();
        register(&own, "final@floating", "tcp://198.51.100.1:5005").await;
        let border = domain_border(
            "c1",
            &"tcp://198.51.100.1:5005".parse().unwrap(),
            own,
            no_dns(),
            Arc::new(Domains(HashMap::from([("floating".to_string(), floating)]))),
        );
        let sink = Sink::default();
        let chain = Chain::builder().push(border).push(sink.clone()).build();
        // The silent DNS server is Unavailable, not NotFound: the floating lookup is
        // only for a domain DNS says has no nsmgr-proxy.
        let err = chain
            .request(
                &mut Cx::server(),
                request("1", "ns@floating", "final@floating"),
            )
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unavailable, "{err}");
        let err = chain
            .request(&mut Cx::server(), request("2", "ns", ""))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
        let err = chain
            .request(&mut Cx::server(), request("3", "ns@c1", "gone@c1"))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::NotFound, "{err}");
        assert!(sink.0.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn an_endpoint_handed_out_at_our_internal_url_goes_out_to_its_domain() {
        // The registry proxy hands other domains' endpoints out at the unix socket our
        // forwarders dial, not at the public URL.
        let internal = "unix:///run/nsm/nsmgr-proxy.sock";
        let own = store();
        register(&own, "final@c2", internal).await;
        let border = domain_border(
            "c1",
            &"tcp://198.51.100.1:5005".parse().unwrap(),
            own,
            no_dns(),
            Arc::new(Domains(HashMap::new())),
        )
        .internal_urls(&[internal.parse().unwrap()]);
        let sink = Sink::default();
        let chain = Chain::builder().push(border).push(sink.clone()).build();
        // Out by DNS (the silent server: Unavailable), never back to ourselves.
        let err = chain
            .request(&mut Cx::server(), request("1", "ns@c2", "final@c2"))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unavailable, "{err}");
        assert!(sink.0.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn an_endpoint_we_registered_in_a_floating_domain_is_reached_directly() {
        let own = store();
        register(&own, "final@floating", "inmem://nsmgr-2").await;
        let border = domain_border(
            "c2",
            &"tcp://203.0.113.2:5005".parse().unwrap(),
            own,
            no_dns(),
            Arc::new(Domains(HashMap::new())),
        );
        let sink = Sink::default();
        let chain = Chain::builder().push(border).push(sink.clone()).build();
        chain
            .request(
                &mut Cx::server(),
                request("1", "ns@floating", "final@floating"),
            )
            .await
            .unwrap();
        let seen = sink.0.lock().unwrap().clone();
        assert_eq!(
            seen,
            [(
                "inmem://nsmgr-2".to_string(),
                "ns@floating".to_string(),
                "final@floating".to_string()
            )]
        );
    }
}
