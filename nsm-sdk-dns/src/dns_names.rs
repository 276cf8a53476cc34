//! `dns_names`: an endpoint names its clients in its DNS server and tells them where
//! that server is.
//!
//! What it does (server side, at the NSE, after the IPAM): on Request it renders the
//! client's name from the request with its [`NameTemplate`] (default
//! `{labels.podName}.{service}`), and once the rest of the chain succeeded it sets that
//! name -> the connection's source addresses (the client's, v4 and v6, without prefix
//! length) in the [`Records`] the endpoint's [`DnsServer`](crate::DnsServer) serves, owned
//! by the connection id. It adds the endpoint's DNS config (server IPs, search domains)
//! to the connection's `context.dns_context.configs` unless an equal one is there. A
//! refresh keeps the name (and follows new addresses or a new name); Close (also the
//! endpoint's expiry of a connection, which closes it through the chain) removes it. A
//! client without the values the template needs gets the DNS config and no name.
//!
//! The server IPs are fixed ([`DnsNames::server_ips`]), or the connection's own
//! destination addresses ([`DnsNames::server_on_connection_dst`]): the endpoint's end
//! of a point-to-point connection, where a server bound to the wildcard address in the
//! endpoint's pod answers, reachable by the client over the connection itself.
//!
//! State: connection id -> the name it holds, behind a `std::sync::Mutex` never held
//! across an await; the records themselves are shared with the server.
//!
//! Failure handled: a rendered name that is not a DNS name fails the Request with
//! InvalidArgument before anything is built; an unparsable source address is left out
//! (with a warning); a failed first Request registers nothing, a failed refresh keeps
//! what the connection had.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use ipnet::IpNet;
use nsm_proto::connection::Connection;
use nsm_proto::connectioncontext::{ConnectionContext, DnsContext};
use nsm_proto::networkservice::NetworkServiceRequest;
use nsm_sdk::{Cx, Handler, Next};
use tracing::{debug, warn};

use crate::{DnsConfig, NameTemplate, Records};

/// See the [module docs](self).
#[derive(Debug, Clone)]
#[must_use]
pub struct DnsNames {
    records: Records,
    template: NameTemplate,
    server_ips: Vec<String>,
    /// The port of the server on the connection's destination addresses, if named.
    on_dst: Option<u16>,
    search_domains: Vec<String>,
    names: Arc<Mutex<HashMap<String, String>>>,
}

/// The handler registering clients' names in `records` (those of the endpoint's
/// [`DnsServer`](crate::DnsServer)), with the default template, no server IP and no
/// search domain yet.
///
/// ```
/// use nsm_sdk_dns::{dns_names, NameTemplate, Records};
/// let names = dns_names(Records::new())
///     .template(NameTemplate::parse("{labels.podName}.{service}").unwrap())
///     .server_ips(vec!["172.16.0.1".into()])
///     .search_domains(vec!["vl3".into()]);
/// assert_eq!(names.connections(), 0);
/// ```
pub fn dns_names(records: Records) -> DnsNames {
    DnsNames {
        records,
        template: NameTemplate::default(),
        server_ips: Vec::new(),
        on_dst: None,
        search_domains: Vec::new(),
        names: Arc::default(),
    }
}

impl DnsNames {
    /// How clients are named.
    pub fn template(mut self, template: NameTemplate) -> Self {
        self.template = template;
        self
    }

    /// Server IPs every connection's DNS config names (`ip`, or `ip:port` for clients
    /// that resolve through the config directly rather than through a resolv.conf).
    pub fn server_ips(mut self, ips: Vec<String>) -> Self {
        self.server_ips = ips;
        self
    }

    /// Also names each connection's destination addresses (the endpoint's end of the
    /// connection) as its DNS servers, port 53.
    pub fn server_on_connection_dst(self) -> Self {
        self.server_on_connection_dst_port(53)
    }

    /// [`server_on_connection_dst`](Self::server_on_connection_dst) on another port
    /// (named `ip:port`, which a resolv.conf cannot hold: for clients that resolve
    /// through the config themselves).
    pub fn server_on_connection_dst_port(mut self, port: u16) -> Self {
        self.on_dst = Some(port);
        self
    }

    /// The search domains of the DNS config.
    pub fn search_domains(mut self, domains: Vec<String>) -> Self {
        self.search_domains = domains;
        self
    }

    /// How many connections hold a name.
    pub fn connections(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, String>> {
        self.names.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The DNS config of `conn`, or `None` when it names no server.
    fn config(&self, conn: &Connection) -> Option<DnsConfig> {
        let mut servers = self.server_ips.clone();
        if let Some(port) = self.on_dst {
            let ip = conn.context.as_ref().and_then(|c| c.ip_context.as_ref());
            for a in ip.map(|ip| ip.dst_ip_addrs.as_slice()).unwrap_or_default() {
                if let Some(a) = host(a) {
                    servers.push(if port == 53 {
                        a.to_string()
                    } else {
                        std::net::SocketAddr::new(a, port).to_string()
                    });
                }
            }
        }
        (!servers.is_empty()).then(|| DnsConfig {
            dns_server_ips: servers,
            search_domains: self.search_domains.clone(),
        })
    }

    /// Sets `name` (or none) for connection `id` to `addrs`, dropping the name it held
    /// before when that was another.
    fn hold(&self, id: &str, name: Option<String>, addrs: Vec<IpAddr>) {
        let mut names = self.lock();
        let before = match &name {
            Some(n) => names.insert(id.to_string(), n.clone()),
            None => names.remove(id),
        };
        if let Some(old) = before.filter(|old| Some(old) != name.as_ref()) {
            self.records.remove(&old, id);
        }
        if let Some(n) = name {
            // The name was parsed when rendered.
            if let Err(e) = self.records.set(&n, id, addrs) {
                warn!(name = %n, error = %e, "name not registered");
            }
        }
    }
}

/// The address of `a.b.c.d/len` (or of a bare address).
pub(crate) fn host(s: &str) -> Option<IpAddr> {
    s.parse::<IpNet>()
        .map(|n| n.addr())
        .or_else(|_| s.parse::<IpAddr>())
        .ok()
}

#[async_trait]
impl Handler for DnsNames {
    async fn request(
        &self,
        cx: &mut Cx,
        req: NetworkServiceRequest,
        next: Next,
    ) -> nsm_sdk::Result<Connection> {
        let name = match &req.connection {
            Some(c) => self.template.render(c)?,
            None => None,
        };
        let mut conn = next.request(cx, req).await?;
        let addrs: Vec<IpAddr> = conn
            .context
            .as_ref()
            .and_then(|c| c.ip_context.as_ref())
            .map(|ip| {
                ip.src_ip_addrs
                    .iter()
                    .filter_map(|a| {
                        let h = host(a);
                        if h.is_none() {
                            warn!(addr = %a, "a source address that does not parse gets no record");
                        }
                        h
                    })
                    .collect()
            })
            .unwrap_or_default();
        debug!(id = %conn.id, name = ?name, ?addrs, "client named");
        self.hold(&conn.id, name, addrs);
        if let Some(config) = self.config(&conn) {
            let ctx = conn.context.get_or_insert_with(ConnectionContext::default);
            let dns = ctx.dns_context.get_or_insert_with(DnsContext::default);
            if !dns.configs.contains(&config) {
                dns.configs.push(config);
            }
        }
        Ok(conn)
    }

    async fn close(&self, cx: &mut Cx, conn: Connection, next: Next) -> nsm_sdk::Result<()> {
        if let Some(name) = self.lock().remove(&conn.id) {
            self.records.remove(&name, &conn.id);
            debug!(id = %conn.id, %name, "client's name removed");
        }
        next.close(cx, conn).await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use nsm_proto::connectioncontext::IpContext;
    use nsm_sdk::{Chain, Error};

    use super::*;

    /// The end of the chain: an IPAM's result (fixed addresses), failing on demand.
    #[derive(Clone, Default)]
    struct Ipam {
        fail: Arc<AtomicBool>,
    }

    #[async_trait]
    impl Handler for Ipam {
        async fn request(
            &self,
            _cx: &mut Cx,
            req: NetworkServiceRequest,
            _next: Next,
        ) -> nsm_sdk::Result<Connection> {
            if self.fail.load(Ordering::SeqCst) {
                return Err(Error::Unavailable("injected".into()));
            }
            let mut conn = req.connection.unwrap_or_default();
            let ctx = conn.context.get_or_insert_with(Default::default);
            ctx.ip_context = Some(IpContext {
                src_ip_addrs: vec!["172.16.0.2/32".into(), "fd00::2/128".into(), "junk".into()],
                dst_ip_addrs: vec!["172.16.0.1/32".into()],
                ..Default::default()
            });
            Ok(conn)
        }
    }

    use crate::test_support::request as req;

    fn chain(names: &DnsNames, ipam: &Ipam) -> Chain {
        Chain::builder()
            .push(names.clone())
            .push(ipam.clone())
            .build()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// A Request of connection `id` (of pod `pod`) through `chain` that succeeds.
    async fn ok(chain: &Chain, id: &str, pod: Option<&str>) -> Connection {
        chain
            .request(&mut Cx::server(), req(id, pod))
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn a_client_is_named_while_connected_and_gets_the_dns_config_once() {
        let records = Records::new();
        let names = dns_names(records.clone())
            .server_ips(vec!["10.9.9.9".into()])
            .server_on_connection_dst()
            .search_domains(vec!["vl3".into()]);
        let ipam = Ipam::default();
        let chain = chain(&names, &ipam);
        let conn = ok(&chain, "c1", Some("web-1")).await;
        assert_eq!(
            records.lookup("web-1.vl3"),
            Some(vec![ip("172.16.0.2"), ip("fd00::2")])
        );
        let configs = &conn
            .context
            .as_ref()
            .unwrap()
            .dns_context
            .as_ref()
            .unwrap()
            .configs;
        assert_eq!(
            configs,
            &[DnsConfig {
                dns_server_ips: vec!["10.9.9.9".into(), "172.16.0.1".into()],
                search_domains: vec!["vl3".into()],
            }]
        );

        // A refresh carries the config back: still one.
        let mut again = req("c1", Some("web-1"));
        again.connection = Some(Connection {
            labels: again.connection.unwrap().labels,
            ..conn.clone()
        });
        let conn = chain.request(&mut Cx::server(), again).await.unwrap();
        let configs = &conn
            .context
            .as_ref()
            .unwrap()
            .dns_context
            .as_ref()
            .unwrap()
            .configs;
        assert_eq!(configs.len(), 1);
        assert_eq!(names.connections(), 1);

        chain.close(&mut Cx::server(), conn).await.unwrap();
        assert_eq!(records.lookup("web-1.vl3"), None);
        assert_eq!(names.connections(), 0);
    }

    #[tokio::test]
    async fn a_refresh_under_a_new_name_drops_the_old_and_two_clients_share_a_name() {
        let records = Records::new();
        let names = dns_names(records.clone());
        let ipam = Ipam::default();
        let chain = chain(&names, &ipam);
        let a = ok(&chain, "c1", Some("web-1")).await;
        assert!(
            a.context.as_ref().unwrap().dns_context.is_none(),
            "no server IP: no config"
        );
        ok(&chain, "c1", Some("web-2")).await;
        assert_eq!(records.lookup("web-1.vl3"), None);
        assert!(records.lookup("web-2.vl3").is_some());
        let b = ok(&chain, "c2", Some("web-2")).await;
        chain.close(&mut Cx::server(), b).await.unwrap();
        assert!(records.lookup("web-2.vl3").is_some(), "c1 still holds it");
        // Without the label: no name, the old one dropped.
        ok(&chain, "c1", None).await;
        assert!(records.is_empty());
        assert_eq!(names.connections(), 0);
    }

    #[tokio::test]
    async fn a_failed_request_names_nothing_and_a_bad_name_is_invalid_argument() {
        let records = Records::new();
        let names = dns_names(records.clone());
        let ipam = Ipam::default();
        let chain = chain(&names, &ipam);
        ipam.fail.store(true, Ordering::SeqCst);
        let e = chain
            .request(&mut Cx::server(), req("c1", Some("web-1")))
            .await
            .unwrap_err();
        assert!(matches!(e, Error::Unavailable(_)), "{e}");
        assert!(records.is_empty());

        ipam.fail.store(false, Ordering::SeqCst);
        ok(&chain, "c1", Some("web-1")).await;
        ipam.fail.store(true, Ordering::SeqCst);
        chain
            .request(&mut Cx::server(), req("c1", Some("web-1")))
            .await
            .unwrap_err();
        assert!(
            records.lookup("web-1.vl3").is_some(),
            "a failed refresh keeps it"
        );

        let e = chain
            .request(&mut Cx::server(), req("c3", Some("a..b")))
            .await
            .unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
    }
}
