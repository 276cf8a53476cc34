//! Running an endpoint (NSE): its settings, serving it, registering it through its
//! node's manager, and a handler that logs each call.

use std::collections::HashMap;

use async_trait::async_trait;
use nsm_proto::connection::Connection;
use nsm_proto::networkservice::NetworkServiceRequest;
use nsm_proto::registry::{NetworkService, NetworkServiceEndpoint, NetworkServiceLabels};
use nsm_sdk::chains::Endpoint;
use nsm_sdk::registry::{Registries, RegistryChain};
use nsm_sdk::transport::{grpc_registry, Channels, Url};
use nsm_sdk::{Cx, Handler, Next};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::cli::{Common, DEFAULT_NSM_SOCKET};
use crate::process::{serve_all, shutdown_all, Failure};
use crate::registration::{ensure_network_service, registered_until};

/// The settings of every endpoint program.
#[derive(Debug, Clone, clap::Args)]
pub struct EndpointArgs {
    /// Name of the endpoint: its path segment and its registry entry (unique in the
    /// registry).
    #[arg(long, env = "NSM_NAME")]
    pub name: String,

    /// Where the endpoint listens (tcp://host:port or unix:///path); it registers
    /// this URL.
    #[arg(long, env = "NSM_LISTEN_ON", value_name = "URL")]
    pub listen_on: Url,

    /// The node manager to register through.
    #[arg(long, env = "NSM_CONNECT_TO", value_name = "URL", default_value = DEFAULT_NSM_SOCKET)]
    pub connect_to: Url,

    #[allow(missing_docs)]
    #[command(flatten)]
    pub common: Common,
}

/// Registry chains that talk to the registry served at `url` (a node manager's or the
/// registry's own).
pub fn registry_client(channels: &Channels, url: &Url) -> Registries {
    Registries {
        ns: RegistryChain::<NetworkService>::builder()
            .push(grpc_registry(channels.clone(), url.clone()))
            .build(),
        nse: RegistryChain::<NetworkServiceEndpoint>::builder()
            .push(grpc_registry(channels.clone(), url.clone()))
            .build(),
    }
}

/// Runs `endpoint` until `stop`: serves it on `args.listen_on`, registers each of
/// `services` that the registry does not know yet, registers the endpoint for them
/// (each with `labels`) through the manager at `args.connect_to` and keeps it
/// registered. When `stop` is cancelled it unregisters, then stops serving.
pub async fn serve_endpoint(
    args: &EndpointArgs,
    endpoint: &Endpoint,
    services: &[String],
    labels: &HashMap<String, String>,
    stop: CancellationToken,
) -> Result<(), Failure> {
    if services.is_empty() {
        return Err(Failure::config(
            "an endpoint needs at least one network service",
        ));
    }
    let registries = registry_client(&Channels::new(), &args.connect_to);
    let servers = serve_all(std::slice::from_ref(&args.listen_on), &endpoint.services()).await?;
    let entry = NetworkServiceEndpoint {
        name: endpoint.name().to_string(),
        network_service_names: services.to_vec(),
        network_service_labels: services
            .iter()
            .map(|s| {
                let labels = NetworkServiceLabels {
                    labels: labels.clone(),
                };
                (s.clone(), labels)
            })
            .collect(),
        url: servers[0].url().to_string(),
        ..Default::default()
    };
    let outcome = register_until(&registries, entry, &stop).await;
    shutdown_all(servers).await;
    outcome
}

async fn register_until(
    registries: &Registries,
    entry: NetworkServiceEndpoint,
    stop: &CancellationToken,
) -> Result<(), Failure> {
    for service in &entry.network_service_names {
        if !ensure_network_service(&registries.ns, service, stop).await? {
            return Ok(());
        }
    }
    registered_until(registries.nse.clone(), entry, stop).await
}

/// See [`log_calls`].
#[derive(Debug, Clone, Copy, Default)]
pub struct LogCalls;

/// A handler that logs each Request and Close at info level, with the connection id
/// this hop sees: `request received connection_id=...`, `close received
/// connection_id=...`. State: none.
pub fn log_calls() -> LogCalls {
    LogCalls
}

#[async_trait]
impl Handler for LogCalls {
    async fn request(
        &self,
        cx: &mut Cx,
        req: NetworkServiceRequest,
        next: Next,
    ) -> nsm_sdk::Result<Connection> {
        let (id, service) = req
            .connection
            .as_ref()
            .map(|c| (c.id.clone(), c.network_service.clone()))
            .unwrap_or_default();
        info!(connection_id = %id, service = %service, "request received");
        let out = next.request(cx, req).await;
        if let Err(e) = &out {
            warn!(connection_id = %id, error = %e, "request failed");
        }
        out
    }

    async fn close(&self, cx: &mut Cx, conn: Connection, next: Next) -> nsm_sdk::Result<()> {
        info!(connection_id = %conn.id, "close received");
        next.close(cx, conn).await
    }
}
