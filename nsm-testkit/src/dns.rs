//! Lookups through DNS configs (`connectioncontext.DNSConfig`) with a real stub resolver
//! (hickory-resolver): UDP then TCP, the configs' search domains, no cache (each lookup
//! asks the servers), one attempt with a short timeout.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::Name;
use hickory_resolver::Resolver;
use nsm_proto::connectioncontext::DnsConfig;

/// The addresses `name` resolves to through `servers` with `search` domains, or why it
/// does not resolve.
pub async fn lookup(
    servers: &[SocketAddr],
    search: &[String],
    name: &str,
) -> Result<Vec<IpAddr>, String> {
    let mut config = ResolverConfig::from_parts(None, Vec::new(), Vec::new());
    for s in servers {
        let mut udp = ConnectionConfig::udp();
        udp.port = s.port();
        let mut tcp = ConnectionConfig::tcp();
        tcp.port = s.port();
        config.add_name_server(NameServerConfig::new(s.ip(), true, vec![udp, tcp]));
    }
    for d in search {
        config.add_search(Name::from_ascii(d).map_err(|e| format!("search {d}: {e}"))?);
    }
    let mut opts = ResolverOpts::default();
    opts.cache_size = 0;
    opts.attempts = 1;
    opts.timeout = Duration::from_secs(1);
    let resolver = Resolver::builder_with_config(config, TokioRuntimeProvider::default())
        .with_options(opts)
        .build()
        .map_err(|e| e.to_string())?;
    let ips = resolver.lookup_ip(name).await.map_err(|e| e.to_string())?;
    Ok(ips.iter().collect())
}

/// [`lookup`] through the servers and search domains of `configs` (a server without a
/// port is on 53).
pub async fn lookup_in(configs: &[DnsConfig], name: &str) -> Result<Vec<IpAddr>, String> {
    let mut servers = Vec::new();
    let mut search = Vec::new();
    for c in configs {
        for s in &c.dns_server_ips {
            let addr = s
                .parse::<IpAddr>()
                .map(|ip| SocketAddr::new(ip, 53))
                .or_else(|_| s.parse::<SocketAddr>())
                .map_err(|e| format!("DNS server {s}: {e}"))?;
            servers.push(addr);
        }
        search.extend(c.search_domains.iter().cloned());
    }
    if servers.is_empty() {
        return Err("no DNS server".into());
    }
    lookup(&servers, &search, name).await
}
