//! `dns_context`: a client keeps the DNS configs of its connections and applies them to
//! its pod.
//!
//! What it does (client side): after each successful Request (the first one and every
//! refresh) it keeps the configs of the connection's `context.dns_context` under the
//! connection id, and after Close it drops them. Whenever the set changes, the merged
//! configs of all the client's connections (in the order the connections came,
//! identical configs once) are applied to the pod's [`ResolvConf`], when one is given
//! ([`DnsContext::apply_to`]): its nameservers and search domains go before the pod's
//! own, and the pod's own configuration comes back when the last connection with a DNS
//! config closes. [`DnsContext::configs`] gives the merged configs to whoever resolves
//! through them directly.
//!
//! No DNS proxy runs in the pod: every server an endpoint runs with
//! [`DnsServer`](crate::DnsServer) answers REFUSED for a name it neither holds nor
//! finds by fanout, and glibc's resolver (and other stub resolvers) then ask the next
//! nameserver of resolv.conf, so several connections' servers side by side resolve the
//! names of all of them (docs/DNS.md says where this stops: glibc reads three
//! nameservers).
//!
//! State: connection id -> its configs (every connection with a successful Request,
//! with or without configs, until its Close), and the resolv.conf's own state, behind one
//! `std::sync::Mutex` (the small file is written under it, so applies stay in order).
//!
//! Failure handled: a resolv.conf that cannot be written fails the first Request with
//! Internal after closing the connection it made (nothing is left half applied); on a
//! refresh or a Close it is logged and the connection is kept or closed as asked.

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use nsm_proto::connection::Connection;
use nsm_proto::networkservice::NetworkServiceRequest;
use nsm_sdk::{Cx, Handler, Next};
use tracing::{debug, warn};

use crate::{DnsConfig, ResolvConf};

/// See the [module docs](self).
#[derive(Debug, Clone)]
#[must_use]
pub struct DnsContext {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    target: Option<ResolvConf>,
    /// (connection id, its configs), in the order the connections came.
    conns: Mutex<Vec<(String, Vec<DnsConfig>)>>,
}

/// The client-side handler keeping the DNS configs of the client's connections; give it
/// the pod's resolv.conf with [`DnsContext::apply_to`].
///
/// ```
/// use nsm_sdk_dns::{dns_context, ResolvConf};
/// let dns = dns_context().apply_to(ResolvConf::netns("my-pod").unwrap());
/// assert!(dns.configs().is_empty());
/// ```
pub fn dns_context() -> DnsContext {
    DnsContext {
        inner: Arc::new(Inner {
            target: None,
            conns: Mutex::default(),
        }),
    }
}

impl DnsContext {
    /// Applies the configs to `resolv_conf` (the pod's).
    pub fn apply_to(self, resolv_conf: ResolvConf) -> Self {
        let conns = std::mem::take(&mut *self.lock());
        DnsContext {
            inner: Arc::new(Inner {
                target: Some(resolv_conf),
                conns: Mutex::new(conns),
            }),
        }
    }

    /// The pod's resolv.conf, when one is given.
    pub fn resolv_conf(&self) -> Option<&ResolvConf> {
        self.inner.target.as_ref()
    }

    /// The merged configs of all connections (in the order they came, identical ones
    /// once).
    pub fn configs(&self) -> Vec<DnsConfig> {
        merged(&self.lock())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(String, Vec<DnsConfig>)>> {
        self.inner.conns.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sets the configs of `id` (`Some`, after a Request: the connection is known from
    /// then on, with or without configs) or forgets it (`None`, after Close); applies
    /// when the merged set changed. When the apply fails nothing changes, so the next
    /// update tries again.
    fn update(&self, id: &str, configs: Option<Vec<DnsConfig>>) -> crate::Result<()> {
        let mut conns = self.lock();
        let previous = conns.clone();
        let before = merged(&conns);
        match (conns.iter_mut().find(|(c, _)| c == id), configs) {
            (Some(entry), Some(configs)) => entry.1 = configs,
            (None, Some(configs)) => conns.push((id.to_string(), configs)),
            (_, None) => conns.retain(|(c, _)| c != id),
        }
        let after = merged(&conns);
        if after == before {
            return Ok(());
        }
        debug!(id, configs = after.len(), "DNS configs changed");
        let Some(target) = &self.inner.target else {
            return Ok(());
        };
        let applied = target.apply(&after);
        if applied.is_err() {
            *conns = previous;
        }
        applied
    }

    fn known(&self, id: &str) -> bool {
        self.lock().iter().any(|(c, _)| c == id)
    }
}

fn merged(conns: &[(String, Vec<DnsConfig>)]) -> Vec<DnsConfig> {
    let mut out: Vec<DnsConfig> = Vec::new();
    for c in conns.iter().flat_map(|(_, c)| c) {
        if !out.contains(c) {
            out.push(c.clone());
        }
    }
    out
}

fn configs_of(conn: &Connection) -> Vec<DnsConfig> {
    conn.context
        .as_ref()
        .and_then(|c| c.dns_context.as_ref())
        .map(|d| d.configs.clone())
        .unwrap_or_default()
}

#[async_trait]
impl Handler for DnsContext {
    async fn request(
        &self,
        cx: &mut Cx,
        req: NetworkServiceRequest,
        next: Next,
    ) -> nsm_sdk::Result<Connection> {
        let refresh = req.connection.as_ref().is_some_and(|c| self.known(&c.id));
        let conn = next.clone().request(cx, req).await?;
        if let Err(e) = self.update(&conn.id, Some(configs_of(&conn))) {
            if refresh {
                warn!(id = %conn.id, error = %e, "DNS config not applied on refresh");
                return Ok(conn);
            }
            // Nothing half applied (update kept the state it had): close.
            if let Err(close) = next.close(cx, conn.clone()).await {
                warn!(id = %conn.id, error = %close, "close after a failed DNS apply");
            }
            return Err(e.into());
        }
        Ok(conn)
    }

    async fn close(&self, cx: &mut Cx, conn: Connection, next: Next) -> nsm_sdk::Result<()> {
        let id = conn.id.clone();
        let result = next.close(cx, conn).await;
        if let Err(e) = self.update(&id, None) {
            warn!(%id, error = %e, "DNS config not removed from the pod");
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use nsm_proto::connectioncontext::{ConnectionContext, DnsContext as DnsContextMsg};
    use nsm_sdk::Chain;

    use super::*;

    /// The endpoint's answer: the DNS config set per connection id; counts closes.
    #[derive(Clone, Default)]
    struct Endpoint {
        configs: Arc<Mutex<std::collections::HashMap<String, Vec<DnsConfig>>>>,
        closes: Arc<AtomicUsize>,
    }

    impl Endpoint {
        fn set(&self, id: &str, configs: Vec<DnsConfig>) {
            self.configs.lock().unwrap().insert(id.into(), configs);
        }
    }

    #[async_trait]
    impl Handler for Endpoint {
        async fn request(
            &self,
            _cx: &mut Cx,
            req: NetworkServiceRequest,
            _next: Next,
        ) -> nsm_sdk::Result<Connection> {
            let mut conn = req.connection.unwrap_or_default();
            let configs = self.configs.lock().unwrap().get(&conn.id).cloned();
            conn.context = Some(ConnectionContext {
                dns_context: configs.map(|configs| DnsContextMsg { configs }),
                ..Default::default()
            });
            Ok(conn)
        }

        async fn close(&self, _cx: &mut Cx, _conn: Connection, _next: Next) -> nsm_sdk::Result<()> {
            self.closes.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    fn config(server: &str, search: &str) -> DnsConfig {
        DnsConfig {
            dns_server_ips: vec![server.into()],
            search_domains: vec![search.into()],
        }
    }

    fn req(id: &str) -> NetworkServiceRequest {
        NetworkServiceRequest {
            connection: Some(Connection {
                id: id.into(),
                ..Default::default()
            }),
            mechanism_preferences: vec![],
        }
    }

    fn conn(id: &str) -> Connection {
        Connection {
            id: id.into(),
            ..Default::default()
        }
    }

    fn temp(what: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("nsm-dnsctx-{}-{what}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    fn nameservers(path: &std::path::Path) -> Vec<String> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .filter_map(|l| l.strip_prefix("nameserver ").map(String::from))
            .collect()
    }

    #[tokio::test]
    async fn the_pod_sees_the_servers_of_all_its_connections_until_the_last_closes() {
        let dir = temp("all");
        let path = dir.join("resolv.conf");
        let dns = dns_context().apply_to(ResolvConf::at(&path));
        let nse = Endpoint::default();
        nse.set("c1", vec![config("10.0.0.1", "a")]);
        nse.set("c2", vec![config("10.0.0.2", "b"), config("10.0.0.1", "a")]);
        let chain = Chain::builder().push(dns.clone()).push(nse.clone()).build();

        chain.request(&mut Cx::client(), req("c1")).await.unwrap();
        assert_eq!(nameservers(&path), ["10.0.0.1"]);
        chain.request(&mut Cx::client(), req("c2")).await.unwrap();
        assert_eq!(nameservers(&path), ["10.0.0.1", "10.0.0.2"]);
        assert_eq!(
            dns.configs(),
            [config("10.0.0.1", "a"), config("10.0.0.2", "b")]
        );

        // A refresh with a new config follows it.
        nse.set("c1", vec![config("10.0.0.3", "a")]);
        chain.request(&mut Cx::client(), req("c1")).await.unwrap();
        assert_eq!(nameservers(&path), ["10.0.0.3", "10.0.0.2", "10.0.0.1"]);

        chain.close(&mut Cx::client(), conn("c1")).await.unwrap();
        assert_eq!(nameservers(&path), ["10.0.0.2", "10.0.0.1"]);
        chain.close(&mut Cx::client(), conn("c2")).await.unwrap();
        assert!(!path.exists(), "the pod had no file: none left");
        assert!(dns.configs().is_empty());
        assert_eq!(nse.closes.load(Ordering::SeqCst), 2);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn a_connection_without_dns_changes_nothing_and_configs_work_without_a_file() {
        let dns = dns_context();
        let nse = Endpoint::default();
        let chain = Chain::builder().push(dns.clone()).push(nse.clone()).build();
        chain.request(&mut Cx::client(), req("c1")).await.unwrap();
        assert!(dns.configs().is_empty());
        nse.set("c2", vec![config("10.0.0.1", "a")]);
        chain.request(&mut Cx::client(), req("c2")).await.unwrap();
        assert_eq!(dns.configs(), [config("10.0.0.1", "a")]);
        chain.close(&mut Cx::client(), conn("c2")).await.unwrap();
        assert!(dns.configs().is_empty());
    }

    #[tokio::test]
    async fn a_resolv_conf_that_cannot_be_written_fails_the_first_request_and_closes_it() {
        let dir = temp("unwritable");
        let path = dir.join("resolv.conf");
        // A directory where the file should be: no write succeeds, root's neither.
        std::fs::create_dir_all(&path).unwrap();
        let dns = dns_context().apply_to(ResolvConf::at(&path));
        let nse = Endpoint::default();
        nse.set("c1", vec![config("10.0.0.1", "a")]);
        let chain = Chain::builder().push(dns.clone()).push(nse.clone()).build();
        let e = chain
            .request(&mut Cx::client(), req("c1"))
            .await
            .unwrap_err();
        assert!(matches!(e, nsm_sdk::Error::Internal(_)), "{e}");
        assert!(e.to_string().contains("resolv.conf"), "{e}");
        assert_eq!(
            nse.closes.load(Ordering::SeqCst),
            1,
            "what it made is closed"
        );
        assert!(dns.configs().is_empty());
        let _ = std::fs::remove_dir_all(dir);
    }
}
