//! `nsm-registry`: the registry of network services and endpoints, in memory or, with
//! `NSM_ETCD_ENDPOINTS` (feature `etcd`), in etcd, shared by every replica on it.

use std::process::ExitCode;
use std::time::Duration;

use nsm_examples::metrics::MetricsArgs;
use nsm_examples::{parse_duration, run, security, serve_all, shutdown_all, Common, Failure};
use nsm_sdk::chains::Store;
use nsm_sdk::transport::{grpc_registries, Url};
use tracing::info;

/// The NSM registry: network services and endpoints in memory, or in etcd with
/// `NSM_ETCD_ENDPOINTS` (then `NSM_ETCD_PREFIX`, default `/nsm/`, and TLS to etcd with
/// `NSM_ETCD_CA`, `NSM_ETCD_CERT`, `NSM_ETCD_KEY`); endpoints that are not refreshed
/// expire.
#[derive(Debug, clap::Parser)]
#[command(version)]
struct Args {
    /// Where to listen: tcp://host:port or unix:///path, or several comma-separated
    /// (e.g. a unix socket for the nodes and a TCP port for other domains).
    #[arg(
        long,
        env = "NSM_LISTEN_ON",
        value_name = "URL,...",
        value_delimiter = ',',
        required = true
    )]
    listen_on: Vec<Url>,

    /// How long an endpoint stays registered without a refresh (60s, 1m30s, ...).
    #[arg(long, env = "NSM_EXPIRE_AFTER", value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
    expire_after: Duration,

    /// The domain's registry proxy: entries and queries naming another domain
    /// (`name@domain`) go there.
    #[arg(long, env = "NSM_REGISTRY_PROXY_URL", value_name = "URL")]
    registry_proxy_url: Option<Url>,

    /// With NSM_ETCD_ENDPOINTS: how long etcd may take to answer at start.
    #[arg(long, env = "NSM_ETCD_CONNECT_TIMEOUT", value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    etcd_connect_timeout: Duration,

    #[command(flatten)]
    metrics: MetricsArgs,

    #[command(flatten)]
    common: Common,
}

/// Where the entries are kept: etcd when `NSM_ETCD_ENDPOINTS` says so (exit 2 for a
/// configuration that cannot work, 1 when etcd does not answer), else memory.
#[cfg(feature = "etcd")]
async fn store(connect_timeout: Duration) -> Result<Store, Failure> {
    use nsm_sdk::registry::{Etcd, EtcdConfig};
    let config = EtcdConfig::from_env().map_err(|e| Failure::config(e.to_string()))?;
    let Some(config) = config else {
        return Ok(Store::Memory);
    };
    let etcd = Etcd::connect(&config, connect_timeout)
        .await
        .map_err(|e| match e {
            nsm_sdk::Error::InvalidArgument(m) => Failure::config(m),
            e => Failure::runtime(format!("cannot use etcd: {e}")),
        })?;
    info!(endpoints = %config.endpoints.join(","), prefix = %config.prefix, "registry on etcd");
    Ok(Store::Etcd(etcd))
}

#[cfg(not(feature = "etcd"))]
async fn store(_connect_timeout: Duration) -> Result<Store, Failure> {
    match std::env::var("NSM_ETCD_ENDPOINTS") {
        Ok(v) if !v.trim().is_empty() => Err(Failure::config(
            "NSM_ETCD_ENDPOINTS is set but this nsm-registry was built without the etcd feature",
        )),
        _ => Ok(Store::Memory),
    }
}

fn main() -> ExitCode {
    run(|args: Args, stop| async move {
        info!(expire_after = ?args.expire_after, "starting the registry");
        let security = security()?;
        let store = store(args.etcd_connect_timeout).await?;
        let _metrics = args.metrics.serve().await?;
        let mut registry = security.registry_server_on(store, args.expire_after);
        if let Some(proxy) = args.registry_proxy_url {
            info!(%proxy, "interdomain names go to the registry proxy");
            registry = registry.route_interdomain(grpc_registries(security.channels(), proxy));
        }
        let services = security.serve(registry.services());
        let servers = serve_all(&args.listen_on, &services).await?;
        stop.cancelled().await;
        shutdown_all(servers).await;
        Ok(())
    })
}
