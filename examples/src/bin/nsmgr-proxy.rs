//! `nsmgr-proxy`: a domain's border for Requests. Connections to endpoints of other
//! domains leave through it (to the other domain's nsmgr-proxy, found by DNS: SRV
//! `nsmgr-proxy.nsm-system.<domain>`), connections from other domains come in through
//! it (to the manager of the endpoint's node); tunnel addresses are swapped between the
//! nodes' internal and public addresses on the way (`NSM_ADDRESS_MAP`).

use std::process::ExitCode;

use nsm_examples::metrics::MetricsArgs;
use nsm_examples::{run, security, serve_all, shutdown_all, Common, DnsArgs, Failure};
use nsm_sdk::chains::{nsmgr_proxy, NsmgrProxyOptions};
use nsm_sdk::handlers::parse_address_map;
use nsm_sdk::transport::{RegistryUrls, Url};
use tokio_util::sync::CancellationToken;
use tracing::info;

/// The nsmgr-proxy of a domain.
#[derive(Debug, clap::Parser)]
#[command(version)]
struct Args {
    /// Name of the proxy (its path segment).
    #[arg(long, env = "NSM_NAME", default_value = "nsmgr-proxy")]
    name: String,

    /// The domain this proxy is the border of (its DNS suffix, e.g. `cluster1`).
    #[arg(long, env = "NSM_DOMAIN")]
    domain: String,

    /// Where to listen, comma-separated (a tcp URL with a fixed port).
    #[arg(
        long,
        env = "NSM_LISTEN_ON",
        value_name = "URL,...",
        value_delimiter = ','
    )]
    listen_on: Vec<Url>,

    /// The URL other domains reach this proxy at (what the SRV record
    /// `nsmgr-proxy.nsm-system.<domain>` and the registry proxy hand out); default the
    /// first NSM_LISTEN_ON URL.
    #[arg(long, env = "NSM_PUBLIC_URL", value_name = "URL")]
    public_url: Option<Url>,

    /// The domain's registry, or its replicas comma-separated.
    #[arg(long, env = "NSM_REGISTRY_URL", value_name = "URL,...")]
    registry_url: RegistryUrls,

    /// Internal=public address of each node, comma-separated
    /// (`10.0.0.2=198.51.100.2,...`): VXLAN tunnel ends crossing the border swap.
    #[arg(
        long,
        env = "NSM_ADDRESS_MAP",
        value_name = "IP=IP,...",
        default_value = ""
    )]
    address_map: String,

    #[command(flatten)]
    dns: DnsArgs,

    #[command(flatten)]
    metrics: MetricsArgs,

    #[command(flatten)]
    common: Common,
}

fn main() -> ExitCode {
    run(|args: Args, stop| async move {
        let public_url = match (&args.public_url, args.listen_on.first()) {
            (Some(url), _) => url.clone(),
            (None, Some(Url::Tcp { port, .. })) if *port != 0 => args.listen_on[0].clone(),
            _ => {
                return Err(Failure::config(
                    "NSM_PUBLIC_URL is needed unless the first NSM_LISTEN_ON URL is tcp with a fixed port",
                ))
            }
        };
        let addresses =
            parse_address_map(&args.address_map).map_err(|e| Failure::config(e.to_string()))?;
        let dns = args.dns.resolver()?;
        let security = security()?;
        let _metrics = args.metrics.serve().await?;
        info!(domain = %args.domain, %public_url, ?dns, "starting the nsmgr-proxy");
        let root = CancellationToken::new();
        let proxy = nsmgr_proxy(
            NsmgrProxyOptions::new(&args.name, &args.domain, public_url, args.registry_url, dns)
                .internal_urls(args.listen_on.clone())
                .addresses(addresses)
                .security(&security)
                .root(root.clone()),
        );
        let servers = serve_all(&args.listen_on, &proxy.services()).await?;
        stop.cancelled().await;
        shutdown_all(servers).await;
        root.cancel();
        Ok(())
    })
}
