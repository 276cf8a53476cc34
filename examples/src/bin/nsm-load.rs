//! `nsm-load`: N client connections against a mesh, refreshing for a while, then closed;
//! prints what it took.

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use nsm_examples::load::{run_load, write_json, LoadMechanism, LoadOptions, Target};
use nsm_examples::metrics::parse_metrics_url;
use nsm_examples::{
    parse_duration, parse_labels, parse_worker_threads, run, security, Common, Failure,
};
use nsm_sdk::chains::Security;
use nsm_sdk::sandbox::Transport;
use nsm_sdk::transport::Url;

/// A load tool: sets up N connections (NOOP, or KERNEL with --mechanism kernel) from one client (at most --concurrency
/// Requests in flight), keeps them refreshing for --duration (the client's tokens live
/// --token-lifetime, so each connection refreshes every 20 to 40 % of it), then closes
/// them. A progress line is drawn on stderr; the summary goes to stdout and, with
/// --json, to a file: setup and close latency (p50/p90/p99/max), errors by gRPC code,
/// refreshes per second, heal events, and RSS/fds/threads/CPU/tasks of each process
/// whose metrics it reads at each stage (idle, start, after_setup, end_of_soak,
/// after_close).
///
/// The mesh: --processes starts nsm-registry, nsmgr, nsm-forwarder and
/// nse-icmp-responder (NOOP) from --bin-dir on unix sockets in a temporary directory,
/// each serving its metrics; --sandbox runs a whole mesh in this process; --connect-to
/// loads a running mesh through its manager (give its processes' metrics with
/// --metrics).
///
/// At the end of the run the started programs get SIGTERM and 5 s to exit; the summary
/// says how each one ended.
///
/// Exit status 0 when every operation succeeded (and every started program stopped with
/// exit 0), 1 when any failed (the summary says which), 2 for a bad configuration.
/// SIGINT or SIGTERM cuts the soak short; the connections are still closed and the
/// summary printed.
#[derive(Debug, clap::Parser)]
#[command(version)]
#[command(group(clap::ArgGroup::new("mesh").required(true).args(["sandbox", "processes", "connect_to"])))]
struct Args {
    /// Run the whole mesh in this process (one node, NOOP endpoint).
    #[arg(long)]
    sandbox: bool,

    /// Transport of the sandbox: memory or unix.
    #[arg(long, value_name = "T", default_value = "memory", value_parser = parse_transport)]
    sandbox_transport: Transport,

    /// Start the example programs as child processes (see --bin-dir).
    #[arg(long)]
    processes: bool,

    /// Where the example programs are (default: this program's directory).
    #[arg(long, env = "NSM_LOAD_BIN_DIR", value_name = "DIR")]
    bin_dir: Option<PathBuf>,

    /// Log level of the started programs (their logs are in the temporary directory).
    #[arg(long, value_name = "LEVEL", default_value = "warn")]
    mesh_log_level: String,

    /// Worker threads of the started programs (default: theirs).
    #[arg(long, value_name = "N", value_parser = parse_worker_threads)]
    mesh_worker_threads: Option<usize>,

    /// Keep the temporary directory of the started programs (their logs).
    #[arg(long)]
    keep_dir: bool,

    /// Start the programs and run the client without security (NSM_INSECURE=true), to
    /// compare. By default they run with a throw-away CA: an SVID each, mTLS, signed
    /// tokens, policies. Against a running mesh (--connect-to) the client's security
    /// comes from NSM_TLS_CERT, NSM_TLS_KEY, NSM_TLS_CA or NSM_INSECURE=true.
    #[arg(long)]
    insecure: bool,

    /// Load a running mesh through this manager.
    #[arg(long, env = "NSM_CONNECT_TO", value_name = "URL")]
    connect_to: Option<Url>,

    /// Metrics endpoints to read at each stage: name=URL (URL as for
    /// NSM_METRICS_LISTEN_ON), repeated or comma-separated.
    #[arg(long, value_name = "NAME=URL", value_delimiter = ',', value_parser = parse_named_url)]
    metrics: Vec<(String, Url)>,

    /// How many connections.
    #[arg(long, default_value_t = 1000)]
    clients: usize,

    /// How many Requests (and Closes) in flight at once (default: all of them).
    #[arg(long)]
    concurrency: Option<usize>,

    /// How long the connections are kept refreshing.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    duration: Duration,

    /// How long the client's path tokens live. Keep it well above the setup latency:
    /// the manager closes a connection at half its caller's token life when no refresh
    /// came, and the first refresh comes 20 to 40 % of the time left after the answer.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
    token_lifetime: Duration,

    /// The network service requested.
    #[arg(long, default_value = "icmp-responder")]
    network_service: String,

    /// Labels of the requests: key=value,key=value.
    #[arg(long, value_name = "K=V,...", value_parser = parse_labels)]
    labels: Option<HashMap<String, String>>,

    /// How long a Request (retries included) or a Close may take.
    #[arg(long, value_name = "DURATION", default_value = "15s", value_parser = parse_duration)]
    request_timeout: Duration,

    /// No heal in the client chain (no monitor stream per connection).
    #[arg(long)]
    no_heal: bool,

    /// Heal without wake-ups: each broken connection waits out its whole backoff even
    /// after another one healed (to compare with the default).
    #[arg(long)]
    no_heal_wake_up: bool,

    /// The mechanism: noop, or kernel (an interface nsm-1 in a namespace of each
    /// client's own, nsmt-<pid>-<n>, made and deleted by this program; needs root and
    /// ip; with --processes the endpoint gets a namespace too; not with --sandbox).
    #[arg(long, value_enum, default_value_t = LoadMechanism::Noop)]
    mechanism: LoadMechanism,

    /// Pause after the Closes before the last sample.
    #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = parse_duration)]
    settle: Duration,

    /// With --processes: rewrite every started program's and this client's identity
    /// files with new SVIDs this often during the soak (certificate rotation under
    /// load; the report counts rotations and checks the manager serves the newest).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    rotate_every: Option<Duration>,

    /// With --processes: SIGKILL the forwarder this long into the soak and start it
    /// again at once (a forwarder dying under load). The report gives each connection's
    /// time from broken to healed and when the last one healed after the new
    /// forwarder's start.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    kill_forwarder_after: Option<Duration>,

    /// With --kill-forwarder-after: how long the forwarder stays down before it is
    /// started again (a restart that takes time, as a pod's does).
    #[arg(long, value_name = "DURATION", default_value = "0s", value_parser = parse_duration)]
    forwarder_down_for: Duration,

    /// With --mechanism kernel: ping N connections (spread evenly) from their clients'
    /// namespaces at the end of the soak (each that does not answer counts as an
    /// error) and, after a forwarder restart, each one as soon as it healed, until it
    /// answers (the report says when the last one did).
    #[arg(long, value_name = "N", default_value_t = 0)]
    ping_sample: usize,

    /// Also sample the processes this often during the soak (soak+<seconds>s stages).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    sample_every: Option<Duration>,

    /// Write the report as JSON to this file.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,

    /// No progress line.
    #[arg(long)]
    no_progress: bool,

    /// The client's name (its path segment).
    #[arg(long, default_value = "nsm-load")]
    name: String,

    #[command(flatten)]
    common: Common,
}

fn parse_transport(s: &str) -> Result<Transport, String> {
    match s {
        "memory" => Ok(Transport::Memory),
        "unix" => Ok(Transport::Unix),
        _ => Err(format!("bad transport {s:?} (memory or unix)")),
    }
}

fn parse_named_url(s: &str) -> Result<(String, Url), String> {
    let (name, url) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not name=URL"))?;
    Ok((name.trim().to_string(), parse_metrics_url(url)?))
}

fn main() -> ExitCode {
    // Info lines (several per connection) would drown the progress line: warn unless
    // asked otherwise (set before any thread exists).
    if std::env::var_os("NSM_LOG_LEVEL").is_none() && std::env::var_os("RUST_LOG").is_none() {
        std::env::set_var("NSM_LOG_LEVEL", "warn");
    }
    run(|args: Args, stop| async move {
        let client_security = if args.connect_to.is_some() {
            security()?
        } else {
            Security::insecure()
        };
        if args.rotate_every.is_some()
            && (args.sandbox || args.connect_to.is_some() || args.insecure)
        {
            return Err(Failure::config(
                "--rotate-every rewrites the identity files of the programs nsm-load starts: \
                 not with --sandbox, --connect-to or --insecure",
            ));
        }
        if args.kill_forwarder_after.is_some() && !args.processes {
            return Err(Failure::config(
                "--kill-forwarder-after restarts the forwarder nsm-load starts: only with --processes",
            ));
        }
        if args.ping_sample > 0 && args.mechanism != LoadMechanism::Kernel {
            return Err(Failure::config("--ping-sample needs --mechanism kernel"));
        }
        let target = if args.sandbox {
            Target::Sandbox(args.sandbox_transport)
        } else if let Some(url) = args.connect_to {
            Target::Connect(url)
        } else {
            let dir = match args.bin_dir {
                Some(d) => d,
                None => std::env::current_exe()
                    .ok()
                    .and_then(|p| p.parent().map(PathBuf::from))
                    .ok_or_else(|| {
                        Failure::config("cannot tell where the programs are: give --bin-dir")
                    })?,
            };
            Target::Processes(dir)
        };
        if args.clients == 0 {
            return Err(Failure::config("--clients must be at least 1"));
        }
        let opts = LoadOptions {
            clients: args.clients,
            concurrency: args.concurrency.unwrap_or(args.clients).max(1),
            duration: args.duration,
            token_lifetime: args.token_lifetime,
            network_service: args.network_service,
            labels: args.labels.unwrap_or_default(),
            request_timeout: args.request_timeout,
            heal: !args.no_heal,
            heal_wake_up: !args.no_heal_wake_up,
            mechanism: args.mechanism,
            metrics: args.metrics,
            progress: !args.no_progress,
            settle: args.settle,
            sample_every: args.sample_every.filter(|d| !d.is_zero()),
            mesh_log_level: args.mesh_log_level,
            mesh_worker_threads: args.mesh_worker_threads,
            keep_dir: args.keep_dir,
            name: args.name,
            insecure: args.insecure,
            rotate_every: args.rotate_every.filter(|d| !d.is_zero()),
            security: client_security,
            kill_forwarder_after: args.kill_forwarder_after,
            forwarder_down_for: args.forwarder_down_for,
            ping_sample: args.ping_sample,
            ..LoadOptions::new(target)
        };
        let report = run_load(opts, stop).await?;
        if let Some(path) = &args.json {
            write_json(&report, path)?;
        }
        // Not println!: a closed stdout (`| head`) must not turn into a panic.
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{}", report.summary()).and_then(|()| out.flush());
        let unclean: Vec<String> = report
            .unclean_stops()
            .iter()
            .map(|(name, how)| format!("{name} ({how})"))
            .collect();
        match report.errors_total() {
            0 if unclean.is_empty() => Ok(()),
            0 => Err(Failure::runtime(format!(
                "programs that did not stop cleanly on SIGTERM: {}",
                unclean.join(", ")
            ))),
            n => Err(Failure::runtime(format!("{n} operations failed"))),
        }
    })
}
