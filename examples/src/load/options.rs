//! The options of a run ([`LoadOptions`]: what to load, how many connections, how
//! long) and their JSON form in the report.

use nsm_sdk::chains::Security;
use std::collections::HashMap;

use std::path::PathBuf;
use std::time::Duration;

use nsm_sdk::sandbox::Transport;
use nsm_sdk::transport::Url;
use serde_json::{json, Value};

/// The stages at which processes are always sampled, in order (with
/// [`LoadOptions::sample_every`], `soak+<seconds>s` stages come between `after_setup` and
/// `end_of_soak`).
pub const STAGES: [&str; 5] = ["idle", "start", "after_setup", "end_of_soak", "after_close"];

/// What the connections are made against.
#[derive(Debug, Clone)]
pub enum Target {
    /// An in-process sandbox mesh (one node, NOOP endpoint).
    Sandbox(Transport),
    /// The example programs started as child processes from this directory.
    Processes(PathBuf),
    /// A running mesh: its manager's URL.
    Connect(Url),
}

/// The mechanism the clients ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LoadMechanism {
    /// No data plane.
    Noop,
    /// A kernel interface `nsm-1` in a network namespace of each client's own
    /// (`ip netns add nsmt-<pid>-<n>`, deleted after the run): the forwarder makes one
    /// veth pair per connection. Needs root and `ip`; not in the sandbox. With
    /// `--processes` the endpoint runs in a namespace of its own too.
    Kernel,
}

impl LoadMechanism {
    fn name(self) -> &'static str {
        match self {
            LoadMechanism::Noop => "NOOP",
            LoadMechanism::Kernel => "KERNEL",
        }
    }
}

/// How a run goes.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// What to load.
    pub target: Target,
    /// How many connections.
    pub clients: usize,
    /// How many Requests (and Closes) in flight at once.
    pub concurrency: usize,
    /// How long the connections are kept refreshing.
    pub duration: Duration,
    /// How long the client's path tokens live (refreshes come at 20 to 40 % of it).
    pub token_lifetime: Duration,
    /// The network service requested.
    pub network_service: String,
    /// Labels of the requests.
    pub labels: HashMap<String, String>,
    /// How long a Request (retries included) or a Close may take.
    pub request_timeout: Duration,
    /// Whether the client chain heals.
    pub heal: bool,
    /// Whether a heal wakes the other connections waiting out their backoff
    /// (`HealOptions::no_wake_up` when not; for before/after comparisons).
    pub heal_wake_up: bool,
    /// The mechanism the clients ask for.
    pub mechanism: LoadMechanism,
    /// Metrics endpoints to sample, by process name (added to those of spawned
    /// processes).
    pub metrics: Vec<(String, Url)>,
    /// Draw the progress line on stderr.
    pub progress: bool,
    /// Pause before the `after_close` sample, so servers finish their cleanup.
    pub settle: Duration,
    /// Sample the processes this often during the soak too (`soak+<seconds>s` stages).
    pub sample_every: Option<Duration>,
    /// The log level of spawned processes.
    pub mesh_log_level: String,
    /// Worker threads of spawned processes (`None`: their default).
    pub mesh_worker_threads: Option<usize>,
    /// Keep the temporary directory of spawned processes (their logs).
    pub keep_dir: bool,
    /// The client's name (its path segment).
    pub name: String,
    /// Run the started programs and the client without security (`NSM_INSECURE=true`),
    /// to compare with the default: a throw-away CA, an SVID per program and for the
    /// client, mTLS, signed tokens and policies.
    pub insecure: bool,
    /// With started programs: rewrite every program's and the client's identity files
    /// with new SVIDs this often during the soak (rotation under load).
    pub rotate_every: Option<Duration>,
    /// The client's security against a running mesh ([`Target::Connect`]).
    pub security: Security,
    /// With started programs: SIGKILL the forwarder this long into the soak and start
    /// it again at once (a forwarder dying under load); the report says when the
    /// connections healed, counted from the new forwarder's start.
    pub kill_forwarder_after: Option<Duration>,
    /// How long the killed forwarder stays down before it is started again.
    pub forwarder_down_for: Duration,
    /// With KERNEL: ping this many connections (spread evenly) from their clients'
    /// namespaces at the end of the soak, and after a forwarder restart each one as
    /// soon as it healed, until it answers (0: no pings).
    pub ping_sample: usize,
}

impl LoadOptions {
    /// 1,000 connections against `target`, all at once, 30 s of refreshes with 60 s
    /// tokens, heal on, service `icmp-responder`.
    pub fn new(target: Target) -> Self {
        LoadOptions {
            target,
            clients: 1000,
            concurrency: 1000,
            duration: Duration::from_secs(30),
            token_lifetime: Duration::from_secs(60),
            network_service: "icmp-responder".to_string(),
            labels: HashMap::new(),
            request_timeout: Duration::from_secs(15),
            heal: true,
            heal_wake_up: true,
            mechanism: LoadMechanism::Noop,
            metrics: Vec::new(),
            progress: false,
            settle: Duration::from_secs(2),
            sample_every: None,
            mesh_log_level: "warn".to_string(),
            mesh_worker_threads: None,
            keep_dir: false,
            name: "nsm-load".to_string(),
            insecure: false,
            rotate_every: None,
            security: Security::insecure(),
            kill_forwarder_after: None,
            forwarder_down_for: Duration::ZERO,
            ping_sample: 0,
        }
    }
}

pub(super) fn options_json(o: &LoadOptions) -> Value {
    let (mode, target) = match &o.target {
        Target::Sandbox(t) => ("sandbox", format!("{t:?}")),
        Target::Processes(dir) => ("processes", dir.display().to_string()),
        Target::Connect(url) => ("connect", url.to_string()),
    };
    json!({
        "mode": mode, "target": target, "mechanism": o.mechanism.name(),
        "clients": o.clients, "concurrency": o.concurrency,
        "duration_s": o.duration.as_secs_f64(), "token_lifetime_s": o.token_lifetime.as_secs_f64(),
        "network_service": o.network_service, "heal": o.heal, "heal_wake_up": o.heal_wake_up,
        "request_timeout_s": o.request_timeout.as_secs_f64(),
        "sample_every_s": o.sample_every.map(|d| d.as_secs_f64()),
        "mesh_log_level": o.mesh_log_level, "mesh_worker_threads": o.mesh_worker_threads,
        "kill_forwarder_after_s": o.kill_forwarder_after.map(|d| d.as_secs_f64()),
        "forwarder_down_for_s": o.forwarder_down_for.as_secs_f64(),
        "ping_sample": o.ping_sample,
    })
}
