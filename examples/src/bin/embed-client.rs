//! `embed-client`: an application that uses a network service through nsm-sdk's client
//! chain, without the `nsc` program.
//!
//! It requests one network service from its node's manager (NOOP mechanism), and
//! follows its connection: the SDK's `refresh` re-requests it before its tokens expire
//! and `heal` re-requests (or reselects) it when a hop or the endpoint goes away; both
//! re-enter the chain right after `begin`, where the application's handler
//! ([`ClientOptions::handler`]) sees each answer and tells the application's main loop.
//! On SIGTERM or SIGINT it closes the connection and exits 0.
//!
//! It prints one line per event on stdout: `connected <id> endpoint=<name>`,
//! `refreshed <id>`, `healed <id> endpoint=<name>` (the endpoint changed), and
//! `closed <id>`. It uses nsm-sdk and crates.io crates only (clap, tokio, tokio-util,
//! tracing, tracing-subscriber): it builds as the `src/main.rs` of a crate of your own.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use nsm_sdk::chains::{client, ClientOptions, Security};
use nsm_sdk::config::NsUrl;
use nsm_sdk::handlers::{heal, HealOptions};
use nsm_sdk::proto::{connection::Connection, networkservice::NetworkServiceRequest};
use nsm_sdk::serving::{stop_on_signal, DEFAULT_MANAGER_URL};
use nsm_sdk::transport::Url;
use nsm_sdk::{async_trait, Cx, Error, Handler, Next, Result};
use tokio::sync::mpsc;
use tracing_subscriber::EnvFilter;

/// How long a Request (retries included) or the Close may take.
const TIMEOUT: Duration = Duration::from_secs(15);

/// What the chain tells the main loop.
#[derive(Debug)]
enum Event {
    /// A Request was answered (the first one, a refresh or a heal), by `endpoint`.
    Answered { id: String, endpoint: String },
}

/// The application's handler: after `begin`, it sees the first Request and every
/// refresh and heal, and sends each answer to the main loop. State: none (the main loop
/// keeps what it was told).
struct Follow(mpsc::UnboundedSender<Event>);

#[async_trait]
impl Handler for Follow {
    async fn request(
        &self,
        cx: &mut Cx,
        req: NetworkServiceRequest,
        next: Next,
    ) -> Result<Connection> {
        let conn = next.request(cx, req).await?;
        let endpoint = conn
            .path
            .as_ref()
            .and_then(|p| p.path_segments.last())
            .map(|s| s.name.clone())
            .unwrap_or_default();
        // The main loop may be gone while the connection closes: nothing to tell then.
        let _ = self.0.send(Event::Answered {
            id: conn.id.clone(),
            endpoint,
        });
        Ok(conn)
    }
}

/// Requests a network service through the node's manager and keeps the connection
/// until SIGTERM or SIGINT.
#[derive(clap::Parser)]
#[command(version)]
struct Args {
    /// Name of the client (its path segment).
    #[arg(long, env = "NSM_NAME", default_value = "embed-client")]
    name: String,

    /// Its node's manager.
    #[arg(long, env = "NSM_CONNECT_TO", value_name = "URL", default_value = DEFAULT_MANAGER_URL)]
    connect_to: Url,

    /// The network service to use, as an NS URL (noop://service?label=value).
    #[arg(long, env = "NSM_NETWORK_SERVICE", value_name = "NS-URL")]
    network_service: NsUrl,

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
        eprintln!("embed-client: bad log level {:?}", args.log_level);
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
            eprintln!("embed-client: {e}");
            return ExitCode::from(2);
        }
    };
    match run(args, security).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("embed-client: {e}");
            ExitCode::FAILURE
        }
    }
}

// guide: begin
async fn run(args: Args, security: Security) -> Result<()> {
    let stop = stop_on_signal().map_err(|e| Error::internal(format!("signals: {e}")))?;
    let (events, mut answers) = mpsc::unbounded_channel();
    let channels = security.channels();
    let nsc = client(
        ClientOptions::new(&args.name, args.connect_to)
            .security(&security)
            .channels(channels.clone())
            .retry(Some(TIMEOUT))
            .timeout(TIMEOUT)
            .handler(heal(HealOptions::new(channels)))
            .handler(Follow(events)),
    );
    let mut req = args.network_service.to_request();
    // An id of our own, so that a stop during the Request can close what it made.
    let id = format!("{}-{}", args.name, std::process::id());
    req.connection.get_or_insert_with(Default::default).id = id.clone();
    let mut cx = Cx::client().with_timeout(TIMEOUT);
    let conn = tokio::select! {
        conn = nsc.request(&mut cx, req) => conn?,
        _ = stop.cancelled() => Connection { id, ..Default::default() },
    };
    // The endpoint of the last answer: a change is a heal to another endpoint.
    let mut last: Option<String> = None;
    while !stop.is_cancelled() {
        tokio::select! {
            _ = stop.cancelled() => {}
            Some(Event::Answered { id, endpoint }) = answers.recv() => {
                match last.as_deref() {
                    None => println!("connected {id} endpoint={endpoint}"),
                    Some(e) if e == endpoint => println!("refreshed {id}"),
                    Some(_) => println!("healed {id} endpoint={endpoint}"),
                }
                last = Some(endpoint);
            }
        }
    }
    let id = conn.id.clone();
    nsc.close(&mut Cx::client().with_timeout(TIMEOUT), conn)
        .await?;
    println!("closed {id}");
    Ok(())
}
// guide: end
