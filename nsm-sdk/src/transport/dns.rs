//! `dns`: finds another domain's registry and nsmgr-proxy by DNS, as NSM does.
//!
//! What it does: [`DomainResolver::registry_url`] looks up the SRV record
//! `registry.nsm-system.<domain>` ([`nsmgr_proxy_url`](DomainResolver::nsmgr_proxy_url):
//! `nsmgr-proxy.nsm-system.<domain>`), takes its first target by priority and weight,
//! resolves the target's address (A/AAAA) and answers `tcp://<address>:<port>`. It asks
//! the DNS server it is given ([`DomainResolver::with_server`], UDP then TCP on that
//! address and port) or the system's resolver ([`DomainResolver::system`],
//! `/etc/resolv.conf`).
//!
//! State: the hickory resolver (no answer cache: a proxy that moved is found at its new
//! address on the next lookup).
//!
//! The lookups need nsm-sdk's `dns` feature (hickory-resolver). Built without it, the
//! resolver still builds, but every lookup fails with [`Error::Unimplemented`] naming
//! the record and the missing feature, so a `name@domain` request gets a clear error
//! instead of a hang or a panic.
//!
//! Failure handled: every lookup is bounded ([`DomainResolver::timeout`], 2 s by
//! default, one attempt per server): a server that does not answer or cannot be
//! reached is [`Error::Unavailable`]; a name with no record (NXDOMAIN, no SRV data, a
//! target without an address) is [`Error::NotFound`] naming the record, so a client
//! learns quickly which domain could not be found instead of hanging.

#[cfg(feature = "dns")]
use std::net::IpAddr;
use std::net::SocketAddr;
#[cfg(feature = "dns")]
use std::sync::Arc;
use std::time::Duration;

#[cfg(feature = "dns")]
use hickory_resolver::config::{NameServerConfig, ResolverConfig, ResolverOpts};
#[cfg(feature = "dns")]
use hickory_resolver::net::runtime::TokioRuntimeProvider;
#[cfg(feature = "dns")]
use hickory_resolver::net::NetError;
#[cfg(feature = "dns")]
use hickory_resolver::proto::rr::RData;
#[cfg(feature = "dns")]
use hickory_resolver::TokioResolver;
use tracing::debug;

use crate::config::interdomain::{nsmgr_proxy_srv, registry_srv};
use crate::core::Url;
use crate::registry::{Registries, RemoteRegistries};
use crate::transport::{grpc_registries, Channels};
use crate::{Error, Result};

/// The default bound of one lookup.
pub const DEFAULT_DNS_TIMEOUT: Duration = Duration::from_secs(2);

/// See the [module docs](self). Cheap to clone.
#[derive(Clone)]
pub struct DomainResolver {
    #[cfg(feature = "dns")]
    resolver: Arc<TokioResolver>,
    #[cfg(feature = "dns")]
    config: ResolverConfig,
    timeout: Duration,
    server: Option<SocketAddr>,
}

impl std::fmt::Debug for DomainResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DomainResolver")
            .field("server", &self.server)
            .field("timeout", &self.timeout)
            .finish()
    }
}

#[cfg(feature = "dns")]
fn options(timeout: Duration) -> ResolverOpts {
    let mut opts = ResolverOpts::default();
    opts.timeout = timeout;
    opts.attempts = 1;
    opts.cache_size = 0;
    opts
}

impl DomainResolver {
    /// Asks the DNS server at `server` (UDP, and TCP for long answers).
    #[cfg(feature = "dns")]
    pub fn with_server(server: SocketAddr) -> Self {
        let mut ns = NameServerConfig::udp_and_tcp(server.ip());
        for c in &mut ns.connections {
            c.port = server.port();
        }
        let config = ResolverConfig::from_name_servers(vec![ns]);
        Self::build(config, Some(server), DEFAULT_DNS_TIMEOUT)
    }

    /// Asks the DNS server at `server` (UDP, and TCP for long answers).
    #[cfg(not(feature = "dns"))]
    pub fn with_server(server: SocketAddr) -> Self {
        DomainResolver {
            timeout: DEFAULT_DNS_TIMEOUT,
            server: Some(server),
        }
    }

    /// Asks the system's resolver (`/etc/resolv.conf`).
    #[cfg(not(feature = "dns"))]
    pub fn system() -> Result<Self> {
        Ok(DomainResolver {
            timeout: DEFAULT_DNS_TIMEOUT,
            server: None,
        })
    }

    /// Asks the system's resolver (`/etc/resolv.conf`).
    ///
    /// Fails with [`Error::Internal`] when the system configuration cannot be read.
    #[cfg(feature = "dns")]
    pub fn system() -> Result<Self> {
        let (config, _) = hickory_resolver::system_conf::read_system_conf()
            .map_err(|e| Error::internal(format!("reading the system's DNS configuration: {e}")))?;
        Ok(Self::build(config, None, DEFAULT_DNS_TIMEOUT))
    }

    /// The server at `server`, else the system's resolver: what programs take as
    /// `NSM_DNS_SERVER`.
    pub fn new(server: Option<SocketAddr>) -> Result<Self> {
        match server {
            Some(addr) => Ok(Self::with_server(addr)),
            None => Self::system(),
        }
    }

    #[cfg(feature = "dns")]
    fn build(config: ResolverConfig, server: Option<SocketAddr>, timeout: Duration) -> Self {
        let mut builder =
            TokioResolver::builder_with_config(config.clone(), TokioRuntimeProvider::default());
        *builder.options_mut() = options(timeout);
        // Building fails only for options this module never sets (DNSSEC, TLS).
        let resolver = builder
            .build()
            .expect("a plain UDP/TCP resolver always builds");
        DomainResolver {
            resolver: Arc::new(resolver),
            config,
            timeout,
            server,
        }
    }

    /// Bounds each lookup by `timeout` (default [`DEFAULT_DNS_TIMEOUT`]).
    #[must_use]
    pub fn timeout(self, timeout: Duration) -> Self {
        #[cfg(feature = "dns")]
        return Self::build(self.config, self.server, timeout);
        #[cfg(not(feature = "dns"))]
        DomainResolver { timeout, ..self }
    }

    /// The URL of `domain`'s registry (`registry.nsm-system.<domain>`).
    pub async fn registry_url(&self, domain: &str) -> Result<Url> {
        self.srv(&registry_srv(domain)).await
    }

    /// The URL of `domain`'s nsmgr-proxy (`nsmgr-proxy.nsm-system.<domain>`).
    pub async fn nsmgr_proxy_url(&self, domain: &str) -> Result<Url> {
        self.srv(&nsmgr_proxy_srv(domain)).await
    }

    /// Resolves the SRV record `name` to `tcp://address:port`.
    pub async fn srv(&self, name: &str) -> Result<Url> {
        let fq = format!("{}.", name.trim_end_matches('.'));
        // Twice the per-query bound: the SRV and the address lookups.
        let deadline = self.timeout * 2 + Duration::from_millis(100);
        let found = tokio::time::timeout(deadline, self.srv_inner(&fq))
            .await
            .map_err(|_| Error::unavailable(format!("DNS lookup of {name} timed out")))?;
        match &found {
            Ok(url) => debug!(srv = %name, %url, "resolved"),
            Err(e) => debug!(srv = %name, error = %e, "not resolved"),
        }
        found
    }

    #[cfg(not(feature = "dns"))]
    async fn srv_inner(&self, fq: &str) -> Result<Url> {
        Err(without_dns(fq.trim_end_matches('.')))
    }

    #[cfg(feature = "dns")]
    async fn srv_inner(&self, fq: &str) -> Result<Url> {
        let name = fq.trim_end_matches('.');
        let lookup = self
            .resolver
            .srv_lookup(fq)
            .await
            .map_err(|e| dns_error(name, "SRV", &e))?;
        let mut srvs: Vec<_> = lookup
            .answers()
            .iter()
            .filter_map(|r| match &r.data {
                RData::SRV(srv) => Some(srv.clone()),
                _ => None,
            })
            .collect();
        srvs.sort_by_key(|s| (s.priority, std::cmp::Reverse(s.weight)));
        let srv = srvs
            .first()
            .ok_or_else(|| Error::not_found(format!("no SRV record {name}")))?;
        let target = srv.target.to_ascii();
        let host = match target.trim_end_matches('.').parse::<IpAddr>() {
            Ok(ip) => ip,
            Err(_) => self
                .resolver
                .lookup_ip(target.as_str())
                .await
                .map_err(|e| dns_error(&target, "address", &e))?
                .iter()
                .next()
                .ok_or_else(|| Error::not_found(format!("no address for {target}")))?,
        };
        Ok(Url::Tcp {
            host: host.to_string(),
            port: srv.port,
        })
    }
}

/// The registries of other domains, found by DNS ([`DomainResolver::registry_url`]) and
/// called over `channels` (mTLS when secure: the peer must chain to a bundle this side
/// trusts, so domains that talk to each other federate their bundles).
#[derive(Debug, Clone)]
pub struct DnsRegistries {
    dns: DomainResolver,
    channels: Channels,
}

impl DnsRegistries {
    /// Resolves with `dns`, calls over `channels`.
    pub fn new(dns: DomainResolver, channels: Channels) -> Self {
        DnsRegistries { dns, channels }
    }
}

#[async_trait::async_trait]
impl RemoteRegistries for DnsRegistries {
    async fn registries(&self, domain: &str) -> Result<Registries> {
        let url = self.dns.registry_url(domain).await?;
        Ok(grpc_registries(self.channels.clone(), url))
    }
}

/// What a lookup answers when nsm-sdk was built without its `dns` feature.
#[cfg(any(test, not(feature = "dns")))]
fn without_dns(name: &str) -> Error {
    Error::Unimplemented(format!(
        "cannot look up {name}: names of other domains (name@domain) need nsm-sdk's `dns` feature, which this program was built without"
    ))
}

#[cfg(feature = "dns")]
fn dns_error(name: &str, what: &str, e: &NetError) -> Error {
    if e.is_no_records_found() || e.is_nx_domain() {
        Error::not_found(format!("no {what} record for {name}"))
    } else {
        Error::unavailable(format!("DNS lookup of {name} ({what}) failed: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_error_without_the_dns_feature_is_unimplemented_and_says_why() {
        let err = without_dns("registry.nsm-system.cluster2");
        assert_eq!(err.code(), tonic::Code::Unimplemented);
        let msg = err.to_string();
        assert!(msg.contains("registry.nsm-system.cluster2"), "{msg}");
        assert!(msg.contains("`dns` feature"), "{msg}");
    }

    /// Built without the feature (`cargo test -p nsm-sdk --lib without_the_dns_feature`):
    /// a lookup fails at once with Unimplemented.
    #[cfg(not(feature = "dns"))]
    #[tokio::test]
    async fn lookups_without_the_dns_feature_are_unimplemented() {
        let dns = DomainResolver::new(None)
            .unwrap()
            .timeout(Duration::from_millis(200));
        let err = dns.nsmgr_proxy_url("cluster2").await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unimplemented, "{err}");
        assert!(
            err.to_string().contains("nsmgr-proxy.nsm-system.cluster2"),
            "{err}"
        );
    }

    #[cfg(feature = "dns")]
    #[tokio::test]
    async fn a_server_that_does_not_answer_is_unavailable_within_the_bound() {
        // A UDP socket that never answers: the lookup must end on its own bound.
        let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let dns = DomainResolver::with_server(silent.local_addr().unwrap())
            .timeout(Duration::from_millis(200));
        let started = std::time::Instant::now();
        let err = dns.registry_url("cluster2").await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unavailable, "{err}");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
    }
}
