//! `nsm-registry`: the registry of network services and endpoints, in memory.

use std::process::ExitCode;
use std::time::Duration;

use nsm_examples::metrics::MetricsArgs;
use nsm_examples::{parse_duration, run, security, serve_all, shutdown_all, Common};
use nsm_sdk::transport::Url;
use tracing::info;

/// The NSM registry: network services and endpoints in memory; endpoints that are not
/// refreshed expire.
#[derive(Debug, clap::Parser)]
#[command(version)]
struct Args {
    /// Where to listen: tcp://host:port or unix:///path.
    #[arg(long, env = "NSM_LISTEN_ON", value_name = "URL")]
    listen_on: Url,

    /// How long an endpoint stays registered without a refresh (60s, 1m30s, ...).
    #[arg(long, env = "NSM_EXPIRE_AFTER", value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
    expire_after: Duration,

    #[command(flatten)]
    metrics: MetricsArgs,

    #[command(flatten)]
    common: Common,
}

fn main() -> ExitCode {
    run(|args: Args, stop| async move {
        info!(expire_after = ?args.expire_after, "starting the registry");
        let security = security()?;
        let _metrics = args.metrics.serve().await?;
        let registry = security.registry_server(args.expire_after);
        let services = security.serve(registry.services());
        let servers = serve_all(&[args.listen_on], &services).await?;
        stop.cancelled().await;
        shutdown_all(servers).await;
        Ok(())
    })
}
