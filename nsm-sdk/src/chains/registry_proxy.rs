//! The registry proxy of a domain: what its registry sends the entries and queries that
//! name other domains to ([`RegistryServer::route_interdomain`](super::RegistryServer::route_interdomain)).
//!
//! Both chains: `validate`, [`registry_proxy`] (other domains' registries found by DNS,
//! `registry.nsm-system.<domain>`, and called over the proxy's channel pool: mTLS when
//! secure, so each side must trust the other's CA: a federated bundle).

use std::sync::Arc;

use crate::registry::{registry_proxy, validate, Registries, RegistryChain, RemoteRegistries};
use crate::transport::{Channels, DnsRegistries, DomainResolver, Url};

use super::RegistryServer;

/// A registry proxy finding other domains with `dns`, calling them over `channels`,
/// and handing out `nsmgr_proxy_url` (this domain's nsmgr-proxy, as other domains reach
/// it) for endpoints of other domains and for this domain's floating registrations.
pub fn registry_proxy_server(
    dns: DomainResolver,
    channels: Channels,
    nsmgr_proxy_url: Option<&Url>,
) -> RegistryServer {
    registry_proxy_over(Arc::new(DnsRegistries::new(dns, channels)), nsmgr_proxy_url)
}

/// [`registry_proxy_server`] over any way of finding other domains' registries.
pub fn registry_proxy_over(
    remote: Arc<dyn RemoteRegistries>,
    nsmgr_proxy_url: Option<&Url>,
) -> RegistryServer {
    let mut proxy = registry_proxy(remote);
    if let Some(url) = nsmgr_proxy_url {
        proxy = proxy.nsmgr_proxy_url(url.to_string());
    }
    RegistryServer::from_registries(Registries {
        ns: RegistryChain::builder()
            .push(validate())
            .push(proxy.clone())
            .build(),
        nse: RegistryChain::builder()
            .push(validate())
            .push(proxy)
            .build(),
    })
}
