//! `nsmgr`: a node's network service manager.

use std::process::ExitCode;

use nsm_examples::metrics::MetricsArgs;
use nsm_examples::{run, security, serve_all, shutdown_all, Common, Failure, DEFAULT_NSM_SOCKET};
use nsm_sdk::chains::{nsmgr, NsmgrOptions};
use nsm_sdk::transport::{RegistryUrls, Url};
use tokio_util::sync::CancellationToken;

/// The node manager: picks one of its node's forwarders for each client connection,
/// and is its node's registry front (local endpoints and forwarders register through
/// it; it stores them in the registry under its own URL).
#[derive(Debug, clap::Parser)]
#[command(version)]
struct Args {
    /// Name of the manager (its path segment).
    #[arg(long, env = "NSM_NAME", default_value = "nsmgr")]
    name: String,

    /// Where to listen, comma-separated. The first URL is the one the manager gives the
    /// registry for its endpoints, so other nodes must reach it there: put a tcp URL
    /// with a fixed port first in a multi-node mesh.
    #[arg(long, env = "NSM_LISTEN_ON", value_name = "URL,...", value_delimiter = ',', default_value = DEFAULT_NSM_SOCKET)]
    listen_on: Vec<Url>,

    /// The registry, or its replicas comma-separated: calls go to the first that answers
    /// and move to the next when one is unavailable.
    #[arg(long, env = "NSM_REGISTRY_URL", value_name = "URL,...")]
    registry_url: RegistryUrls,

    #[command(flatten)]
    metrics: MetricsArgs,

    #[command(flatten)]
    common: Common,
}

fn main() -> ExitCode {
    run(|args: Args, stop| async move {
        let own_url = match args.listen_on.first() {
            None => return Err(Failure::config("NSM_LISTEN_ON names no URL")),
            Some(Url::Tcp { port: 0, .. }) => return Err(Failure::config(
                "the first NSM_LISTEN_ON URL is what the manager registers: it needs a fixed port",
            )),
            Some(url) => url.clone(),
        };
        let security = security()?;
        let _metrics = args.metrics.serve().await?;
        let root = CancellationToken::new();
        let manager = nsmgr(
            NsmgrOptions::new(&args.name, own_url, args.registry_url)
                .security(&security)
                .root(root.clone()),
        );
        let servers = serve_all(&args.listen_on, &manager.services()).await?;
        stop.cancelled().await;
        shutdown_all(servers).await;
        root.cancel();
        Ok(())
    })
}
