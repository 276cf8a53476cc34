//! [`serve_endpoint`] and [`serve_forwarder`]: serve a component, keep it registered
//! until the stop token is cancelled, then unregister and stop serving.

use nsm_proto::registry::{NetworkServiceEndpoint, NetworkServiceLabels};
use tokio_util::sync::CancellationToken;
use tracing::{info_span, warn, Instrument};

use super::options::ServeOptions;
use super::registration::{context, ensure_with, registered_until, registry_client, Patience};
use crate::chains::{Endpoint, Forwarder};
use crate::transport::{serve, Services, Url};
use crate::{Error, Result};

/// Runs `endpoint` until `stop` is cancelled: serves it on `opts`' `listen_on`,
/// registers each of its network services that the registry does not know yet,
/// registers the endpoint for them (each with `opts`' labels) through the manager at
/// `connect_to`, and keeps it registered (`registry_refresh`). When `stop` is cancelled
/// it unregisters, then stops serving (calls in flight get the shutdown timeout).
///
/// Startup retries: while the manager cannot be reached (it may be starting), the
/// registry calls are tried again for up to the startup timeout.
///
/// Fails with [`Error::InvalidArgument`] when `opts` names no network service, with
/// [`Error::Unavailable`] when `listen_on` cannot be served, and with the registry's
/// error (prefixed with what was being done) when registering fails for good. Nothing
/// it started is left running when it returns.
pub async fn serve_endpoint(
    endpoint: &Endpoint,
    opts: ServeOptions,
    stop: CancellationToken,
) -> Result<()> {
    if opts.network_services.is_empty() {
        return Err(Error::invalid(
            "an endpoint needs at least one network service",
        ));
    }
    let span = info_span!("serve_endpoint", endpoint = %endpoint.name());
    let entry = |url: &Url| NetworkServiceEndpoint {
        name: endpoint.name().to_string(),
        network_service_names: opts.network_services.clone(),
        network_service_labels: opts
            .network_services
            .iter()
            .map(|s| {
                let labels = NetworkServiceLabels {
                    labels: opts.labels.clone(),
                };
                (s.clone(), labels)
            })
            .collect(),
        url: url.to_string(),
        ..Default::default()
    };
    serve_registered(
        endpoint.services(),
        &opts,
        &opts.network_services,
        entry,
        &stop,
    )
    .instrument(span)
    .await
}

/// Runs `forwarder` until `stop` is cancelled: serves it on `opts`' `listen_on`,
/// registers it through its manager at `connect_to` as an endpoint of the `forwarder`
/// service (with the labels of its [`ForwarderOptions`](crate::chains::ForwarderOptions);
/// `opts`' network services and labels are not used), keeps it registered, and on stop
/// unregisters, then stops serving. Failures as for [`serve_endpoint`].
pub async fn serve_forwarder(
    forwarder: &Forwarder,
    opts: ServeOptions,
    stop: CancellationToken,
) -> Result<()> {
    let span = info_span!("serve_forwarder", forwarder = %forwarder.name());
    let entry = |url: &Url| forwarder.registration(url);
    serve_registered(forwarder.services(), &opts, &[], entry, &stop)
        .instrument(span)
        .await
}

/// Serves `services`, ensures `network_services`, registers `entry(url served)` until
/// `stop`, then stops serving.
async fn serve_registered(
    services: Services,
    opts: &ServeOptions,
    network_services: &[String],
    entry: impl FnOnce(&Url) -> NetworkServiceEndpoint,
    stop: &CancellationToken,
) -> Result<()> {
    let patience = Patience {
        call: opts.call_timeout,
        startup: opts.startup_timeout,
    };
    let server = serve(&opts.listen_on, services)
        .await
        .map_err(|e| context(e, &format!("cannot listen on {}", opts.listen_on)))?;
    let entry = entry(server.url());
    let registries = registry_client(&opts.channels, &opts.connect_to);
    let outcome = async {
        for service in network_services {
            if !ensure_with(&registries.ns, service, stop, patience).await? {
                return Ok(());
            }
        }
        registered_until(registries.nse.clone(), entry, stop, patience).await
    }
    .await;
    let url = server.url().clone();
    if tokio::time::timeout(opts.shutdown_timeout, server.shutdown())
        .await
        .is_err()
    {
        // The server was dropped half way through its shutdown: that kills it.
        warn!(url = %url, timeout = ?opts.shutdown_timeout, "calls still running; server killed");
    }
    outcome
}
