//! Several domains in one process: each cluster a [`Sandbox`] of its own (registry,
//! nodes, trust domain) with a registry proxy and an nsmgr-proxy, floating domains a
//! registry only; the domains find each other's registries and nsmgr-proxies by DNS, on
//! the DNS server the test gives ([`InterdomainBuilder::dns_server`]; it serves
//! [`Interdomain::dns_records`]).
//!
//! Security is on by default: each domain has its own throw-away CA (its trust domain
//! is the domain's name) and every component's bundle holds the CAs of all the domains
//! of the mesh (a federation), so mTLS and path tokens hold across the borders.
//!
//! The registries and proxies listen on TCP loopback ports (DNS hands out
//! `tcp://127.0.0.1:<port>`); the rest of each domain is on the in-memory transport.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::ops::Deref;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::mesh::Component;
use super::{Sandbox, SandboxBuilder};
use crate::chains::{nsmgr_proxy, registry_proxy_server, NsmgrProxyOptions, Security};
use crate::config::interdomain::{nsmgr_proxy_srv, registry_srv};
use crate::handlers::AddressMap;
use crate::security::dev_ca::DevCa;
use crate::security::{PolicySet, TrustBundle};
use crate::transport::{serve, DomainResolver, Url};
use crate::{Error, Result};

/// What a cluster's sandbox gets beyond the defaults ([`InterdomainBuilder::cluster_with`]).
type Configure = Arc<dyn Fn(SandboxBuilder) -> SandboxBuilder + Send + Sync>;

/// Builds an [`Interdomain`] mesh.
#[derive(Clone)]
#[must_use]
pub struct InterdomainBuilder {
    clusters: Vec<(String, usize)>,
    configure: HashMap<String, Configure>,
    addresses: HashMap<String, AddressMap>,
    floating: Vec<String>,
    dns: Option<SocketAddr>,
    dns_timeout: Duration,
    secure: bool,
}

impl std::fmt::Debug for InterdomainBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InterdomainBuilder")
            .field("clusters", &self.clusters)
            .field("floating", &self.floating)
            .field("addresses", &self.addresses)
            .field("dns", &self.dns)
            .field("secure", &self.secure)
            .finish()
    }
}

/// A set of domains; see the [module docs](self).
pub struct Interdomain {
    domains: Vec<Domain>,
}

impl std::fmt::Debug for Interdomain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.domains.iter().map(|d| &d.name))
            .finish()
    }
}

/// One domain of an [`Interdomain`] mesh: its [`Sandbox`] (through `Deref`) and its
/// proxies.
pub struct Domain {
    name: String,
    sandbox: Sandbox,
    dns: DomainResolver,
    addresses: AddressMap,
    registry_proxy: Option<(Url, Component)>,
    nsmgr_proxy: Option<(Url, Component)>,
}

impl std::fmt::Debug for Domain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Domain").field("name", &self.name).finish()
    }
}

impl Deref for Domain {
    type Target = Sandbox;
    fn deref(&self) -> &Sandbox {
        &self.sandbox
    }
}

/// A loopback TCP URL on a port free at the time of the call.
fn free_tcp_url() -> Result<Url> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|e| Error::unavailable(format!("no free loopback port: {e}")))?;
    let port = l
        .local_addr()
        .map_err(|e| Error::unavailable(format!("no free loopback port: {e}")))?
        .port();
    Ok(Url::Tcp {
        host: "127.0.0.1".into(),
        port,
    })
}

fn socket_addr(url: &Url) -> Option<SocketAddr> {
    match url {
        Url::Tcp { host, port } => format!("{host}:{port}").parse().ok(),
        _ => None,
    }
}

impl Interdomain {
    /// Starts describing the domains.
    pub fn builder() -> InterdomainBuilder {
        InterdomainBuilder {
            clusters: Vec::new(),
            configure: HashMap::new(),
            addresses: HashMap::new(),
            floating: Vec::new(),
            dns: None,
            dns_timeout: Duration::from_secs(1),
            secure: true,
        }
    }

    /// The domain `name`.
    ///
    /// # Panics
    /// When there is no such domain (a mistake in the test).
    pub fn domain(&self, name: &str) -> &Domain {
        self.domains
            .iter()
            .find(|d| d.name == name)
            .unwrap_or_else(|| panic!("no domain {name} in the mesh"))
    }

    /// The SRV records the DNS server must serve: `registry.nsm-system.<domain>` of
    /// every domain and `nsmgr-proxy.nsm-system.<domain>` of every cluster, each with
    /// the loopback address and port it listens on.
    pub fn dns_records(&self) -> Vec<(String, SocketAddr)> {
        let mut out = Vec::new();
        for d in &self.domains {
            if let Some(addr) = socket_addr(d.sandbox.registry_url()) {
                out.push((registry_srv(&d.name), addr));
            }
            if let Some(addr) = d.nsmgr_proxy.as_ref().and_then(|(u, _)| socket_addr(u)) {
                out.push((nsmgr_proxy_srv(&d.name), addr));
            }
        }
        out
    }

    /// The names of all domains.
    pub fn domain_names(&self) -> Vec<String> {
        self.domains.iter().map(|d| d.name.clone()).collect()
    }
}

impl InterdomainBuilder {
    /// A cluster `name` with `nodes` nodes, a registry proxy and an nsmgr-proxy.
    pub fn cluster(mut self, name: impl Into<String>, nodes: usize) -> Self {
        self.clusters.push((name.into(), nodes));
        self
    }

    /// A cluster `name` with `nodes` nodes whose sandbox `configure` sets up beyond the
    /// security and the registry the mesh gives it (a transport, forwarder mechanisms:
    /// e.g. the KERNEL data plane with a VXLAN tunnel in each node's namespace).
    pub fn cluster_with(
        mut self,
        name: impl Into<String>,
        nodes: usize,
        configure: impl Fn(SandboxBuilder) -> SandboxBuilder + Send + Sync + 'static,
    ) -> Self {
        let name = name.into();
        self.configure.insert(name.clone(), Arc::new(configure));
        self.cluster(name, nodes)
    }

    /// The address map (internal -> public address of each node) of the nsmgr-proxy
    /// of the cluster `name` (`swap_ip`); none by default.
    pub fn addresses(mut self, name: impl Into<String>, map: AddressMap) -> Self {
        self.addresses.insert(name.into(), map);
        self
    }

    /// A floating domain `name`: a registry only.
    pub fn floating(mut self, name: impl Into<String>) -> Self {
        self.floating.push(name.into());
        self
    }

    /// The DNS server every domain asks (required).
    pub fn dns_server(mut self, addr: SocketAddr) -> Self {
        self.dns = Some(addr);
        self
    }

    /// The bound of each DNS lookup (default 1 s).
    pub fn dns_timeout(mut self, timeout: Duration) -> Self {
        self.dns_timeout = timeout;
        self
    }

    /// Every domain without security (plaintext, unsigned tokens, no policies).
    pub fn insecure(mut self) -> Self {
        self.secure = false;
        self
    }

    /// Starts every domain: registries first, then the proxies and nodes.
    pub async fn build(self) -> Result<Interdomain> {
        let dns_addr = self
            .dns
            .ok_or_else(|| Error::invalid("an interdomain mesh needs a DNS server"))?;
        let dns = DomainResolver::with_server(dns_addr).timeout(self.dns_timeout);
        let names: Vec<&str> = self
            .clusters
            .iter()
            .map(|(n, _)| n.as_str())
            .chain(self.floating.iter().map(String::as_str))
            .collect();
        let cas = names
            .iter()
            .map(|n| DevCa::new(n).map_err(Error::from))
            .collect::<Result<Vec<_>>>()?;
        let federated: String = cas.iter().map(DevCa::bundle_pem).collect();
        let security_of = |i: usize| -> Result<Security> {
            if !self.secure {
                return Ok(Security::insecure());
            }
            let issued = cas[i].issue(
                &crate::security::SpiffeId::parse(&format!("spiffe://{}/sandbox", names[i]))?,
                Duration::from_secs(24 * 3600),
            )?;
            let mut identity = issued.identity()?;
            identity.bundle = std::sync::Arc::new(TrustBundle::from_pem(federated.as_bytes())?);
            Security::with_identity(identity.fixed(), PolicySet::defaults()?)
        };
        let mut domains = Vec::new();
        for (i, name) in names.iter().enumerate() {
            let security = security_of(i)?;
            let cluster = self.clusters.iter().find(|(n, _)| n == name);
            let registry_url = free_tcp_url()?;
            let mut builder: SandboxBuilder = Sandbox::builder();
            if let Some(configure) = self.configure.get(*name) {
                builder = configure(builder);
            }
            builder = builder
                .security(security.clone())
                .registry_url(registry_url)
                .nodes(cluster.map_or(0, |(_, n)| *n));
            let proxies = match cluster {
                Some(_) => {
                    let reg_proxy = free_tcp_url()?;
                    builder = builder.registry_proxy(reg_proxy.clone());
                    Some((reg_proxy, free_tcp_url()?))
                }
                None => None,
            };
            let sandbox = builder.build().await?;
            let mut domain = Domain {
                name: name.to_string(),
                sandbox,
                dns: dns.clone(),
                addresses: self.addresses.get(*name).cloned().unwrap_or_default(),
                registry_proxy: None,
                nsmgr_proxy: None,
            };
            if let Some((reg_proxy, nsmgr_proxy)) = proxies {
                domain.registry_proxy = Some((reg_proxy, Component::new()));
                domain.nsmgr_proxy = Some((nsmgr_proxy, Component::new()));
                domain.start_registry_proxy().await?;
                domain.start_nsmgr_proxy().await?;
            }
            domains.push(domain);
        }
        Ok(Interdomain { domains })
    }
}

impl Domain {
    /// The domain's name (its DNS suffix and trust domain).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The domain's sandbox.
    pub fn sandbox(&self) -> &Sandbox {
        &self.sandbox
    }

    /// The nsmgr-proxy's URL (a cluster's).
    pub fn nsmgr_proxy_url(&self) -> Option<&Url> {
        self.nsmgr_proxy.as_ref().map(|(u, _)| u)
    }

    /// The nsmgr-proxy's path segment name.
    pub fn nsmgr_proxy_name(&self) -> String {
        format!("nsmgr-proxy-{}", self.name)
    }

    /// Starts the registry proxy (again) on its URL.
    pub async fn start_registry_proxy(&self) -> Result<()> {
        let (Some((url, component)), Some((public, _))) = (&self.registry_proxy, &self.nsmgr_proxy)
        else {
            return Err(Error::invalid(format!(
                "{} has no registry proxy",
                self.name
            )));
        };
        let server = registry_proxy_server(self.dns.clone(), self.sandbox.channels(), Some(public));
        let served = serve(url, self.sandbox.security().serve(server.services())).await?;
        component.set(served, CancellationToken::new());
        Ok(())
    }

    /// Starts the nsmgr-proxy (again, fresh state) on its URL.
    pub async fn start_nsmgr_proxy(&self) -> Result<()> {
        let Some((url, component)) = &self.nsmgr_proxy else {
            return Err(Error::invalid(format!("{} has no nsmgr-proxy", self.name)));
        };
        let root = self.sandbox.root().child_token();
        let proxy = nsmgr_proxy(
            NsmgrProxyOptions::new(
                self.nsmgr_proxy_name(),
                self.name.clone(),
                url.clone(),
                self.sandbox.registry_url().clone(),
                self.dns.clone(),
            )
            .security(self.sandbox.security())
            .channels(self.sandbox.channels())
            .tokens(self.sandbox.tokens())
            .addresses(self.addresses.clone())
            .root(root.clone()),
        );
        let served = serve(url, proxy.services()).await?;
        component.set(served, root);
        Ok(())
    }

    /// Kills the nsmgr-proxy (its state is lost).
    pub fn kill_nsmgr_proxy(&self) {
        if let Some((url, component)) = &self.nsmgr_proxy {
            component.kill();
            self.sandbox.forget(url);
        }
    }
}

impl Drop for Domain {
    fn drop(&mut self) {
        for (_, c) in self.nsmgr_proxy.iter().chain(self.registry_proxy.iter()) {
            c.kill();
        }
    }
}
