//! `hello-endpoint`: write your own endpoint. It serves the network service `hello`
//! with point-to-point addresses, the NOOP mechanism and one handler of its own, and
//! stays registered with its node's manager until SIGTERM or SIGINT.
//!
//! It uses nsm-sdk and crates.io crates only (clap, tokio, tracing-subscriber): copy it
//! into the `src/main.rs` of a crate of your own and it builds.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use nsm_sdk::chains::{endpoint, EndpointOptions, Security};
use nsm_sdk::handlers::{mechanisms, noop_server, point_to_point};
use nsm_sdk::proto::{connection::Connection, networkservice::NetworkServiceRequest};
use nsm_sdk::serving::{serve_endpoint, stop_on_signal, ServeOptions, DEFAULT_MANAGER_URL};
use nsm_sdk::transport::Url;
use nsm_sdk::{async_trait, wire::types, Cx, Error, Handler, Next, Result};
use tracing_subscriber::EnvFilter;

/// Our own logic: refuse clients labelled `color=red`, greet the others with a label.
struct Greeter;

#[async_trait]
impl Handler for Greeter {
    async fn request(
        &self,
        cx: &mut Cx,
        mut req: NetworkServiceRequest,
        next: Next,
    ) -> Result<Connection> {
        let conn = req.connection.get_or_insert_with(Default::default);
        if conn.labels.get("color").is_some_and(|c| c == "red") {
            return Err(Error::PermissionDenied(
                "hello does not serve red clients".into(),
            ));
        }
        conn.labels.insert("greeting".into(), "hello".into());
        next.request(cx, req).await
    }
}

/// A tiny NSE serving `hello`, registered through its node's manager.
#[derive(clap::Parser)]
#[command(version)]
struct Args {
    /// Name of the endpoint (unique in the registry).
    #[arg(long, env = "NSM_NAME")]
    name: String,

    /// Where to listen (tcp://host:port or unix:///path); it registers this URL.
    #[arg(long, env = "NSM_LISTEN_ON", value_name = "URL")]
    listen_on: Url,

    /// The node manager to register through.
    #[arg(long, env = "NSM_CONNECT_TO", value_name = "URL", default_value = DEFAULT_MANAGER_URL)]
    connect_to: Url,

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
        eprintln!("hello-endpoint: bad log level {:?}", args.log_level);
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
            eprintln!("hello-endpoint: {e}");
            return ExitCode::from(2);
        }
    };

    let prefix = "169.254.0.0/16".parse().expect("a valid prefix");
    let hello = endpoint(
        &args.name,
        EndpointOptions::new()
            .security(&security)
            .handler(Greeter)
            .handler(point_to_point(vec![prefix]))
            .handler(mechanisms().with(types::NOOP, noop_server())),
    );
    let opts = ServeOptions::new(args.listen_on, args.connect_to)
        .security(&security)
        .network_service("hello");
    let outcome = match stop_on_signal() {
        Ok(stop) => serve_endpoint(&hello, opts, stop).await,
        Err(e) => Err(Error::internal(format!("cannot handle signals: {e}"))),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hello-endpoint: {e}");
            ExitCode::FAILURE
        }
    }
}
