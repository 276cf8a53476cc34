//! `nse-firewall`: a firewall in a service chain. Each connection it gets is passed on
//! to the same network service with its labels (so the service's matches send it to
//! the next hop, a VPN gateway in the showcase), its two interfaces joined in a bridge
//! of the connection, and what crosses the bridges filtered by an access list with
//! nftables (see the library's `firewall` module for the rules' syntax).

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;

use nsm_examples::{
    apply_acl, firewall, parse_labels, register_services, remove_acl, run, security,
    serve_endpoint, Acl, EndpointArgs, Failure, ServiceFileArgs,
};
use nsm_sdk::chains::{ClientOptions, EndpointOptions};
use nsm_sdk_kernel::mechanism::own_netns_url;
use nsm_sdk_kernel::NetNs;
use tracing::{info, warn};

/// A bump-in-the-wire endpoint: registers for its network service with its labels,
/// requests the same service downstream with the same labels, bridges the two
/// interfaces of each connection in its namespace and filters them with the access
/// list (nftables, `bridge` family; `nft` must be installed).
#[derive(Debug, clap::Parser)]
#[command(version)]
struct Args {
    #[command(flatten)]
    endpoint: EndpointArgs,

    #[command(flatten)]
    service_file: ServiceFileArgs,

    /// The network service it serves and passes on.
    #[arg(long, env = "NSM_SERVICE_NAME", value_name = "NAME")]
    service_name: String,

    /// Its labels for the service, also the labels of its downstream requests.
    #[arg(long, env = "NSM_LABELS", value_name = "K=V,...", value_parser = parse_labels, default_value = "app=firewall")]
    labels: HashMap<String, String>,

    /// The access list, rules separated by ';' (e.g. "allow icmp; allow tcp 5201;
    /// default deny"). Without it and NSM_ACL_FILE everything passes.
    #[arg(
        long,
        env = "NSM_ACL",
        value_name = "RULES",
        conflicts_with = "acl_file"
    )]
    acl: Option<Acl>,

    /// A file holding the access list, one rule per line.
    #[arg(long, env = "NSM_ACL_FILE", value_name = "PATH")]
    acl_file: Option<PathBuf>,
}

fn acl(args: &Args) -> Result<Acl, Failure> {
    match (&args.acl, &args.acl_file) {
        (Some(acl), _) => Ok(acl.clone()),
        (None, Some(path)) => std::fs::read_to_string(path)
            .map_err(|e| e.to_string())
            .and_then(|text| text.parse())
            .map_err(|e| Failure::config(format!("{}: {e}", path.display()))),
        (None, None) => Ok(Acl::default()),
    }
}

fn main() -> ExitCode {
    run(|args: Args, stop| async move {
        let security = security()?;
        let acl = acl(&args)?;
        let services = args.service_file.load()?;
        if !register_services(&args.endpoint.connect_to, &services, &security, &stop).await? {
            return Ok(());
        }
        let ns = NetNs::current().map_err(|e| Failure::runtime(e.to_string()))?;
        apply_acl(&ns, &acl).await.map_err(Failure::runtime)?;
        info!(rules = acl.rules.len(), default = ?acl.default, "access list installed");
        let name = &args.endpoint.name;
        let client = ClientOptions::new(format!("{name}-client"), args.endpoint.connect_to.clone())
            .security(&security)
            .retry(None);
        let fw = firewall(
            name,
            &own_netns_url(),
            args.labels.clone(),
            EndpointOptions::new().security(&security),
            client,
        );
        let services = [args.service_name.clone()];
        let outcome = serve_endpoint(
            &args.endpoint,
            &fw,
            &services,
            &args.labels,
            &security,
            stop,
        )
        .await;
        if let Err(e) = remove_acl(&ns).await {
            warn!(error = %e, "removing the access list failed");
        }
        outcome
    })
}
