//! `my-nsmgr`: a node manager with a handler of its own, inserted into nsm-sdk's manager
//! chain at a named place ([`NsmgrOptions::handler`]: right after `monitor`, before
//! the forwarder is picked) instead of copying the chain's body.
//!
//! The handler counts the Requests per network service and logs each one
//! (`request counted service=<name> requests=<n>`); the rest is the SDK's manager,
//! served like `nsmgr` until SIGTERM or SIGINT. Other places:
//! [`NsmgrOptions::after_begin`] (before this hop's token is set) and
//! [`NsmgrOptions::before_connect`] (the forwarder picked). It uses nsm-sdk and
//! crates.io crates only (clap, tokio, tokio-util, tracing, tracing-subscriber): it builds as the
//! `src/main.rs` of a crate of your own.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Parser;
use nsm_sdk::chains::{nsmgr, NsmgrOptions, Security};
use nsm_sdk::proto::{connection::Connection, networkservice::NetworkServiceRequest};
use nsm_sdk::serving::{stop_on_signal, DEFAULT_MANAGER_URL};
use nsm_sdk::transport::{serve, RegistryUrls, Url};
use nsm_sdk::{async_trait, Cx, Error, Handler, Next, Result};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use tracing_subscriber::EnvFilter;

// guide: begin
/// Counts Requests per network service (refreshes included). State: the counts.
#[derive(Clone, Default)]
struct CountPerService(Arc<Mutex<HashMap<String, u64>>>);

#[async_trait]
impl Handler for CountPerService {
    async fn request(
        &self,
        cx: &mut Cx,
        req: NetworkServiceRequest,
        next: Next,
    ) -> Result<Connection> {
        let service = req.conn().network_service.clone();
        let requests = {
            let mut counts = self.0.lock().unwrap_or_else(|p| p.into_inner());
            let n = counts.entry(service.clone()).or_default();
            *n += 1;
            *n
        };
        info!(service = %service, requests, "request counted");
        next.request(cx, req).await
    }
}

// guide: end

/// A node manager that counts Requests per network service.
#[derive(clap::Parser)]
#[command(version)]
struct Args {
    /// Name of the manager (its path segment).
    #[arg(long, env = "NSM_NAME", default_value = "nsmgr")]
    name: String,

    /// Where to listen: a unix socket, or a tcp URL with a fixed port (the manager
    /// registers its endpoints under this URL).
    #[arg(long, env = "NSM_LISTEN_ON", value_name = "URL", default_value = DEFAULT_MANAGER_URL)]
    listen_on: Url,

    /// The registry, or its replicas comma-separated (failed over in order).
    #[arg(long, env = "NSM_REGISTRY_URL", value_name = "URL,...")]
    registry_url: RegistryUrls,

    /// Log level or tracing filter directives; logs go to stderr.
    #[arg(
        long,
        env = "NSM_LOG_LEVEL",
        value_name = "LEVEL",
        default_value = "info"
    )]
    log_level: String,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let Ok(filter) = EnvFilter::try_new(&args.log_level) else {
        eprintln!("my-nsmgr: bad log level {:?}", args.log_level);
        return ExitCode::from(2);
    };
    let ansi = std::io::stderr().is_terminal();
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .init();
    // No identity files and no NSM_INSECURE=true: refuse to start (exit status 2).
    let security = match Security::from_env() {
        Ok(security) => security,
        Err(e) => {
            eprintln!("my-nsmgr: {e}");
            return ExitCode::from(2);
        }
    };
    match run(args, security).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("my-nsmgr: {e}");
            ExitCode::FAILURE
        }
    }
}

// guide: begin
async fn run(args: Args, security: Security) -> Result<()> {
    let stop = stop_on_signal().map_err(|e| Error::internal(format!("signals: {e}")))?;
    let counts = CountPerService::default();
    // Owns the manager's tasks (connections, registry watches): cancelled on the way out.
    let root = CancellationToken::new();
    let manager = nsmgr(
        NsmgrOptions::new(&args.name, args.listen_on.clone(), args.registry_url)
            .security(&security)
            .root(root.clone())
            .handler(counts.clone()),
    );
    let server = serve(&args.listen_on, manager.services()).await?;
    stop.cancelled().await;
    if tokio::time::timeout(Duration::from_secs(5), server.shutdown())
        .await
        .is_err()
    {
        warn!("calls still running after 5s; server killed");
    }
    root.cancel();
    let counts = counts.0.lock().unwrap_or_else(|p| p.into_inner()).clone();
    info!(?counts, "requests per network service");
    Ok(())
}
// guide: end
