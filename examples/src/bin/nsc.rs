//! `nsc`: a network service client.

use std::process::ExitCode;
use std::time::Duration;

use nsm_examples::{parse_duration, print_connections, run, Common, Failure, DEFAULT_NSM_SOCKET};
use nsm_sdk::chains::{client, ClientOptions};
use nsm_sdk::handlers::{heal, noop_mechanism, HealOptions};
use nsm_sdk::proto::connection::Connection;
use nsm_sdk::proto::networkservice::NetworkServiceRequest;
use nsm_sdk::tools::{types, NsUrl};
use nsm_sdk::transport::Channels;
use nsm_sdk::transport::Url;
use nsm_sdk::{Chain, Cx};
use tracing::{info, warn};

/// A client: requests each network service through its node's manager, prints each
/// connection as one JSON line on stdout, keeps the connections until SIGTERM or
/// SIGINT, then closes them. Until the KERNEL mechanism exists every connection is
/// requested with the NOOP mechanism, whatever the NS URL's scheme says.
#[derive(Debug, clap::Parser)]
#[command(version)]
struct Args {
    /// Name of the client (its path segment).
    #[arg(long, env = "NSM_NAME", default_value = "nsc")]
    name: String,

    /// Its node's manager.
    #[arg(long, env = "NSM_CONNECT_TO", value_name = "URL", default_value = DEFAULT_NSM_SOCKET)]
    connect_to: Url,

    /// What to request: comma-separated NS URLs like kernel://icmp-responder/nsm-1?app=x
    /// (mechanism://network-service, an optional /interface-name, optional
    /// ?label=value&... labels). Requested as NOOP for now.
    #[arg(
        long,
        env = "NSM_NETWORK_SERVICES",
        value_name = "NS-URL,...",
        value_delimiter = ',',
        required = true
    )]
    network_services: Vec<NsUrl>,

    /// How long a Request (retries included) or a Close may take.
    #[arg(long, env = "NSM_REQUEST_TIMEOUT", value_name = "DURATION", default_value = "15s", value_parser = parse_duration)]
    request_timeout: Duration,

    #[command(flatten)]
    common: Common,
}

fn main() -> ExitCode {
    run(|args: Args, stop| async move {
        let nsc = client(
            ClientOptions::new(&args.name, args.connect_to)
                .retry(Some(args.request_timeout))
                .timeout(args.request_timeout)
                .handler(heal(HealOptions::new(Channels::new())))
                .handler(print_connections()),
        );
        let timeout = args.request_timeout;
        let mut connections = Vec::new();
        for url in &args.network_services {
            let req = request_for(url);
            let pending = Connection {
                id: req
                    .connection
                    .as_ref()
                    .map(|c| c.id.clone())
                    .unwrap_or_default(),
                ..Default::default()
            };
            let mut cx = Cx::client().with_timeout(timeout);
            let outcome = tokio::select! {
                outcome = nsc.request(&mut cx, req) => outcome,
                // Closing by id waits for the request still running behind `begin`.
                _ = stop.cancelled() => {
                    connections.push(pending);
                    break;
                }
            };
            match outcome {
                Ok(conn) => {
                    info!(url = %url, connection_id = %conn.id, "connected");
                    connections.push(conn);
                }
                Err(e) => {
                    close_all(&nsc, connections, timeout).await;
                    return Err(Failure::runtime(format!("request for {url} failed: {e}")));
                }
            }
        }
        stop.cancelled().await;
        close_all(&nsc, connections, timeout).await;
        Ok(())
    })
}

/// The request for `url`, with a connection id of its own (so that a stop during the
/// request can close it) and, for now, the NOOP mechanism.
fn request_for(url: &NsUrl) -> NetworkServiceRequest {
    let mut req = url.to_request();
    if url.mechanism_type() != types::NOOP {
        info!(
            url = %url,
            mechanism = url.mechanism_type(),
            "this mechanism is not implemented yet: requesting NOOP instead"
        );
    }
    req.mechanism_preferences = vec![noop_mechanism()];
    if let Some(conn) = req.connection.as_mut() {
        conn.id = uuid::Uuid::new_v4().to_string();
    }
    req
}

async fn close_all(nsc: &Chain, connections: Vec<Connection>, timeout: Duration) {
    for conn in connections {
        let id = conn.id.clone();
        match nsc
            .close(&mut Cx::client().with_timeout(timeout), conn)
            .await
        {
            Ok(()) => info!(connection_id = %id, "closed"),
            Err(e) => warn!(connection_id = %id, error = %e, "close failed"),
        }
    }
}
