//! `nse-vpn-gateway`: the end of the showcase's service chain. Each client gets a
//! point-to-point pair of addresses and a route to the corporate networks behind the
//! gateway, which forwards there from its namespace with masquerading.

use std::collections::HashMap;
use std::process::ExitCode;

use ipnet::IpNet;
use nsm_examples::{
    parse_labels, register_services, route_to_corporate, run, security, serve_endpoint,
    stop_routing, vpn_gateway, EndpointArgs, Failure, ServiceFileArgs,
};
use nsm_sdk::chains::EndpointOptions;
use nsm_sdk_kernel::mechanism::own_netns_url;
use nsm_sdk_kernel::NetNs;
use tracing::warn;

/// A VPN gateway endpoint: KERNEL connections with a /32 (/128) pair from the CIDR
/// prefixes and a route to each corporate prefix through the gateway; IP forwarding
/// on in its namespace and masquerading towards the corporate prefixes (`nft` must be
/// installed), so the corporate hosts need no route back.
#[derive(Debug, clap::Parser)]
#[command(version)]
struct Args {
    #[command(flatten)]
    endpoint: EndpointArgs,

    #[command(flatten)]
    service_file: ServiceFileArgs,

    /// The network services it serves, comma-separated.
    #[arg(
        long,
        env = "NSM_SERVICE_NAMES",
        value_name = "NAME,...",
        value_delimiter = ',',
        required = true
    )]
    service_names: Vec<String>,

    /// Labels of the endpoint for each of its services.
    #[arg(long, env = "NSM_LABELS", value_name = "K=V,...", value_parser = parse_labels, default_value = "app=vpn-gateway")]
    labels: HashMap<String, String>,

    /// The prefixes it hands addresses out of, comma-separated.
    #[arg(
        long,
        env = "NSM_CIDR_PREFIX",
        value_name = "CIDR,...",
        value_delimiter = ',',
        default_value = "169.254.0.0/16"
    )]
    cidr_prefix: Vec<IpNet>,

    /// The corporate networks behind it, comma-separated (e.g. 10.60.0.0/24).
    #[arg(
        long,
        env = "NSM_CORPORATE_PREFIX",
        value_name = "CIDR,...",
        value_delimiter = ',',
        required = true
    )]
    corporate_prefix: Vec<IpNet>,
}

fn main() -> ExitCode {
    run(|args: Args, stop| async move {
        let security = security()?;
        let services = args.service_file.load()?;
        if !register_services(&args.endpoint.connect_to, &services, &security, &stop).await? {
            return Ok(());
        }
        let ns = NetNs::current().map_err(|e| Failure::runtime(e.to_string()))?;
        route_to_corporate(&ns, &args.corporate_prefix)
            .await
            .map_err(Failure::runtime)?;
        let gateway = vpn_gateway(
            &args.endpoint.name,
            &own_netns_url(),
            args.cidr_prefix.clone(),
            args.corporate_prefix.clone(),
            EndpointOptions::new().security(&security),
        );
        let outcome = serve_endpoint(
            &args.endpoint,
            &gateway,
            &args.service_names,
            &args.labels,
            &security,
            stop,
        )
        .await;
        if let Err(e) = stop_routing(&ns).await {
            warn!(error = %e, "removing the masquerading failed");
        }
        outcome
    })
}
