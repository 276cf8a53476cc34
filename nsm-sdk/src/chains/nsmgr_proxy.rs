//! The nsmgr-proxy: a domain's border for Requests. A manager without forwarders: it
//! passes each connection to another domain's nsmgr-proxy (out) or to the manager of the
//! endpoint's node in its own domain (in), and swaps tunnel addresses between internal
//! and public ones on the way.
//!
//! NetworkService chain: `update_path(name)`, `begin`, `update_token`, with policies
//! `authorize_server`, `timeout`, `monitor`, `swap_ip` (the domain's
//! internal -> public address map), `domain_border` (the next hop), `connect` (a client
//! chain of `begin`, `monitor_relay`, `update_token`, with policies `authorize_client`,
//! and the gRPC client). A path across one border has 8 segments: nsc, nsmgr1, fwd1,
//! proxy1, proxy2, nsmgr2, fwd2, nse.
//!
//! It looks endpoints up in its domain's registry (whose registry proxy answers for
//! other domains), other domains' nsmgr-proxies by DNS
//! (`nsmgr-proxy.nsm-system.<domain>`) and floating domains' registries by DNS
//! (`registry.nsm-system.<domain>`).

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::security::Secured;
use super::Served;
use crate::core::rt::begin;
use crate::core::Chain;
use crate::handlers::{
    authorize_client, authorize_server, connect, domain_border, monitor_relay, swap_ip, timeout,
    update_path, update_token, AddressMap, Monitor, SwapIp,
};
use crate::transport::{
    grpc_client, grpc_registries, DnsRegistries, DomainResolver, RegistryUrls, Services, Url,
};

/// What an nsmgr-proxy is made of.
#[derive(Clone)]
#[must_use]
pub struct NsmgrProxyOptions {
    name: String,
    domain: String,
    public_url: Url,
    internal_urls: Vec<Url>,
    registry_urls: RegistryUrls,
    dns: DomainResolver,
    addresses: AddressMap,
    root: CancellationToken,
    sec: Secured,
}

impl std::fmt::Debug for NsmgrProxyOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NsmgrProxyOptions")
            .field("name", &self.name)
            .field("domain", &self.domain)
            .field("public_url", &self.public_url)
            .finish()
    }
}

impl NsmgrProxyOptions {
    /// The nsmgr-proxy `name` of `domain`, which other domains reach at `public_url`,
    /// using the domain's registry at `registry` and finding other domains with `dns`.
    pub fn new(
        name: impl Into<String>,
        domain: impl Into<String>,
        public_url: Url,
        registry: impl Into<RegistryUrls>,
        dns: DomainResolver,
    ) -> Self {
        NsmgrProxyOptions {
            name: name.into(),
            domain: domain.into(),
            public_url,
            internal_urls: Vec::new(),
            registry_urls: registry.into(),
            dns,
            addresses: AddressMap::new(),
            root: CancellationToken::new(),
            sec: Secured::default(),
        }
    }

    secured_setters! {
        policies: "`authorize_server` after `update_token`, `authorize_client` before the gRPC client of its client half, and a MonitorConnection service that shows each subscriber only its own connections (`monitor::authorized`)",
        security: "mTLS on its server and its channel pool (its bundle must hold the CAs of the domains it talks to), signed path tokens, the authorize policies",
        channels
    }

    /// The other URLs the proxy listens on inside its domain (what its registry proxy
    /// hands out as `NSM_NSMGR_PROXY_URL` when that is not the public URL), so
    /// `domain_border` knows them as its own.
    pub fn internal_urls(mut self, urls: Vec<Url>) -> Self {
        self.internal_urls = urls;
        self
    }

    /// The internal -> public address of each node of the domain (`swap_ip`).
    pub fn addresses(mut self, map: AddressMap) -> Self {
        self.addresses = map;
        self
    }
}

/// An assembled nsmgr-proxy.
#[derive(Debug, Clone)]
pub struct NsmgrProxy {
    served: Served,
    swap: SwapIp,
}

impl NsmgrProxy {
    /// The NetworkService chain.
    pub fn chain(&self) -> &Chain {
        &self.served.chain
    }

    /// The address map, to replace while running.
    pub fn swap_ip(&self) -> &SwapIp {
        &self.swap
    }

    /// The gRPC services to serve: NetworkService and MonitorConnection.
    pub fn services(&self) -> Services {
        self.served.services_with(|s| s)
    }
}

/// The nsmgr-proxy.
pub fn nsmgr_proxy(opts: NsmgrProxyOptions) -> NsmgrProxy {
    let channels = opts.sec.channels.clone();
    let registries = grpc_registries(channels.clone(), opts.registry_urls.clone());
    let remote = Arc::new(DnsRegistries::new(opts.dns.clone(), channels.clone()));
    let monitor = Monitor::builder().shutdown(opts.root.clone()).build();
    let swap = swap_ip(opts.addresses);
    let client = Chain::builder()
        .push(begin().root(opts.root.clone()))
        .push(monitor_relay(channels.clone()))
        .push(update_token(opts.sec.tokens.clone()))
        .push_opt(opts.sec.policies.clone().map(authorize_client))
        .push(grpc_client(channels))
        .build();
    let chain = Chain::builder()
        .push(update_path(opts.name))
        .push(begin().root(opts.root.clone()))
        .push(update_token(opts.sec.tokens.clone()))
        .push_opt(opts.sec.policies.clone().map(authorize_server))
        .push(timeout())
        .push(monitor.clone())
        .push(swap.clone())
        .push(
            domain_border(opts.domain, &opts.public_url, registries, opts.dns, remote)
                .internal_urls(&opts.internal_urls),
        )
        .push(connect(client))
        .build();
    NsmgrProxy {
        served: Served::new(chain, monitor, &opts.sec),
        swap,
    }
}
