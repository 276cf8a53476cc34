//! `nse-icmp-responder`: an endpoint that gives each client a point-to-point pair of
//! addresses and a kernel interface in its namespace (the ICMP responder of NSM's
//! examples: the kernel answers the pings).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::ExitCode;

use ipnet::IpNet;
use nsm_examples::{log_calls, parse_labels, run, security, serve_endpoint, EndpointArgs, Failure};
use nsm_sdk::chains::{endpoint, EndpointOptions};
use nsm_sdk::handlers::point_to_point;
use nsm_sdk_dns::{dns_names, DnsServer, Records};
use nsm_sdk_kernel::mechanism::{endpoint_mechanisms, own_netns_url};

/// An endpoint serving the given network services: each connection gets a /32 (/128)
/// pair from the CIDR prefixes. It registers itself (and each network service the
/// registry does not know) through its manager, stays registered, and unregisters when
/// it stops.
///
/// Mechanisms: KERNEL (the forwarder puts the endpoint's end of each connection, with
/// the endpoint's address, into this process's network namespace, where the kernel
/// answers pings) and NOOP. The IPAM is strict: a request that still carries another
/// endpoint's addresses (a client that healed away from it) gets this endpoint's pair
/// only.
#[derive(Debug, clap::Parser)]
#[command(version)]
struct Args {
    #[command(flatten)]
    endpoint: EndpointArgs,

    /// The network services it serves, comma-separated.
    #[arg(
        long,
        env = "NSM_SERVICE_NAMES",
        value_name = "NAME,...",
        value_delimiter = ',',
        required = true
    )]
    service_names: Vec<String>,

    /// Labels of the endpoint for each of its services: key=value,key=value.
    #[arg(long, env = "NSM_LABELS", value_name = "K=V,...", value_parser = parse_labels)]
    labels: Option<HashMap<String, String>>,

    /// The prefixes it hands addresses out of, comma-separated (IPv4 and/or IPv6).
    #[arg(
        long,
        env = "NSM_CIDR_PREFIX",
        value_name = "CIDR,...",
        value_delimiter = ',',
        default_value = "169.254.0.0/16"
    )]
    cidr_prefix: Vec<IpNet>,

    /// Serve DNS on this address (UDP and TCP; 0.0.0.0:53 answers on every address of
    /// the endpoint's namespace): each client is named `<podName label>.<service>` ->
    /// its address while connected, and gets a DNS config naming the endpoint's end of
    /// its connection (port 53) or this address (another port), with the services as
    /// search domains (docs/DNS.md).
    #[arg(long, env = "NSM_DNS_LISTEN_ON", value_name = "ADDR:PORT")]
    dns_listen_on: Option<SocketAddr>,
}

fn main() -> ExitCode {
    run(|args: Args, stop| async move {
        let security = security()?;
        let mut options = EndpointOptions::new()
            .security(&security)
            .handler(log_calls())
            .handler(point_to_point(args.cidr_prefix).strict(true))
            .handler(endpoint_mechanisms(own_netns_url()));
        // Kept until the endpoint stops; dropping it stops the server.
        let mut _dns = None;
        if let Some(addr) = args.dns_listen_on {
            let records = Records::new();
            let server = DnsServer::builder(records.clone())
                .bind(addr)
                .await
                .map_err(|e| Failure::config(e.to_string()))?;
            let names = dns_names(records).search_domains(args.service_names.clone());
            options = options.handler(if addr.port() == 53 {
                names.server_on_connection_dst()
            } else {
                names.server_ips(vec![server.local_addr().to_string()])
            });
            _dns = Some(server);
        }
        let responder = endpoint(&args.endpoint.name, options);
        let labels = args.labels.unwrap_or_default();
        serve_endpoint(
            &args.endpoint,
            &responder,
            &args.service_names,
            &labels,
            &security,
            stop,
        )
        .await
    })
}
