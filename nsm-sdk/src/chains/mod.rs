//! Assembled chains: the client, the endpoint, the node manager, the forwarder and the
//! registry server. Only assembly lives here: every behaviour is a handler.
//!
//! Paths: local = `[nsc, nsmgr, forwarder, nse]` (4 segments); remote =
//! `[nsc, nsmgr1, fwd1, nsmgr2, fwd2, nse]` (6). The manager picks only a forwarder; the
//! forwarder picks the endpoint (discover + select) and connects to it directly (local)
//! or to the endpoint's manager (remote: the registry hands out the manager's URL for
//! endpoints registered through it).
//!
//! Interdomain = `[nsc, nsmgr1, fwd1, proxy1, proxy2, nsmgr2, fwd2, nse]` (8): the
//! registry proxy hands out the domain's nsmgr-proxy for other domains' endpoints, and
//! the nsmgr-proxies carry the Request across the border ([`nsmgr_proxy`]).
//!
//! Insertion points: each chain's options take handlers of the application at named
//! places (`after_begin`, `handler` after `monitor`, `before_connect`; see each
//! options type), so a chain is extended without copying its body.

#[macro_use]
mod setters;

pub mod client;
pub mod endpoint;
pub mod forwarder;
pub mod nsmgr;
pub mod nsmgr_proxy;
pub mod registry_proxy;
pub mod registry_server;
pub mod security;

pub use client::{client, ClientOptions};
pub use endpoint::{endpoint, Endpoint, EndpointOptions};
pub use forwarder::{forwarder, Forwarder, ForwarderOptions};
pub use nsmgr::{nsmgr, Nsmgr, NsmgrOptions};
pub use nsmgr_proxy::{nsmgr_proxy, NsmgrProxy, NsmgrProxyOptions};
pub use registry_proxy::{registry_proxy_over, registry_proxy_server};
pub use registry_server::{
    registry_server, registry_server_on, registry_server_with, RegistryServer, Store,
};
pub use security::Security;

/// What an assembled hop serves: its chain, the monitor behind its MonitorConnection
/// service, and how both are secured.
#[derive(Debug, Clone)]
struct Served {
    chain: crate::core::Chain,
    monitor: crate::handlers::Monitor,
    security: Security,
    policies: Option<std::sync::Arc<crate::security::PolicySet>>,
}

impl Served {
    fn new(
        chain: crate::core::Chain,
        monitor: crate::handlers::Monitor,
        sec: &security::Secured,
    ) -> Self {
        Served {
            chain,
            monitor,
            security: sec.security.clone(),
            policies: sec.policies.clone(),
        }
    }

    /// NetworkService and MonitorConnection, plus what `more` adds, secured.
    fn services_with(
        &self,
        more: impl FnOnce(crate::transport::Services) -> crate::transport::Services,
    ) -> crate::transport::Services {
        self.security.serve(more(chain_services(
            &self.chain,
            &self.monitor,
            self.policies.as_ref(),
        )))
    }
}

/// What every hop serves: its chain as NetworkService and its monitor as
/// MonitorConnection, filtered per subscriber when policies are configured (the caller
/// adds what else it serves, then secures the whole).
fn chain_services(
    chain: &crate::core::Chain,
    monitor: &crate::handlers::Monitor,
    policies: Option<&std::sync::Arc<crate::security::PolicySet>>,
) -> crate::transport::Services {
    crate::transport::Services::new()
        .network_service(chain.clone())
        .monitor(monitor_source(monitor, policies))
}

/// What a hop serves as MonitorConnection: its monitor, filtered per subscriber when
/// policies are configured.
fn monitor_source(
    monitor: &crate::handlers::Monitor,
    policies: Option<&std::sync::Arc<crate::security::PolicySet>>,
) -> std::sync::Arc<dyn crate::core::MonitorSource> {
    match policies {
        Some(p) => std::sync::Arc::new(crate::handlers::monitor::authorized(
            monitor.source(),
            p.clone(),
        )),
        None => monitor.source(),
    }
}

#[cfg(test)]
mod tests;
