//! `nse-vl3`: a vL3 endpoint on the kernel data plane: a router in its pod that gives
//! each client an address from its vL3 prefix and routes to the whole vL3 network, and
//! links to the other vL3 endpoints of its service (docs/VL3.md).

use std::collections::HashMap;
use std::process::ExitCode;
use std::time::Duration;

use nsm_examples::{
    log_calls, parse_duration, parse_labels, run, security, serve_endpoint, EndpointArgs, Failure,
    Vl3Networks,
};
use nsm_sdk::chains::{client, endpoint, ClientOptions, EndpointOptions};
use nsm_sdk::handlers::{heal, vl3_client, vl3_ipam};
use nsm_sdk::ipam::Vl3Prefixes;
use nsm_sdk::proto::registry::NetworkServiceEndpoint;
use nsm_sdk::registry::{watch_reconnect, RegistryChain};
use nsm_sdk::serving::Vl3Mesh;
use nsm_sdk::transport::{grpc_registry, prefix_client, Url};
use nsm_sdk_kernel::kernel_client;
use nsm_sdk_kernel::mechanism::{endpoint_mechanisms, own_netns_url};
use tokio_util::sync::CancellationToken;
use tracing::info;

/// A vL3 endpoint: it holds one prefix of each vL3 network from the prefix server
/// (`nsm-vl3-ipam`), gives each client a /32 (/128) pair from it and routes to the
/// networks (forwarding on in its namespace, IPv4 and IPv6), and links to every other
/// endpoint of its service (found by a watching Find through its manager) so that any
/// client reaches any other through at most two of them.
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
}

/// Turns this namespace into a router: IPv4 and IPv6 forwarding on, and no duplicate
/// address detection on the interfaces to come.
fn enable_forwarding() -> Result<(), Failure> {
    // accept_dad is written 0, the others 1.
    for path in [
        "/proc/sys/net/ipv4/ip_forward",
        "/proc/sys/net/ipv6/conf/all/forwarding",
        // Interfaces made later take `default`: no duplicate address detection on
        // their link-local addresses, which would hold IPv6 back for a second or two.
        "/proc/sys/net/ipv6/conf/default/accept_dad",
    ] {
        let value = if path.ends_with("accept_dad") {
            "0"
        } else {
            "1"
        };
        std::fs::write(path, value)
            .map_err(|e| Failure::runtime(format!("cannot turn forwarding on ({path}): {e}")))?;
    }
    Ok(())
}

fn main() -> ExitCode {
    run(|args: Args, stop| async move {
        let security = security()?;
        enable_forwarding()?;
        let channels = security.channels();
        let prefixes = Vl3Prefixes::new();
        // Held until the end: the prefix server frees them when the stream closes.
        let holding = CancellationToken::new();
        let _prefix_client = prefix_client(
            channels.clone(),
            args.prefix_server_url.clone(),
            args.networks.networks.clone(),
            Vec::new(),
            prefixes.clone(),
            &holding,
        );
        let name = &args.endpoint.name;
        let nse = endpoint(
            name,
            EndpointOptions::new()
                .security(&security)
                .handler(log_calls())
                .handler(vl3_ipam(prefixes.clone(), args.networks.networks.clone()))
                // A vL3 DNS plugs in here: after the IPAM, before the mechanisms.
                .handler(endpoint_mechanisms(own_netns_url())),
        );
        let mesh = Vl3Mesh::new(name, &args.service_names);
        let links = client(
            ClientOptions::new(name, args.endpoint.connect_to.clone())
                .security(&security)
                .channels(channels.clone())
                .tokens(security.tokens(args.link_token_lifetime))
                // The mesh retries a link itself, with a backoff, while its peer is
                // registered: each attempt fails fast.
                .retry(None)
                .mechanisms(vec![])
                .handler(heal(mesh.heal_options(channels.clone())))
                .handler(vl3_client(prefixes.clone()))
                .handler(kernel_client(own_netns_url())),
        );
        mesh.start(
            links.clone(),
            RegistryChain::<NetworkServiceEndpoint>::builder()
                .push(watch_reconnect())
                .push(grpc_registry(
                    channels.clone(),
                    args.endpoint.connect_to.clone(),
                ))
                .build(),
            prefixes.clone(),
            &holding,
        );
        let labels = args.labels.unwrap_or_default();
        let served = serve_endpoint(
            &args.endpoint,
            &nse,
            std::slice::from_ref(&args.service_names),
            &labels,
            &security,
            stop,
        )
        .await;
        mesh.close_all(&links).await;
        holding.cancel();
        info!("vL3 links closed, prefixes given back");
        served
    })
}
