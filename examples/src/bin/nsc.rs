//! `nsc`: a network service client.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use nsm_examples::{
    parse_duration, print_connections, run, security, Common, Failure, DEFAULT_NSM_SOCKET,
};
use nsm_sdk::chains::{client, ClientOptions};
use nsm_sdk::config::NsUrl;
use nsm_sdk::handlers::{heal, HealOptions};
use nsm_sdk::proto::connection::Connection;
use nsm_sdk::proto::json::{connection_to_json, from_json};
use nsm_sdk::proto::networkservice::NetworkServiceRequest;
use nsm_sdk::transport::Url;
use nsm_sdk::wire::params;
use nsm_sdk::{Chain, Cx};
use nsm_sdk_dns::{dns_context, ResolvConf};
use nsm_sdk_kernel::mechanism::own_netns_url;
use nsm_sdk_kernel::{kernel_client, kernel_liveness, preferences, MechanismChoice, PingOptions};
use tracing::{info, warn};

/// A client: requests each network service through its node's manager, prints each
/// connection as one JSON line on stdout, keeps the connections until SIGTERM or
/// SIGINT, then closes them. A connection that breaks (a hop or the endpoint dies) is
/// healed: re-requested, or reselected to another endpoint; a changed connection is
/// printed again.
///
/// The NS URL's scheme picks the mechanism. kernel://icmp-responder/nsm-1 asks for a
/// kernel interface nsm-1 in this process's network namespace
/// (`file:///proc/<pid>/ns/net`), made by the forwarder (kernel://icmp-responder gets a
/// generated name like icmp-respo-Xy3k), with NOOP offered second: a forwarder or
/// endpoint that cannot make KERNEL still connects, with NOOP (the printed
/// connection's mechanism says which). noop:// asks for NOOP (no data plane), and so
/// does any other scheme. With NSM_MECHANISM=noop every URL is
/// requested as NOOP: for a client outside any pod (KERNEL would put the interface
/// into the host's namespace) or across nodes (no tunnel exists).
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
    /// ?label=value&... labels). kernel:// is KERNEL (then NOOP), anything else NOOP.
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

    /// The mechanism to request: from-url (the NS URL's scheme: kernel:// is KERNEL
    /// with NOOP second, anything else NOOP) or noop (NOOP for every URL).
    #[arg(long, env = "NSM_MECHANISM", value_name = "CHOICE", value_enum, default_value_t = MechanismChoice::FromUrl)]
    mechanism: MechanismChoice,

    /// Data plane liveness check: none, or ping (every second, ping the endpoint's
    /// address of each KERNEL connection from this namespace; no reply within 400 ms
    /// reselects the connection).
    #[arg(long, env = "NSM_LIVENESS", value_name = "CHECK", value_enum, default_value_t = Liveness::None)]
    liveness: Liveness,

    /// The pod's named network namespace: the DNS configs of the connections go into
    /// /etc/netns/<NAME>/resolv.conf (what `ip netns exec <NAME>` bind-mounts over
    /// /etc/resolv.conf) while they last; the pod's own file comes back after
    /// (docs/DNS.md).
    #[arg(long, env = "NSM_DNS_NETNS", value_name = "NAME")]
    dns_netns: Option<String>,

    /// Init mode (an init container): request, print, write the connections to
    /// NSM_CONNECTIONS_FILE, then exit 0 leaving them in place, without Close. The
    /// connections live until their tokens expire (NSM_TOKEN_LIFETIME) unless a sidecar
    /// `nsc` takes them over (docs/NSC-INIT.md).
    #[arg(long, env = "NSM_INIT")]
    init: bool,

    /// The file that hands connections over from the init container to the sidecar
    /// (a shared volume): `nsc --init` writes its connections there, one JSON line each;
    /// a sidecar `nsc` with the same NSM_NAME and NSM_NETWORK_SERVICES re-requests those
    /// connections (same id and path: a refresh for every hop, no second interface),
    /// keeps the file up to date, and removes it once it has closed them.
    #[arg(long, env = "NSM_CONNECTIONS_FILE", value_name = "PATH")]
    connections_file: Option<PathBuf>,

    /// How long this client's path tokens live: a connection that nobody refreshes (the
    /// init container exited, no sidecar took it over) is closed by the mesh after that.
    #[arg(long, env = "NSM_TOKEN_LIFETIME", value_name = "DURATION", default_value = "10m", value_parser = parse_duration)]
    token_lifetime: Duration,

    #[command(flatten)]
    common: Common,
}

/// The data plane liveness check of heal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Liveness {
    /// Only the control plane (the next hop's monitor stream) tells heal.
    None,
    /// Pings the endpoint of each KERNEL connection.
    Ping,
}

fn main() -> ExitCode {
    run(|args: Args, stop| async move {
        let security = security()?;
        let channels = security.channels();
        let mut heal_options = HealOptions::new(channels.clone());
        if args.liveness == Liveness::Ping {
            heal_options = heal_options.liveness(kernel_liveness(PingOptions::new()));
        }
        let mut options = ClientOptions::new(&args.name, args.connect_to)
            .security(&security)
            .tokens(security.tokens(args.token_lifetime))
            .channels(channels)
            .retry(Some(args.request_timeout))
            .timeout(args.request_timeout)
            .mechanisms(vec![])
            .handler(heal(heal_options))
            .handler(print_connections())
            .handler(kernel_client(own_netns_url()).only_when_offered());
        if let Some(pod) = &args.dns_netns {
            let resolv_conf = ResolvConf::netns(pod).map_err(|e| Failure::config(e.to_string()))?;
            options = options.handler(dns_context().apply_to(resolv_conf));
        }
        let nsc = client(options);
        let timeout = args.request_timeout;
        let mut connections = Vec::new();
        let mut saved = match &args.connections_file {
            Some(path) if !args.init => read_connections(path)?,
            _ => Vec::new(),
        };
        for url in &args.network_services {
            let req = match take_saved(&mut saved, url) {
                Some(conn) => {
                    info!(url = %url, connection_id = %conn.id, "taking over the connection");
                    takeover_request(url, args.mechanism, conn)
                }
                None => request_for(url, args.mechanism),
            };
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
        if let Some(path) = &args.connections_file {
            write_connections(path, &connections)?;
        }
        if args.init && !stop.is_cancelled() {
            info!("init mode: connections left in place");
            return Ok(());
        }
        stop.cancelled().await;
        close_all(&nsc, connections, timeout).await;
        if let Some(path) = &args.connections_file {
            if let Err(e) = std::fs::remove_file(path) {
                warn!(path = %path.display(), error = %e, "cannot remove the connections file");
            }
        }
        Ok(())
    })
}

/// The request for `url`, with a connection id of its own (so that a stop during the
/// request can close it) and the mechanism preferences `choice` gives.
fn request_for(url: &NsUrl, choice: MechanismChoice) -> NetworkServiceRequest {
    let mut req = url.to_request();
    req.mechanism_preferences = preferences(url, choice);
    if let Some(conn) = req.connection.as_mut() {
        conn.id = uuid::Uuid::new_v4().to_string();
    }
    req
}

/// The connections an init container left in `path` (none when it does not exist).
fn read_connections(path: &Path) -> Result<Vec<Connection>, Failure> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(Failure::config(format!(
                "cannot read the connections file {}: {e}",
                path.display()
            )))
        }
    };
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            from_json::<Connection>("connection.Connection", l)
                .map_err(|e| Failure::config(format!("connections file {}: {e}", path.display())))
        })
        .collect()
}

/// Writes `connections` to `path`, one JSON line each, through a temporary file renamed
/// into place (a reader never sees half a file).
fn write_connections(path: &Path, connections: &[Connection]) -> Result<(), Failure> {
    let mut text = String::new();
    for conn in connections {
        text.push_str(&connection_to_json(conn));
        text.push('\n');
    }
    let mut staging = path.as_os_str().to_owned();
    staging.push(".tmp");
    std::fs::write(&staging, text)
        .and_then(|()| std::fs::rename(&staging, path))
        .map_err(|e| {
            Failure::runtime(format!(
                "cannot write the connections file {}: {e}",
                path.display()
            ))
        })
}

/// The saved connection for `url`: the first left of its network service.
fn take_saved(saved: &mut Vec<Connection>, url: &NsUrl) -> Option<Connection> {
    let service = url.to_request().connection?.network_service;
    let at = saved.iter().position(|c| c.network_service == service)?;
    Some(saved.remove(at))
}

/// The request that takes over `conn` (made by another process of this pod): the same
/// id and path, so every hop sees a refresh; its KERNEL mechanism names this process's
/// namespace (the same namespace: the init process that named it is gone).
fn takeover_request(
    url: &NsUrl,
    choice: MechanismChoice,
    mut conn: Connection,
) -> NetworkServiceRequest {
    if let Some(m) = conn.mechanism.as_mut() {
        if m.parameters.contains_key(params::INODE_URL) {
            m.parameters
                .insert(params::INODE_URL.into(), own_netns_url());
        }
    }
    NetworkServiceRequest {
        connection: Some(conn),
        mechanism_preferences: preferences(url, choice),
    }
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
