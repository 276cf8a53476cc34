//! Running an endpoint (NSE) program: its settings, and a handler that logs each call.
//! Serving and staying registered are nsm-sdk's
//! ([`nsm_sdk::serving::serve_endpoint`]); this module maps the settings onto it.

use std::collections::HashMap;

use async_trait::async_trait;
use nsm_proto::connection::Connection;
use nsm_proto::networkservice::NetworkServiceRequest;
use nsm_sdk::chains::{Endpoint, Security};
use nsm_sdk::serving::ServeOptions;
use nsm_sdk::transport::Url;
use nsm_sdk::{Cx, Handler, Next};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::cli::{Common, DEFAULT_NSM_SOCKET};
use crate::process::Failure;

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

impl EndpointArgs {
    /// The SDK's serving options for these settings: serving `services`, registered
    /// with `labels`.
    pub fn serve_options(
        &self,
        services: &[String],
        labels: &HashMap<String, String>,
        security: &Security,
    ) -> ServeOptions {
        ServeOptions::new(self.listen_on.clone(), self.connect_to.clone())
            .security(security)
            .network_services(services.iter().cloned())
            .labels(labels.clone())
    }
}

/// Runs `endpoint` until `stop` with nsm-sdk's
/// [`serve_endpoint`](nsm_sdk::serving::serve_endpoint): serves it on `args.listen_on`,
/// registers `services` and the endpoint (each with `labels`) through the manager at
/// `args.connect_to`, keeps it registered, and unregisters when `stop` is cancelled.
/// No network service is a configuration failure.
pub async fn serve_endpoint(
    args: &EndpointArgs,
    endpoint: &Endpoint,
    services: &[String],
    labels: &HashMap<String, String>,
    security: &Security,
    stop: CancellationToken,
) -> Result<(), Failure> {
    if services.is_empty() {
        return Err(Failure::config(
            "an endpoint needs at least one network service",
        ));
    }
    let opts = args.serve_options(services, labels, security);
    Ok(nsm_sdk::serving::serve_endpoint(endpoint, opts, stop).await?)
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
