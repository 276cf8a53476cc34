//! `nsm-registry-proxy`: a domain's registry proxy. The domain's registry sends it what
//! names another domain (`name@domain`, `NSM_REGISTRY_PROXY_URL` of `nsm-registry`); it
//! finds that domain's registry by DNS (SRV `registry.nsm-system.<domain>`), forwards
//! with `@domain` stripped and adds it back to what comes back.

use std::process::ExitCode;

use nsm_examples::metrics::MetricsArgs;
use nsm_examples::{run, security, serve_all, shutdown_all, Common, DnsArgs};
use nsm_sdk::chains::registry_proxy_server;
use nsm_sdk::transport::Url;
use tracing::info;

/// The registry proxy of a domain.
#[derive(Debug, clap::Parser)]
#[command(version)]
struct Args {
    /// Where to listen: tcp://host:port or unix:///path.
    #[arg(long, env = "NSM_LISTEN_ON", value_name = "URL")]
    listen_on: Url,

    /// The public URL of the domain's nsmgr-proxy: what other domains' endpoints are
    /// handed out with, and what this domain's endpoints register into floating
    /// registries with.
    #[arg(long, env = "NSM_NSMGR_PROXY_URL", value_name = "URL")]
    nsmgr_proxy_url: Option<Url>,

    #[command(flatten)]
    dns: DnsArgs,

    #[command(flatten)]
    metrics: MetricsArgs,

    #[command(flatten)]
    common: Common,
}

fn main() -> ExitCode {
    run(|args: Args, stop| async move {
        let security = security()?;
        let dns = args.dns.resolver()?;
        info!(?dns, nsmgr_proxy = ?args.nsmgr_proxy_url, "starting the registry proxy");
        let _metrics = args.metrics.serve().await?;
        let proxy = registry_proxy_server(dns, security.channels(), args.nsmgr_proxy_url.as_ref());
        let servers = serve_all(&[args.listen_on], &security.serve(proxy.services())).await?;
        stop.cancelled().await;
        shutdown_all(servers).await;
        Ok(())
    })
}
