//! `nse-vl3`: a vL3 endpoint on the kernel data plane: a router in its pod that gives
//! each client an address from its vL3 prefix and routes to the whole vL3 network,
//! links to the other vL3 endpoints of its service, and serves the names of its clients
//! in DNS (docs/VL3.md).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use nsm_examples::{
    parse_duration, parse_labels, run, security, serve_endpoint, EndpointArgs, Vl3Endpoint,
    Vl3EndpointOptions, Vl3Networks, DEFAULT_DNS_LISTEN_ON,
};
use nsm_sdk::transport::Url;
use nsm_sdk_kernel::mechanism::own_netns_url;

/// A vL3 endpoint: it holds one prefix of each vL3 network from the prefix server
/// (`nsm-vl3-ipam`), gives each client a /32 (/128) pair from it and routes to the
/// networks (forwarding on in its namespace, IPv4 and IPv6), and links to every other
/// endpoint of its service (found by a watching Find through its manager) so that any
/// client reaches any other through at most two of them.
///
/// DNS: it serves `<podName>.<service>` (A and AAAA) for its clients on port 53 of its
/// namespace, asks the endpoints it is linked with for the names it does not hold, and
/// gives each client its end of the connection as DNS server, with the service as
/// search domain (docs/DNS.md).
///
/// Mechanisms: KERNEL (its end of each connection in this process's network namespace)
/// and NOOP.
#[derive(Debug, clap::Parser)]
#[command(version)]
struct Args {
    #[command(flatten)]
    endpoint: EndpointArgs,

    /// The vL3 network service it serves.
    #[arg(long, env = "NSM_SERVICE_NAMES", value_name = "NAME")]
    service_names: String,

    /// Labels of the endpoint for its service: key=value,key=value.
    #[arg(long, env = "NSM_LABELS", value_name = "K=V,...", value_parser = parse_labels)]
    labels: Option<HashMap<String, String>>,

    /// The vL3 networks, as the prefix server carves them.
    #[command(flatten)]
    networks: Vl3Networks,

    /// The vL3 prefix server.
    #[arg(long, env = "NSM_PREFIX_SERVER_URL", value_name = "URL")]
    prefix_server_url: Url,

    /// How long the path tokens of its links to other vL3 endpoints live: when this
    /// endpoint dies, the other end of each of its links (interface, routes) goes
    /// within this time.
    #[arg(long, env = "NSM_VL3_LINK_TOKEN_LIFETIME", value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
    link_token_lifetime: Duration,

    /// Where its DNS server listens (UDP and TCP); `[::]:53` answers on every address
    /// of its namespace, IPv4 and IPv6. The clients are told port 53.
    #[arg(long, env = "NSM_DNS_LISTEN_ON", value_name = "ADDR:PORT", default_value = DEFAULT_DNS_LISTEN_ON)]
    dns_listen_on: SocketAddr,

    /// The TTL of the names it serves: how long the other vL3 endpoints may keep
    /// answering a name after its client left.
    #[arg(long, env = "NSM_DNS_TTL", value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    dns_ttl: Duration,
}

fn main() -> ExitCode {
    run(|args: Args, stop| async move {
        let security = security()?;
        let vl3 = Vl3Endpoint::start(
            Vl3EndpointOptions {
                name: args.endpoint.name.clone(),
                service: args.service_names.clone(),
                networks: args.networks.networks.clone(),
                prefix_server: args.prefix_server_url.clone(),
                connect_to: args.endpoint.connect_to.clone(),
                netns_url: own_netns_url(),
                dns_listen_on: args.dns_listen_on,
                dns_ttl: u32::try_from(args.dns_ttl.as_secs()).unwrap_or(u32::MAX),
                link_token_lifetime: args.link_token_lifetime,
            },
            &security,
        )
        .await?;
        let labels = args.labels.unwrap_or_default();
        let served = serve_endpoint(
            &args.endpoint,
            vl3.endpoint(),
            std::slice::from_ref(&args.service_names),
            &labels,
            &security,
            stop,
        )
        .await;
        vl3.stop().await;
        served
    })
}
