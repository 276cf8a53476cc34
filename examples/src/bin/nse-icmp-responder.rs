//! `nse-icmp-responder`: an endpoint that gives each client a point-to-point pair of
//! addresses (the ICMP responder of NSM's examples; its data plane is NOOP for now).

use std::collections::HashMap;
use std::process::ExitCode;

use ipnet::IpNet;
use nsm_examples::{log_calls, parse_labels, run, serve_endpoint, EndpointArgs};
use nsm_sdk::chains::{endpoint, EndpointOptions};
use nsm_sdk::handlers::{mechanisms, noop_server, point_to_point};
use nsm_sdk::tools::types;

/// An endpoint serving the given network services: each connection gets a /32 (/128)
/// pair from the CIDR prefixes. It registers itself (and each network service the
/// registry does not know) through its manager, stays registered, and unregisters when
/// it stops. Mechanism: NOOP.
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
}

fn main() -> ExitCode {
    run(|args: Args, stop| async move {
        let responder = endpoint(
            &args.endpoint.name,
            EndpointOptions::new()
                .handler(log_calls())
                .handler(point_to_point(args.cidr_prefix))
                .handler(mechanisms().with(types::NOOP, noop_server())),
        );
        let labels = args.labels.unwrap_or_default();
        serve_endpoint(
            &args.endpoint,
            &responder,
            &args.service_names,
            &labels,
            stop,
        )
        .await
    })
}
