//! `vl3_dns`: names in a vL3 network, `<client>.<network>`, served by every vL3 endpoint
//! for its own clients and found across the network by fanout.
//!
//! What it does (at a vL3 endpoint, which runs a [`DnsServer`] in its pod, bound to the
//! wildcard address on port 53 so that it answers on every address the endpoint has in
//! the network):
//!
//! - **In the endpoint chain** (after `vl3_ipam`), for an ordinary client: what
//!   [`dns_names`](crate::dns_names) does over the server's own [`Records`](crate::Records)
//!   (one set, shared with the server): the client's name (default
//!   `{labels.podName}.{service}`) -> its addresses while it is connected (Close and the
//!   endpoint's expiry of the connection remove it), and a DNS config naming the
//!   endpoint's end of the connection as the server, with the network as search
//!   domain. That config **replaces** the connection's earlier DNS configs: a client
//!   that healed from another vL3 endpoint gets no stale server in its resolv.conf.
//! - For a link from another vL3 endpoint (its request announces prefixes, see
//!   [`announces_prefixes`]): no name and no config; the peer's address on the link
//!   (the connection's source address) joins the server's fanout while the link lives.
//! - **In the mesh's client chain** ([`Vl3Dns::links`]), for the links this endpoint
//!   makes: the peer's address on the link (the connection's destination address)
//!   joins the fanout while the link lives.
//!
//! So each endpoint answers the names of its own clients and fans out to every other
//! endpoint it has a link with (one per pair, in one direction or the other: all of
//! them in a full mesh); a fanout query asks for no recursion, so it never comes back
//! around.
//!
//! State: link connection id -> the peer's address, behind a `std::sync::Mutex` never
//! held across an await; the fanout list is rebuilt from it on every change.
//!
//! Failure handled: a link whose answer carries no usable address joins nothing (a
//! warning); a failed Request changes nothing; names fail as in
//! [`dns_names`](crate::dns_names) (InvalidArgument).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use nsm_proto::connection::Connection;
use nsm_proto::networkservice::NetworkServiceRequest;
use nsm_sdk::handlers::vl3_client::announces_prefixes;
use nsm_sdk::{Cx, Handler, Next};
use tracing::{debug, warn};

use crate::dns_names::host;
use crate::{dns_names, DnsNames, DnsServer, Fanout, NameTemplate};

/// See the [module docs](self). Clones share their state.
#[derive(Debug, Clone)]
#[must_use]
pub struct Vl3Dns {
    names: DnsNames,
    fanout: Fanout,
    port: u16,
    peers: Arc<Mutex<BTreeMap<String, IpAddr>>>,
}

/// The vL3 DNS of an endpoint of the vL3 network (service) `network`, serving through
/// `server` (its records and its fanout; the server's port is the port of every
/// endpoint's server).
///
/// ```no_run
/// # async fn f() -> nsm_sdk_dns::Result<()> {
/// use nsm_sdk_dns::{vl3_dns, DnsServer, Records};
/// let server = DnsServer::builder(Records::new())
///     .bind("[::]:53".parse().unwrap())
///     .await?;
/// let dns = vl3_dns(&server, "vl3");
/// // The endpoint chain: ... vl3_ipam, dns, mechanisms ...; the mesh's client chain:
/// // ... vl3_client, dns.links(), mechanism.
/// let _links = dns.links();
/// # Ok(()) }
/// ```
pub fn vl3_dns(server: &DnsServer, network: &str) -> Vl3Dns {
    let port = server.local_addr().port();
    Vl3Dns {
        names: dns_names(server.records().clone())
            .server_on_connection_dst_port(port)
            .search_domains(vec![network.to_string()]),
        fanout: server.fanout().clone(),
        port,
        peers: Arc::default(),
    }
}

impl Vl3Dns {
    /// How clients are named (default [`NameTemplate::DEFAULT`]).
    pub fn template(mut self, template: NameTemplate) -> Self {
        self.names = self.names.template(template);
        self
    }

    /// The handler for the mesh's client chain (the links this endpoint makes); it
    /// shares this one's state.
    pub fn links(&self) -> Vl3DnsLinks {
        Vl3DnsLinks(self.clone())
    }

    /// The servers queries are fanned out to now (one per linked peer).
    pub fn peers(&self) -> Vec<SocketAddr> {
        self.fanout.servers()
    }

    /// How many clients hold a name.
    pub fn clients(&self) -> usize {
        self.names.connections()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, IpAddr>> {
        self.peers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The link `conn` reaches a peer at the first of its `field` addresses.
    fn link_up(&self, conn: &Connection, dst: bool) {
        let ip = conn.context.as_ref().and_then(|c| c.ip_context.as_ref());
        let addrs = ip.map(|ip| {
            if dst {
                &ip.dst_ip_addrs
            } else {
                &ip.src_ip_addrs
            }
        });
        let Some(addr) = addrs.into_iter().flatten().find_map(|a| host(a)) else {
            warn!(id = %conn.id, "a vL3 link without a peer address: no fanout to it");
            return;
        };
        let mut peers = self.lock();
        if peers.insert(conn.id.clone(), addr) != Some(addr) {
            debug!(id = %conn.id, peer = %addr, "vL3 DNS: fanout to a peer");
            self.publish(&peers);
        }
    }

    fn link_down(&self, id: &str) {
        let mut peers = self.lock();
        if let Some(addr) = peers.remove(id) {
            debug!(%id, peer = %addr, "vL3 DNS: no more fanout to a peer");
            self.publish(&peers);
        }
    }

    fn publish(&self, peers: &BTreeMap<String, IpAddr>) {
        let mut servers: Vec<SocketAddr> = Vec::new();
        for a in peers.values() {
            let s = SocketAddr::new(*a, self.port);
            if !servers.contains(&s) {
                servers.push(s);
            }
        }
        self.fanout.set_servers(servers);
    }
}

#[async_trait]
impl Handler for Vl3Dns {
    async fn request(
        &self,
        cx: &mut Cx,
        mut req: NetworkServiceRequest,
        next: Next,
    ) -> nsm_sdk::Result<Connection> {
        if req.connection.as_ref().is_some_and(announces_prefixes) {
            let conn = next.request(cx, req).await?;
            self.link_up(&conn, false);
            return Ok(conn);
        }
        // The endpoint owns its clients' DNS context: nothing from an earlier
        // endpoint stays.
        if let Some(ctx) = req
            .connection
            .as_mut()
            .and_then(|c| c.context.as_mut())
            .and_then(|c| c.dns_context.as_mut())
        {
            ctx.configs.clear();
        }
        self.names.request(cx, req, next).await
    }

    async fn close(&self, cx: &mut Cx, conn: Connection, next: Next) -> nsm_sdk::Result<()> {
        self.link_down(&conn.id);
        self.names.close(cx, conn, next).await
    }
}

/// [`Vl3Dns`] in the mesh's client chain, from [`Vl3Dns::links`]: each link this
/// endpoint makes adds its peer to the fanout while it lives (also after a refresh that
/// moved it); a failed first Request adds nothing.
#[derive(Debug, Clone)]
pub struct Vl3DnsLinks(Vl3Dns);

#[async_trait]
impl Handler for Vl3DnsLinks {
    async fn request(
        &self,
        cx: &mut Cx,
        req: NetworkServiceRequest,
        next: Next,
    ) -> nsm_sdk::Result<Connection> {
        let conn = next.request(cx, req).await?;
        self.0.link_up(&conn, true);
        Ok(conn)
    }

    async fn close(&self, cx: &mut Cx, conn: Connection, next: Next) -> nsm_sdk::Result<()> {
        self.0.link_down(&conn.id);
        next.close(cx, conn).await
    }
}

#[cfg(test)]
mod tests {
    use nsm_proto::connectioncontext::{ConnectionContext, DnsContext, IpContext, Route};
    use nsm_sdk::Chain;

    use super::*;
    use crate::{DnsConfig, Records};

    /// The end of the chain: a vL3 IPAM's answer, a pair per connection.
    #[derive(Clone)]
    struct Pair(&'static str, &'static str);

    #[async_trait]
    impl Handler for Pair {
        async fn request(
            &self,
            _cx: &mut Cx,
            req: NetworkServiceRequest,
            _next: Next,
        ) -> nsm_sdk::Result<Connection> {
            let mut conn = req.connection.unwrap_or_default();
            let ctx = conn.context.get_or_insert_with(Default::default);
            let ip = ctx.ip_context.get_or_insert_with(Default::default);
            ip.src_ip_addrs = vec![format!("{}/32", self.0)];
            ip.dst_ip_addrs = vec![format!("{}/32", self.1)];
            Ok(conn)
        }
    }

    /// A Request of `id` (of pod `pod`), announcing a prefix (a link) or not, carrying
    /// an earlier endpoint's DNS config or not.
    fn req(
        id: &str,
        pod: Option<&str>,
        announce: bool,
        stale: Option<DnsConfig>,
    ) -> NetworkServiceRequest {
        let mut r = crate::test_support::request(id, pod);
        let routes = announce.then(|| Route {
            prefix: "172.16.2.0/24".into(),
            ..Default::default()
        });
        r.connection.as_mut().unwrap().context = Some(ConnectionContext {
            ip_context: Some(IpContext {
                dst_routes: routes.into_iter().collect(),
                ..Default::default()
            }),
            dns_context: stale.map(|c| DnsContext { configs: vec![c] }),
            ..Default::default()
        });
        r
    }

    async fn server() -> DnsServer {
        DnsServer::builder(Records::new())
            .bind("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap()
    }

    fn configs(conn: &Connection) -> Vec<DnsConfig> {
        conn.context
            .as_ref()
            .and_then(|c| c.dns_context.as_ref())
            .map(|d| d.configs.clone())
            .unwrap_or_default()
    }

    #[tokio::test]
    async fn a_client_is_named_in_the_servers_records_and_gets_only_this_endpoints_config() {
        let server = server().await;
        let port = server.local_addr().port();
        let dns = vl3_dns(&server, "vl3");
        let chain = Chain::builder()
            .push(dns.clone())
            .push(Pair("172.16.1.2", "172.16.1.1"))
            .build();
        // A client that healed from another endpoint still carries its config.
        let stale = DnsConfig {
            dns_server_ips: vec!["172.16.9.1".into()],
            search_domains: vec!["vl3".into()],
        };
        let conn = chain
            .request(
                &mut Cx::server(),
                req("c1", Some("web-1"), false, Some(stale)),
            )
            .await
            .unwrap();
        assert_eq!(
            server.records().lookup("web-1.vl3"),
            Some(vec!["172.16.1.2".parse().unwrap()])
        );
        assert_eq!(
            configs(&conn),
            [DnsConfig {
                dns_server_ips: vec![format!("172.16.1.1:{port}")],
                search_domains: vec!["vl3".into()],
            }]
        );
        assert!(dns.peers().is_empty(), "a client is no peer");
        chain.close(&mut Cx::server(), conn).await.unwrap();
        assert!(server.records().is_empty());
        assert_eq!(dns.clients(), 0);
    }

    #[tokio::test]
    async fn links_both_ways_feed_the_fanout_while_they_live() {
        let server = server().await;
        let port = server.local_addr().port();
        let dns = vl3_dns(&server, "vl3");
        // A peer links to this endpoint: its address is the link's source.
        let endpoint = Chain::builder()
            .push(dns.clone())
            .push(Pair("172.16.1.4", "172.16.1.3"))
            .build();
        let incoming = endpoint
            .request(&mut Cx::server(), req("in", Some("vl3-b"), true, None))
            .await
            .unwrap();
        assert!(configs(&incoming).is_empty(), "a link gets no DNS config");
        assert!(server.records().is_empty(), "a link gets no name");
        // This endpoint links to another: its address is the link's destination.
        let links = Chain::builder()
            .push(dns.links())
            .push(Pair("172.16.3.2", "172.16.3.1"))
            .build();
        let outgoing = links
            .request(&mut Cx::client(), req("out", None, true, None))
            .await
            .unwrap();
        let want = |a: &str| SocketAddr::new(a.parse().unwrap(), port);
        assert_eq!(dns.peers(), [want("172.16.1.4"), want("172.16.3.1")]);
        assert_eq!(
            server.fanout().servers(),
            dns.peers(),
            "the server's own list"
        );
        // A refresh changes nothing.
        links
            .request(
                &mut Cx::client(),
                NetworkServiceRequest {
                    connection: Some(outgoing.clone()),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        assert_eq!(dns.peers().len(), 2);

        endpoint.close(&mut Cx::server(), incoming).await.unwrap();
        assert_eq!(dns.peers(), [want("172.16.3.1")]);
        links.close(&mut Cx::client(), outgoing).await.unwrap();
        assert!(dns.peers().is_empty());
    }

    /// Two endpoints on loopback (127.0.0.1 and 127.0.0.2, one port), linked: each
    /// resolves the other's client by fanout, and a name nobody holds is refused
    /// without a loop.
    #[tokio::test]
    async fn two_linked_endpoints_resolve_each_others_clients() {
        let a = server().await;
        let port = a.local_addr().port();
        let Ok(b) = DnsServer::builder(Records::new())
            .bind(SocketAddr::new("127.0.0.2".parse().unwrap(), port))
            .await
        else {
            eprintln!("skipped: 127.0.0.2:{port} cannot be bound");
            return;
        };
        let (dns_a, dns_b) = (vl3_dns(&a, "vl3"), vl3_dns(&b, "vl3"));
        let endpoint_a = Chain::builder()
            .push(dns_a.clone())
            .push(Pair("172.16.1.2", "172.16.1.1"))
            .build();
        endpoint_a
            .request(&mut Cx::server(), req("c1", Some("web-1"), false, None))
            .await
            .unwrap();
        // b links to a: 127.0.0.2 -> 127.0.0.1.
        let link = Chain::builder()
            .push(dns_b.links())
            .push(Pair("127.0.0.2", "127.0.0.1"))
            .build();
        link.request(&mut Cx::client(), req("l1", None, true, None))
            .await
            .unwrap();
        let at_a = Chain::builder()
            .push(dns_a.clone())
            .push(Pair("127.0.0.2", "127.0.0.1"))
            .build();
        at_a.request(&mut Cx::server(), req("l1", None, true, None))
            .await
            .unwrap();

        let ask = |server: &DnsServer, name: &str| {
            let addr = server.local_addr();
            let name = name.to_string();
            async move { nsm_testkit::dns::lookup(&[addr], &["vl3".into()], &name).await }
        };
        assert_eq!(
            ask(&b, "web-1").await.unwrap(),
            ["172.16.1.2".parse::<IpAddr>().unwrap()],
            "through the search domain and the fanout"
        );
        let started = std::time::Instant::now();
        assert!(ask(&a, "nobody.vl3").await.is_err());
        assert!(
            started.elapsed() < crate::server::DEFAULT_FANOUT_TIMEOUT,
            "refused at once by the peer, no loop: {:?}",
            started.elapsed()
        );
    }
}
