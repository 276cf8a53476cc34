//! The load tool's logic (`nsm-load`): N client connections against a mesh, kept
//! refreshing for a while, then closed, with what it took measured.
//!
//! The mesh is one of: an in-process [`Sandbox`] (one node, NOOP), the example programs
//! started as child processes on unix sockets in a temporary directory
//! (`nsm-registry`, `nsmgr`, `nsm-forwarder`, `nse-icmp-responder`, each serving its
//! metrics), or a mesh already running (a manager's URL).
//!
//! Phases: a warm-up Request + Close (the mesh is ready, the channel is up); **setup**
//! (N Requests, at most `concurrency` in flight, each timed); **soak** (the connections
//! are left to refresh for the duration: the client's path tokens live
//! `token_lifetime`, so each connection refreshes every 20 to 40 % of it); **close**
//! (N Closes). Every connection shares one client chain (one client process with N
//! connections: `begin`, `refresh`, `retry`, `heal` unless turned off, and a counting
//! handler after heal).
//!
//! Measured: setup and close latency (p50/p90/p99/max), errors by gRPC code of each
//! phase (refreshes included: the counting handler sees every re-request and its
//! outcome), refreshes per second and their latency, heal events (connections found
//! broken, and healed), and, for each process whose metrics endpoint is known, RSS,
//! open fds, threads, CPU and tasks at each stage: `idle` (before the warm-up),
//! `start` (0 connections), `after_setup`, `end_of_soak`, `after_close`.
//!
//! State: the counters shared with the counting handler and the progress line, the
//! connections held, the child processes (killed when the run ends, failed or not).
//! Failures handled: a failed Request, refresh or Close is counted by code and the run
//! goes on; a stop signal cuts the soak short and still closes everything; a metrics
//! endpoint that does not answer leaves its sample out.

use std::collections::{BTreeMap, HashMap};
use std::io::{IsTerminal, Write as _};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::stream::{self, StreamExt};
use nsm_proto::connection::Connection;
use nsm_proto::networkservice::NetworkServiceRequest;
use nsm_sdk::chains::{client, ClientOptions};
use nsm_sdk::handlers::{heal, HealEvent, HealOptions};
use nsm_sdk::sandbox::{EndpointHandle, EndpointSpec, Sandbox, Transport};
use nsm_sdk::token::lifetime_token;
use nsm_sdk::transport::{Channels, Url};
use nsm_sdk::wire::params;
use nsm_sdk::{Chain, Cx, Handler, Next};
use nsm_sdk_kernel::mechanism::kernel_mechanism;
use serde_json::{json, Value};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::metrics::{sample, scrape};
use crate::process::Failure;

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
            mechanism: LoadMechanism::Noop,
            metrics: Vec::new(),
            progress: false,
            settle: Duration::from_secs(2),
            sample_every: None,
            mesh_log_level: "warn".to_string(),
            mesh_worker_threads: None,
            keep_dir: false,
            name: "nsm-load".to_string(),
        }
    }
}

/// Latency percentiles of one kind of operation, in milliseconds.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Latency {
    /// How many were timed.
    pub count: usize,
    /// Mean.
    pub mean: f64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Slowest.
    pub max: f64,
}

impl Latency {
    /// Nearest-rank percentiles of `samples`.
    pub fn of(samples: &[Duration]) -> Latency {
        if samples.is_empty() {
            return Latency::default();
        }
        let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
        ms.sort_by(f64::total_cmp);
        let rank = |p: f64| ms[((p * ms.len() as f64).ceil() as usize).clamp(1, ms.len()) - 1];
        Latency {
            count: ms.len(),
            mean: ms.iter().sum::<f64>() / ms.len() as f64,
            p50: rank(0.50),
            p90: rank(0.90),
            p99: rank(0.99),
            max: ms[ms.len() - 1],
        }
    }

    fn json(&self) -> Value {
        let r = |v: f64| (v * 1000.0).round() / 1000.0;
        json!({"count": self.count, "mean": r(self.mean), "p50": r(self.p50), "p90": r(self.p90),
               "p99": r(self.p99), "max": r(self.max)})
    }
}

/// Errors by gRPC code name.
pub type Errors = BTreeMap<String, u64>;

/// One phase of Requests or Closes made by the tool.
#[derive(Debug, Clone, Default)]
pub struct Phase {
    /// Wall time of the phase, seconds.
    pub seconds: f64,
    /// Operations that succeeded.
    pub ok: u64,
    /// Latency of every operation (failed ones included).
    pub latency: Latency,
    /// Failed operations by code.
    pub errors: Errors,
}

/// The refresh phase.
#[derive(Debug, Clone, Default)]
pub struct Soak {
    /// How long it lasted, seconds.
    pub seconds: f64,
    /// Re-requests (refreshes, and heal's attempts) that went through the chain.
    pub refreshes: u64,
    /// Their latency.
    pub latency: Latency,
    /// Failed re-requests by code.
    pub errors: Errors,
    /// Connections found broken (heal started).
    pub heal_broken: u64,
    /// Connections healed.
    pub heal_healed: u64,
}

/// A whole run.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// The options, as JSON.
    pub options: Value,
    /// The warm-up Request + Close, ms (`None`: it failed).
    pub warmup_ms: Option<f64>,
    /// Setting the connections up.
    pub setup: Phase,
    /// Keeping them.
    pub soak: Soak,
    /// Closing them.
    pub close: Phase,
    /// Re-requests outside the soak (during setup and close) and their errors.
    pub other_refresh_errors: Errors,
    /// Samples by process, then by stage.
    pub processes: BTreeMap<String, BTreeMap<String, BTreeMap<String, f64>>>,
    /// The stages sampled, in order.
    pub stages: Vec<String>,
    /// The run was stopped early by a signal.
    pub interrupted: bool,
    /// How each started program (`--processes`) ended after SIGTERM at the end of the
    /// run: `exit 0` when it stopped cleanly.
    pub shutdown: BTreeMap<String, String>,
}

impl Report {
    /// Failed operations of every phase.
    pub fn errors_total(&self) -> u64 {
        [
            &self.setup.errors,
            &self.soak.errors,
            &self.close.errors,
            &self.other_refresh_errors,
        ]
        .iter()
        .flat_map(|e| e.values())
        .sum::<u64>()
            + u64::from(self.warmup_ms.is_none())
    }

    /// The started programs that did not stop cleanly (exit 0) on SIGTERM.
    pub fn unclean_stops(&self) -> Vec<(&str, &str)> {
        self.shutdown
            .iter()
            .filter(|(_, how)| how.as_str() != "exit 0")
            .map(|(name, how)| (name.as_str(), how.as_str()))
            .collect()
    }

    /// `metric` of `process` at `to` minus at `from`.
    pub fn delta(&self, process: &str, metric: &str, from: &str, to: &str) -> Option<f64> {
        let stages = self.processes.get(process)?;
        Some(stages.get(to)?.get(metric)? - stages.get(from)?.get(metric)?)
    }

    /// The report as JSON.
    pub fn json(&self) -> Value {
        let errs = |e: &Errors| json!(e);
        let per_conn = self.setup.ok.max(1) as f64;
        let mut growth = serde_json::Map::new();
        for name in self.processes.keys() {
            let mut g = serde_json::Map::new();
            for metric in GROWTH_METRICS {
                let setup = self.delta(name, metric, "start", "after_setup");
                let soak = self.delta(name, metric, "after_setup", "end_of_soak");
                let close = self.delta(name, metric, "start", "after_close");
                g.insert(
                    metric.to_string(),
                    json!({
                        "per_connection": setup.map(|d| d / per_conn),
                        "setup": setup, "soak": soak, "after_close_vs_start": close,
                    }),
                );
            }
            growth.insert(name.clone(), Value::Object(g));
        }
        json!({
            "options": self.options,
            "interrupted": self.interrupted,
            "errors_total": self.errors_total(),
            "warmup_ms": self.warmup_ms,
            "setup": {"seconds": self.setup.seconds, "ok": self.setup.ok,
                      "latency_ms": self.setup.latency.json(), "errors": errs(&self.setup.errors)},
            "soak": {"seconds": self.soak.seconds, "refreshes": self.soak.refreshes,
                     "refreshes_per_second": self.soak.refreshes as f64 / self.soak.seconds.max(1e-9),
                     "refresh_latency_ms": self.soak.latency.json(), "errors": errs(&self.soak.errors),
                     "heal_broken": self.soak.heal_broken, "heal_healed": self.soak.heal_healed},
            "close": {"seconds": self.close.seconds, "ok": self.close.ok,
                      "latency_ms": self.close.latency.json(), "errors": errs(&self.close.errors)},
            "refresh_errors_outside_soak": errs(&self.other_refresh_errors),
            "stages": self.stages,
            "processes": self.processes,
            "growth": growth,
            "shutdown": self.shutdown,
        })
    }

    /// The report for people: a few lines.
    pub fn summary(&self) -> String {
        let mut out = String::new();
        let l = &self.setup.latency;
        let fmt_errors = |e: &Errors| {
            if e.is_empty() {
                "none".to_string()
            } else {
                e.iter()
                    .map(|(k, v)| format!("{k} {v}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        };
        out += &format!(
            "setup:   {} of {} connected in {:.3} s; latency ms p50 {:.2} p90 {:.2} p99 {:.2} max {:.2}; errors: {}\n",
            self.setup.ok,
            l.count,
            self.setup.seconds,
            l.p50,
            l.p90,
            l.p99,
            l.max,
            fmt_errors(&self.setup.errors)
        );
        let s = &self.soak;
        out += &format!(
            "soak:    {:.1} s, {} refreshes ({:.1}/s), latency ms p50 {:.2} p99 {:.2} max {:.2}; errors: {}; heal: {} broken, {} healed\n",
            s.seconds,
            s.refreshes,
            s.refreshes as f64 / s.seconds.max(1e-9),
            s.latency.p50,
            s.latency.p99,
            s.latency.max,
            fmt_errors(&s.errors),
            s.heal_broken,
            s.heal_healed
        );
        let c = &self.close.latency;
        out += &format!(
            "close:   {} closed in {:.3} s; latency ms p50 {:.2} p99 {:.2} max {:.2}; errors: {}\n",
            self.close.ok,
            self.close.seconds,
            c.p50,
            c.p99,
            c.max,
            fmt_errors(&self.close.errors)
        );
        if !self.other_refresh_errors.is_empty() {
            out += &format!(
                "refresh errors outside the soak: {}\n",
                fmt_errors(&self.other_refresh_errors)
            );
        }
        if !self.shutdown.is_empty() {
            let ends: Vec<String> = self
                .shutdown
                .iter()
                .map(|(name, how)| format!("{name} {how}"))
                .collect();
            out += &format!("stopped: {}\n", ends.join(", "));
        }
        let n = self.setup.ok.max(1) as f64;
        for (name, stages) in &self.processes {
            let at = |stage: &str, m: &str| stages.get(stage).and_then(|s| s.get(m)).copied();
            let mb = |v: Option<f64>| v.map_or("-".into(), |v| format!("{:.1}", v / 1048576.0));
            let num = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.0}"));
            out += &format!("{name}:\n");
            out += "  stage         RSS MB   fds  threads  conns  nsm tasks  tokio tasks  CPU s\n";
            for stage in &self.stages {
                let stage = stage.as_str();
                if stages.contains_key(stage) {
                    out += &format!(
                        "  {stage:<12} {:>7} {:>5} {:>8} {:>6} {:>10} {:>12} {:>6}\n",
                        mb(at(stage, "process_resident_memory_bytes")),
                        num(at(stage, "process_open_fds")),
                        num(at(stage, "process_threads")),
                        num(at(stage, "nsm_live_connections")),
                        num(at(stage, "nsm_live_tasks")),
                        num(at(stage, "tokio_alive_tasks")),
                        at(stage, "process_cpu_seconds_total")
                            .map_or("-".into(), |v| format!("{v:.2}")),
                    );
                }
            }
            let d = |m: &str| self.delta(name, m, "start", "after_setup");
            out += &format!(
                "  per connection: RSS {} B, fds {}, nsm tasks {}, tokio tasks {}; soak growth: RSS {} KB, fds {}, tokio tasks {}\n",
                d("process_resident_memory_bytes").map_or("-".into(), |v| format!("{:.0}", v / n)),
                d("process_open_fds").map_or("-".into(), |v| format!("{:.3}", v / n)),
                d("nsm_live_tasks").map_or("-".into(), |v| format!("{:.2}", v / n)),
                d("tokio_alive_tasks").map_or("-".into(), |v| format!("{:.2}", v / n)),
                self.delta(name, "process_resident_memory_bytes", "after_setup", "end_of_soak")
                    .map_or("-".into(), |v| format!("{:.0}", v / 1024.0)),
                num(self.delta(name, "process_open_fds", "after_setup", "end_of_soak")),
                num(self.delta(name, "tokio_alive_tasks", "after_setup", "end_of_soak")),
            );
        }
        out
    }
}

/// The metrics whose growth the report computes.
const GROWTH_METRICS: [&str; 6] = [
    "process_resident_memory_bytes",
    "process_open_fds",
    "process_threads",
    "nsm_live_connections",
    "nsm_live_tasks",
    "tokio_alive_tasks",
];

/// What the counting handler and the progress line share.
#[derive(Debug, Default)]
struct Counts {
    phase: AtomicU8,
    setup_done: AtomicU64,
    setup_failed: AtomicU64,
    closed: AtomicU64,
    rerequests: AtomicU64,
    rerequest_failed: AtomicU64,
    heal_broken: AtomicU64,
    heal_healed: AtomicU64,
    /// Latency and errors of re-requests, since the last [`Counts::take`].
    window: Mutex<Window>,
}

#[derive(Debug, Default)]
struct Window {
    latency: Histogram,
    errors: Errors,
}

/// Latencies in fixed memory, however long the soak: log-linear buckets of
/// microseconds (64 per power of two, so a percentile is within 1.6 % of the truth),
/// with the exact count, sum and maximum.
#[derive(Debug, Clone, Default)]
pub struct Histogram {
    buckets: Vec<u64>,
    count: u64,
    sum_us: u64,
    max_us: u64,
}

/// Sub-buckets per power of two.
const SUB_BUCKETS: u64 = 64;

impl Histogram {
    /// The bucket of `us` microseconds: exact below 64, then 64 per power of two.
    fn bucket(us: u64) -> usize {
        if us < SUB_BUCKETS {
            return us as usize;
        }
        let exp = 63 - u64::from(us.leading_zeros()); // >= 6
        let shift = exp - 6;
        ((exp - 5) * SUB_BUCKETS + ((us >> shift) & (SUB_BUCKETS - 1))) as usize
    }

    /// The smallest value of bucket `b`.
    fn low(b: usize) -> u64 {
        let b = b as u64;
        if b < SUB_BUCKETS {
            return b;
        }
        let exp = b / SUB_BUCKETS + 5;
        let sub = b % SUB_BUCKETS;
        (SUB_BUCKETS + sub) << (exp - 6)
    }

    /// Adds one latency.
    pub fn record(&mut self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        let b = Self::bucket(us);
        if self.buckets.len() <= b {
            self.buckets.resize(b + 1, 0);
        }
        self.buckets[b] += 1;
        self.count += 1;
        self.sum_us = self.sum_us.saturating_add(us);
        self.max_us = self.max_us.max(us);
    }

    /// How many were recorded.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Nearest-rank percentiles (bucket lower bounds; the maximum is exact).
    pub fn latency(&self) -> Latency {
        if self.count == 0 {
            return Latency::default();
        }
        let ms = |us: u64| us as f64 / 1e3;
        let rank = |p: f64| {
            let want = ((p * self.count as f64).ceil() as u64).clamp(1, self.count);
            let mut seen = 0;
            for (b, n) in self.buckets.iter().enumerate() {
                seen += n;
                if seen >= want {
                    return ms(Self::low(b).min(self.max_us));
                }
            }
            ms(self.max_us)
        };
        Latency {
            count: self.count as usize,
            mean: ms(self.sum_us) / self.count as f64,
            p50: rank(0.50),
            p90: rank(0.90),
            p99: rank(0.99),
            max: ms(self.max_us),
        }
    }
}

impl Counts {
    fn take(&self) -> Window {
        std::mem::take(&mut *self.window.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

const PHASE_WARMUP: u8 = 0;
const PHASE_SETUP: u8 = 1;
const PHASE_SOAK: u8 = 2;
const PHASE_CLOSE: u8 = 3;
const PHASE_DONE: u8 = 4;

/// Marks a connection the chain has established once (later Requests are re-requests).
#[derive(Default)]
struct Established;

/// Counts the re-requests of established connections (refreshes and heal's attempts)
/// with their latency and errors. Goes after `heal` in the client chain.
#[derive(Debug, Clone)]
struct CountRequests(Arc<Counts>);

#[async_trait]
impl Handler for CountRequests {
    async fn request(
        &self,
        cx: &mut Cx,
        req: NetworkServiceRequest,
        next: Next,
    ) -> nsm_sdk::Result<Connection> {
        let handle = cx.conn().cloned();
        let again = handle
            .as_ref()
            .is_some_and(|h| h.get_state::<Established>().is_some());
        let started = Instant::now();
        let outcome = next.request(cx, req).await;
        if again {
            self.0.rerequests.fetch_add(1, Ordering::Relaxed);
            let mut w = self.0.window.lock().unwrap_or_else(|p| p.into_inner());
            w.latency.record(started.elapsed());
            if let Err(e) = &outcome {
                self.0.rerequest_failed.fetch_add(1, Ordering::Relaxed);
                *w.errors.entry(format!("{:?}", e.code())).or_default() += 1;
            }
        } else if let (Ok(_), Some(h)) = (&outcome, &handle) {
            h.state::<Established>();
        }
        outcome
    }
}

/// The mesh under load, and the processes to sample.
struct Mesh {
    client: Chain,
    metrics: Vec<(String, Url)>,
    /// Sample this process too (it is the whole mesh in sandbox mode).
    sample_self: bool,
    _sandbox: Option<(Sandbox, EndpointHandle)>,
    children: Children,
    /// The namespaces of KERNEL clients: the URL of each (warm-up first), and the guard
    /// that deletes them (after the children are gone: fields drop in order).
    netns_urls: Vec<String>,
    _namespaces: Option<Namespaces>,
}

/// Network namespaces made for the run (`ip netns add`), deleted when dropped.
struct Namespaces {
    names: Vec<String>,
}

impl Namespaces {
    /// Makes `count` namespaces named `nsmt-<pid>-<n>`.
    fn create(count: usize) -> Result<Namespaces, Failure> {
        let pid = std::process::id();
        let names: Vec<String> = (0..count).map(|n| format!("nsmt-{pid}-{n}")).collect();
        let made = Namespaces { names };
        let out = ip_batch("add", &made.names)
            .map_err(|e| Failure::config(format!("KERNEL needs ip: {e}")))?;
        if !out.status.success() {
            // `made` deletes whatever was made.
            return Err(Failure::config(format!(
                "cannot make the client namespaces (KERNEL needs root): {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(made)
    }

    fn url(&self, n: usize) -> String {
        format!("file:///run/netns/{}", self.names[n])
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        if let Err(e) = ip_batch("del", &self.names) {
            eprintln!(
                "nsm-load: cannot delete the namespaces nsmt-{}-*: {e}",
                std::process::id()
            );
        }
    }
}

/// Runs `ip -force -batch -` with `netns <verb> <name>` for each name.
fn ip_batch(verb: &str, names: &[String]) -> std::io::Result<std::process::Output> {
    let mut child = std::process::Command::new("ip")
        .args(["-force", "-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    if let Some(mut stdin) = child.stdin.take() {
        let script: String = names
            .iter()
            .map(|n| format!("netns {verb} {n}\n"))
            .collect();
        stdin.write_all(script.as_bytes())?;
    }
    child.wait_with_output()
}

/// How long a started program has to exit after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// Spawned processes (with their names), stopped by [`Children::stop`] at the end of a
/// run and killed when dropped before that; their directory is removed unless kept.
struct Children {
    procs: Vec<(String, tokio::process::Child)>,
    dir: Option<PathBuf>,
    keep: bool,
}

impl Children {
    /// Stops every program as an operator would: SIGTERM, then up to [`STOP_GRACE`] for
    /// it to close what it holds, unregister and exit (a profiling build writes its
    /// profile then). Returns how each one ended: `exit 0` for a clean stop.
    async fn stop(&mut self) -> BTreeMap<String, String> {
        for (_, child) in &self.procs {
            // It may have exited already: its status is read below.
            if let Some(pid) = child.id() {
                crate::process::terminate(pid);
            }
        }
        let mut ended = BTreeMap::new();
        for (name, child) in &mut self.procs {
            let how = match tokio::time::timeout(STOP_GRACE, child.wait()).await {
                Ok(Ok(status)) => match status.code() {
                    Some(code) => format!("exit {code}"),
                    None => format!("{status}"),
                },
                Ok(Err(e)) => format!("unknown: {e}"),
                Err(_) => {
                    let _ = child.kill().await;
                    format!(
                        "killed: still running {} s after SIGTERM",
                        STOP_GRACE.as_secs()
                    )
                }
            };
            ended.insert(name.clone(), how);
        }
        ended
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        for (_, p) in &mut self.procs {
            let _ = p.start_kill();
        }
        if let Some(dir) = &self.dir {
            if self.keep {
                eprintln!("nsm-load: logs of the mesh kept in {}", dir.display());
            } else {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
    }
}

fn client_options(opts: &LoadOptions, connect_to: Url, counts: &Arc<Counts>) -> ClientOptions {
    let channels = Channels::new();
    with_handlers(
        ClientOptions::new(&opts.name, connect_to)
            .channels(channels.clone())
            .tokens(Arc::new(lifetime_token(opts.token_lifetime))),
        opts,
        channels,
        counts,
    )
}

fn with_handlers(
    base: ClientOptions,
    opts: &LoadOptions,
    channels: Channels,
    counts: &Arc<Counts>,
) -> ClientOptions {
    let mut o = base
        .retry(Some(opts.request_timeout))
        .timeout(opts.request_timeout);
    if opts.mechanism == LoadMechanism::Kernel {
        // Each request carries its client's KERNEL preference (see `request`).
        o = o.mechanisms(Vec::new());
    }
    if opts.heal {
        let c = counts.clone();
        o = o.handler(heal(HealOptions::new(channels).observer(move |e| {
            let n = match e {
                HealEvent::Broken => &c.heal_broken,
                HealEvent::Healed => &c.heal_healed,
                _ => return,
            };
            n.fetch_add(1, Ordering::Relaxed);
        })));
    }
    o.handler(CountRequests(counts.clone()))
}

async fn start_mesh(opts: &LoadOptions, counts: &Arc<Counts>) -> Result<Mesh, Failure> {
    let kernel = opts.mechanism == LoadMechanism::Kernel;
    if kernel && matches!(opts.target, Target::Sandbox(_)) {
        return Err(Failure::config(
            "the sandbox has no KERNEL data plane: use --processes or --connect-to",
        ));
    }
    // One namespace per client, one for the warm-up, one for a spawned endpoint.
    let namespaces = if kernel {
        // Blocks this thread for a moment before anything else runs.
        Some(Namespaces::create(opts.clients + 2)?)
    } else {
        None
    };
    let netns_urls = namespaces
        .as_ref()
        .map(|ns| (0..=opts.clients).map(|n| ns.url(n)).collect())
        .unwrap_or_default();
    let nse_netns = namespaces
        .as_ref()
        .map(|ns| ns.names[opts.clients + 1].clone());
    let mut mesh = start_mesh_in(opts, counts, nse_netns).await?;
    mesh.netns_urls = netns_urls;
    mesh._namespaces = namespaces;
    Ok(mesh)
}

async fn start_mesh_in(
    opts: &LoadOptions,
    counts: &Arc<Counts>,
    nse_netns: Option<String>,
) -> Result<Mesh, Failure> {
    let mut metrics = opts.metrics.clone();
    match &opts.target {
        Target::Connect(url) => Ok(Mesh {
            client: client(client_options(opts, url.clone(), counts)),
            metrics,
            sample_self: true,
            _sandbox: None,
            children: Children {
                procs: Vec::new(),
                dir: None,
                keep: false,
            },
            netns_urls: Vec::new(),
            _namespaces: None,
        }),
        Target::Sandbox(transport) => {
            let mesh = Sandbox::builder()
                .nodes(1)
                .transport(*transport)
                .token_lifetime(opts.token_lifetime)
                .build()
                .await
                .map_err(|e| Failure::runtime(format!("cannot start the sandbox: {e}")))?;
            let prefix = "10.0.0.0/8"
                .parse()
                .map_err(|_| Failure::config("prefix"))?;
            let nse = mesh
                .node(0)
                .endpoint(EndpointSpec::new("nse", &opts.network_service).ipam(prefix))
                .await
                .map_err(|e| Failure::runtime(format!("cannot start the endpoint: {e}")))?;
            let base = mesh.node(0).client_options(&opts.name);
            let client = client(with_handlers(base, opts, Channels::new(), counts));
            Ok(Mesh {
                client,
                metrics,
                sample_self: true,
                _sandbox: Some((mesh, nse)),
                children: Children {
                    procs: Vec::new(),
                    dir: None,
                    keep: false,
                },
                netns_urls: Vec::new(),
                _namespaces: None,
            })
        }
        Target::Processes(bin_dir) => {
            let (children, nsmgr, spawned) = spawn_mesh(opts, bin_dir, nse_netns).await?;
            metrics.extend(spawned);
            Ok(Mesh {
                client: client(client_options(opts, nsmgr, counts)),
                metrics,
                sample_self: true,
                _sandbox: None,
                children,
                netns_urls: Vec::new(),
                _namespaces: None,
            })
        }
    }
}

/// Starts registry, nsmgr, forwarder and icmp responder on unix sockets in a new
/// temporary directory, each with its metrics endpoint; returns them, the manager's URL
/// and the metrics endpoints.
async fn spawn_mesh(
    opts: &LoadOptions,
    bin_dir: &Path,
    nse_netns: Option<String>,
) -> Result<(Children, Url, Vec<(String, Url)>), Failure> {
    let dir = std::env::temp_dir().join(format!("nsm-load-{}", std::process::id()));
    std::fs::create_dir_all(&dir)
        .map_err(|e| Failure::runtime(format!("cannot create {}: {e}", dir.display())))?;
    let mut children = Children {
        procs: Vec::new(),
        dir: Some(dir.clone()),
        keep: opts.keep_dir,
    };
    let sock = |name: &str| format!("unix://{}", dir.join(name).display());
    let (reg, nsmgr) = (sock("registry.sock"), sock("nsmgr.sock"));
    let mut metrics = Vec::new();
    // (program, name, settings)
    type Program<'a> = (&'a str, &'a str, Vec<(&'a str, String)>);
    let programs: [Program<'_>; 4] = [
        (
            "nsm-registry",
            "registry",
            vec![("NSM_LISTEN_ON", reg.clone())],
        ),
        (
            "nsmgr",
            "nsmgr",
            vec![
                ("NSM_LISTEN_ON", nsmgr.clone()),
                ("NSM_REGISTRY_URL", reg.clone()),
            ],
        ),
        (
            "nsm-forwarder",
            "forwarder",
            vec![
                ("NSM_LISTEN_ON", sock("forwarder.sock")),
                ("NSM_CONNECT_TO", nsmgr.clone()),
            ],
        ),
        (
            "nse-icmp-responder",
            "nse",
            vec![
                ("NSM_LISTEN_ON", sock("nse.sock")),
                ("NSM_CONNECT_TO", nsmgr.clone()),
                ("NSM_SERVICE_NAMES", opts.network_service.clone()),
                // Room for 2 addresses per connection.
                ("NSM_CIDR_PREFIX", "172.20.0.0/14".to_string()),
            ],
        ),
    ];
    for (program, name, env) in programs {
        let exe = bin_dir.join(program);
        let log = std::fs::File::create(dir.join(format!("{name}.log")))
            .map_err(|e| Failure::runtime(format!("cannot create a log file: {e}")))?;
        let metrics_sock = dir.join(format!("{name}.metrics.sock"));
        // The endpoint serves no metrics.
        let serves_metrics = name != "nse";
        let mut cmd = match (&nse_netns, name) {
            // The endpoint's ends of the veth pairs go into its own namespace.
            (Some(ns), "nse") => {
                let mut c = tokio::process::Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&exe);
                c
            }
            _ => tokio::process::Command::new(&exe),
        };
        cmd.env("NSM_NAME", name)
            .env("NSM_LOG_LEVEL", &opts.mesh_log_level)
            .envs(env)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true);
        if let Some(n) = opts.mesh_worker_threads {
            cmd.env("NSM_WORKER_THREADS", n.to_string());
        }
        if serves_metrics {
            cmd.env("NSM_METRICS_LISTEN_ON", &metrics_sock);
        }
        let child = cmd
            .spawn()
            .map_err(|e| Failure::config(format!("cannot start {}: {e}", exe.display())))?;
        children.procs.push((name.to_string(), child));
        if serves_metrics {
            let url = Url::Unix(metrics_sock);
            wait_until(Duration::from_secs(20), || async {
                scrape(&url).await.is_ok()
            })
            .await
            .map_err(|()| Failure::runtime(format!("{program} did not start (log: {name}.log)")))?;
            metrics.push((name.to_string(), url));
        }
        // Each program needs the one before it (its registry or manager) serving; the
        // warm-up request waits for the forwarder and the endpoint to register.
        if name == "registry" || name == "nsmgr" {
            let listen = if name == "registry" { &reg } else { &nsmgr };
            let path = PathBuf::from(listen.trim_start_matches("unix://"));
            wait_until(Duration::from_secs(20), || {
                let ready = path.exists();
                async move { ready }
            })
            .await
            .map_err(|()| Failure::runtime(format!("{program} does not listen")))?;
        }
    }
    info!(dir = %dir.display(), "mesh processes started");
    let nsmgr = nsmgr
        .parse()
        .map_err(|e| Failure::runtime(format!("{e}")))?;
    Ok((children, nsmgr, metrics))
}

async fn wait_until<F, Fut>(within: Duration, mut ready: F) -> Result<(), ()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let until = Instant::now() + within;
    while !ready().await {
        if Instant::now() > until {
            return Err(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// The request of client `n` (0 is the warm-up's).
fn request(opts: &LoadOptions, mesh: &Mesh, n: usize) -> NetworkServiceRequest {
    let mechanism_preferences = match mesh.netns_urls.get(n) {
        Some(netns) => {
            let mut kernel = kernel_mechanism();
            kernel
                .parameters
                .insert(params::NAME.into(), KERNEL_IFNAME.into());
            kernel
                .parameters
                .insert(params::INODE_URL.into(), netns.clone());
            vec![kernel]
        }
        None => Vec::new(),
    };
    NetworkServiceRequest {
        connection: Some(Connection {
            id: uuid::Uuid::new_v4().to_string(),
            network_service: opts.network_service.clone(),
            labels: opts.labels.clone(),
            ..Default::default()
        }),
        mechanism_preferences,
    }
}

/// The interface each KERNEL client gets in its namespace.
const KERNEL_IFNAME: &str = "nsm-1";

fn code_name(e: &nsm_sdk::Error) -> String {
    format!("{:?}", e.code())
}

/// Samples every process at `stage`.
async fn sample_all(mesh: &Mesh, report: &mut Report, stage: &str) {
    report.stages.push(stage.to_string());
    let scrapes = mesh.metrics.iter().map(|(name, url)| async move {
        match scrape(url).await {
            Ok(m) => Some((name.clone(), m)),
            Err(e) => {
                warn!(process = %name, error = %e, "no metrics");
                None
            }
        }
    });
    for (name, m) in futures::future::join_all(scrapes)
        .await
        .into_iter()
        .flatten()
    {
        report
            .processes
            .entry(name)
            .or_default()
            .insert(stage.to_string(), m);
    }
    if mesh.sample_self {
        let own = crate::metrics::parse_text(&crate::metrics::render(&sample()));
        report
            .processes
            .entry("nsm-load".to_string())
            .or_default()
            .insert(stage.to_string(), own);
    }
}

/// Runs the load; `stop` cuts the soak short (everything is still closed).
pub async fn run_load(opts: LoadOptions, stop: CancellationToken) -> Result<Report, Failure> {
    let counts = Arc::new(Counts::default());
    let mut report = Report {
        options: options_json(&opts),
        ..Default::default()
    };
    let mut mesh = start_mesh(&opts, &counts).await?;
    sample_all(&mesh, &mut report, "idle").await;

    let progress = opts
        .progress
        .then(|| Progress::start(counts.clone(), &opts));
    let outcome = phases(&opts, &mesh, &counts, &mut report, &stop).await;
    counts.phase.store(PHASE_DONE, Ordering::Relaxed);
    if let Some(p) = progress {
        p.stop().await;
    }
    report.shutdown = mesh.children.stop().await;
    outcome?;
    drop(mesh);
    Ok(report)
}

async fn phases(
    opts: &LoadOptions,
    mesh: &Mesh,
    counts: &Arc<Counts>,
    report: &mut Report,
    stop: &CancellationToken,
) -> Result<(), Failure> {
    let chain = &mesh.client;
    let timeout = opts.request_timeout;
    // Warm-up: the mesh is ready (retry waits for the endpoint's registration) and the
    // channel is up.
    let started = Instant::now();
    let warm = async {
        let conn = chain
            .request(
                &mut Cx::client().with_timeout(timeout),
                request(opts, mesh, 0),
            )
            .await?;
        chain
            .close(&mut Cx::client().with_timeout(timeout), conn)
            .await
    };
    match tokio::select! { r = warm => Some(r), _ = stop.cancelled() => None } {
        Some(Ok(())) => report.warmup_ms = Some(started.elapsed().as_secs_f64() * 1e3),
        Some(Err(e)) => return Err(Failure::runtime(format!("the warm-up request failed: {e}"))),
        None => return Err(Failure::runtime("stopped during the warm-up")),
    }
    sample_all(mesh, report, "start").await;

    // Setup.
    counts.phase.store(PHASE_SETUP, Ordering::Relaxed);
    let started = Instant::now();
    let results: Vec<(Duration, nsm_sdk::Result<Connection>)> =
        stream::iter((1..=opts.clients).map(|n| {
            let req = request(opts, mesh, n);
            let counts = counts.clone();
            async move {
                let t = Instant::now();
                let r = chain
                    .request(&mut Cx::client().with_timeout(timeout), req)
                    .await;
                counts.setup_done.fetch_add(1, Ordering::Relaxed);
                if r.is_err() {
                    counts.setup_failed.fetch_add(1, Ordering::Relaxed);
                }
                (t.elapsed(), r)
            }
        }))
        .buffer_unordered(opts.concurrency.max(1))
        .collect()
        .await;
    report.setup.seconds = started.elapsed().as_secs_f64();
    let mut conns = Vec::with_capacity(results.len());
    let mut latency = Vec::with_capacity(results.len());
    for (d, r) in results {
        latency.push(d);
        match r {
            Ok(c) => conns.push(c),
            Err(e) => *report.setup.errors.entry(code_name(&e)).or_default() += 1,
        }
    }
    report.setup.ok = conns.len() as u64;
    report.setup.latency = Latency::of(&latency);
    merge(&mut report.other_refresh_errors, counts.take().errors);
    sample_all(mesh, report, "after_setup").await;

    // Soak.
    counts.phase.store(PHASE_SOAK, Ordering::Relaxed);
    let (broken0, healed0) = (
        counts.heal_broken.load(Ordering::Relaxed),
        counts.heal_healed.load(Ordering::Relaxed),
    );
    let started = Instant::now();
    let end = started + opts.duration;
    loop {
        let next = opts
            .sample_every
            .map_or(end, |every| (Instant::now() + every).min(end));
        tokio::select! {
            _ = tokio::time::sleep_until(next) => {}
            _ = stop.cancelled() => {
                report.interrupted = true;
                break;
            }
        }
        if next >= end {
            break;
        }
        let stage = format!("soak+{:.0}s", started.elapsed().as_secs_f64());
        sample_all(mesh, report, &stage).await;
    }
    report.soak.seconds = started.elapsed().as_secs_f64();
    let window = counts.take();
    report.soak.refreshes = window.latency.count();
    report.soak.latency = window.latency.latency();
    report.soak.errors = window.errors;
    report.soak.heal_broken = counts.heal_broken.load(Ordering::Relaxed) - broken0;
    report.soak.heal_healed = counts.heal_healed.load(Ordering::Relaxed) - healed0;
    sample_all(mesh, report, "end_of_soak").await;

    // Close.
    counts.phase.store(PHASE_CLOSE, Ordering::Relaxed);
    let started = Instant::now();
    let results: Vec<(Duration, nsm_sdk::Result<()>)> = stream::iter(conns.into_iter().map(|c| {
        let counts = counts.clone();
        async move {
            let t = Instant::now();
            let r = chain
                .close(&mut Cx::client().with_timeout(timeout), c)
                .await;
            counts.closed.fetch_add(1, Ordering::Relaxed);
            (t.elapsed(), r)
        }
    }))
    .buffer_unordered(opts.concurrency.max(1))
    .collect()
    .await;
    report.close.seconds = started.elapsed().as_secs_f64();
    let mut latency = Vec::with_capacity(results.len());
    for (d, r) in results {
        latency.push(d);
        match r {
            Ok(()) => report.close.ok += 1,
            Err(e) => *report.close.errors.entry(code_name(&e)).or_default() += 1,
        }
    }
    report.close.latency = Latency::of(&latency);
    merge(&mut report.other_refresh_errors, counts.take().errors);
    tokio::time::sleep(opts.settle).await;
    sample_all(mesh, report, "after_close").await;
    Ok(())
}

fn merge(into: &mut Errors, from: Errors) {
    for (k, v) in from {
        *into.entry(k).or_default() += v;
    }
}

fn options_json(o: &LoadOptions) -> Value {
    let (mode, target) = match &o.target {
        Target::Sandbox(t) => ("sandbox", format!("{t:?}")),
        Target::Processes(dir) => ("processes", dir.display().to_string()),
        Target::Connect(url) => ("connect", url.to_string()),
    };
    json!({
        "mode": mode, "target": target, "mechanism": o.mechanism.name(),
        "clients": o.clients, "concurrency": o.concurrency,
        "duration_s": o.duration.as_secs_f64(), "token_lifetime_s": o.token_lifetime.as_secs_f64(),
        "network_service": o.network_service, "heal": o.heal,
        "request_timeout_s": o.request_timeout.as_secs_f64(),
        "sample_every_s": o.sample_every.map(|d| d.as_secs_f64()),
        "mesh_log_level": o.mesh_log_level, "mesh_worker_threads": o.mesh_worker_threads,
    })
}

/// The progress line on stderr: redrawn in place on a terminal (5 times a second),
/// a plain line every 10 s otherwise.
struct Progress {
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Progress {
    fn start(counts: Arc<Counts>, opts: &LoadOptions) -> Progress {
        let stop = CancellationToken::new();
        let token = stop.clone();
        let (n, soak) = (opts.clients as u64, opts.duration);
        let terminal = std::io::stderr().is_terminal();
        let every = if terminal {
            Duration::from_millis(200)
        } else {
            Duration::from_secs(10)
        };
        let task = tokio::spawn(async move {
            let started = Instant::now();
            let mut phase_started = (PHASE_WARMUP, Instant::now());
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = token.cancelled() => break,
                    _ = tick.tick() => {}
                }
                let phase = counts.phase.load(Ordering::Relaxed);
                if phase != phase_started.0 {
                    phase_started = (phase, Instant::now());
                }
                let line = progress_line(
                    &counts,
                    phase,
                    phase_started.1.elapsed(),
                    n,
                    soak,
                    started.elapsed(),
                );
                let mut err = std::io::stderr().lock();
                let _ = if terminal {
                    write!(err, "\r{line:<100}")
                } else {
                    writeln!(err, "{line}")
                };
                let _ = err.flush();
            }
            if terminal {
                let _ = writeln!(std::io::stderr());
            }
        });
        Progress { stop, task }
    }

    async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

fn bar(done: f64, total: f64) -> String {
    const WIDTH: usize = 30;
    let filled = if total > 0.0 {
        ((done / total).clamp(0.0, 1.0) * WIDTH as f64) as usize
    } else {
        0
    };
    format!("[{}{}]", "#".repeat(filled), "-".repeat(WIDTH - filled))
}

fn progress_line(
    c: &Counts,
    phase: u8,
    in_phase: Duration,
    n: u64,
    soak: Duration,
    total: Duration,
) -> String {
    let refreshes = c.rerequests.load(Ordering::Relaxed);
    let failed = c.rerequest_failed.load(Ordering::Relaxed);
    let t = total.as_secs_f64();
    match phase {
        PHASE_WARMUP => format!("{t:6.1}s warm-up"),
        PHASE_SETUP => {
            let done = c.setup_done.load(Ordering::Relaxed);
            format!(
                "{t:6.1}s setup {} {done}/{n} errors {}",
                bar(done as f64, n as f64),
                c.setup_failed.load(Ordering::Relaxed)
            )
        }
        PHASE_SOAK => format!(
            "{t:6.1}s soak  {} {:.0}/{:.0}s refreshes {refreshes} errors {failed} heal {}/{}",
            bar(in_phase.as_secs_f64(), soak.as_secs_f64()),
            in_phase.as_secs_f64(),
            soak.as_secs_f64(),
            c.heal_broken.load(Ordering::Relaxed),
            c.heal_healed.load(Ordering::Relaxed),
        ),
        PHASE_CLOSE => {
            let done = c.closed.load(Ordering::Relaxed);
            format!("{t:6.1}s close {} {done}", bar(done as f64, n as f64))
        }
        _ => format!("{t:6.1}s done"),
    }
}

/// Writes `report` as JSON to `path`.
pub fn write_json(report: &Report, path: &Path) -> Result<(), Failure> {
    let text = serde_json::to_string_pretty(&report.json())
        .map_err(|e| Failure::runtime(format!("cannot encode the report: {e}")))?;
    std::fs::write(path, text + "\n")
        .map_err(|e| Failure::runtime(format!("cannot write {}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let ms: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        let l = Latency::of(&ms);
        assert_eq!(
            (l.count, l.p50, l.p90, l.p99, l.max),
            (100, 50.0, 90.0, 99.0, 100.0)
        );
        assert!((l.mean - 50.5).abs() < 1e-9);
        let one = Latency::of(&[Duration::from_millis(7)]);
        assert_eq!((one.p50, one.p99, one.max), (7.0, 7.0, 7.0));
        assert_eq!(Latency::of(&[]), Latency::default());
    }

    #[test]
    fn the_histogram_keeps_percentiles_within_two_percent() {
        let mut h = Histogram::default();
        for us in 1..=100_000u64 {
            h.record(Duration::from_micros(us));
        }
        let l = h.latency();
        assert_eq!(l.count, 100_000);
        assert_eq!(l.max, 100.0);
        assert!((l.mean - 50.0).abs() < 0.01, "{}", l.mean);
        for (got, want) in [(l.p50, 50.0), (l.p90, 90.0), (l.p99, 99.0)] {
            assert!(got <= want && got > want * 0.98, "{got} for {want}");
        }
        // Exact below 64 us, and fixed memory: a million more samples add no bucket.
        let mut small = Histogram::default();
        small.record(Duration::from_micros(7));
        assert_eq!(small.latency().p50, 0.007);
        let buckets = h.buckets.len();
        for _ in 0..1_000_000 {
            h.record(Duration::from_micros(12_345));
        }
        assert_eq!(h.buckets.len(), buckets);
        for b in 0..2000 {
            assert_eq!(Histogram::bucket(Histogram::low(b)), b, "bucket {b}");
        }
        assert_eq!(Histogram::default().latency(), Latency::default());
    }

    #[tokio::test]
    async fn kernel_clients_need_processes_not_the_sandbox() {
        let opts = LoadOptions {
            mechanism: LoadMechanism::Kernel,
            ..sandbox_options()
        };
        let err = run_load(opts, CancellationToken::new()).await.unwrap_err();
        assert!(matches!(err, Failure::Config(_)), "{err}");
    }

    #[test]
    fn the_report_computes_growth_per_connection() {
        let mut r = Report::default();
        r.setup.ok = 1000;
        let at = |rss: f64, fds: f64| {
            BTreeMap::from([
                ("process_resident_memory_bytes".to_string(), rss),
                ("process_open_fds".to_string(), fds),
            ])
        };
        r.processes.insert(
            "nsmgr".into(),
            BTreeMap::from([
                ("start".to_string(), at(10e6, 20.0)),
                ("after_setup".to_string(), at(20e6, 20.0)),
                ("end_of_soak".to_string(), at(20.5e6, 21.0)),
            ]),
        );
        r.soak.errors.insert("Unavailable".into(), 2);
        let j = r.json();
        let g = &j["growth"]["nsmgr"];
        assert_eq!(
            g["process_resident_memory_bytes"]["per_connection"],
            10_000.0
        );
        assert_eq!(g["process_resident_memory_bytes"]["soak"], 0.5e6);
        assert_eq!(g["process_open_fds"]["soak"], 1.0);
        assert_eq!(g["nsm_live_tasks"]["setup"], Value::Null);
        assert_eq!(
            j["errors_total"], 3,
            "two refreshes and the missing warm-up"
        );
        assert!(r.summary().contains("nsmgr:"));
    }

    fn sandbox_options() -> LoadOptions {
        LoadOptions {
            clients: 50,
            concurrency: 10,
            duration: Duration::from_secs(3),
            token_lifetime: Duration::from_secs(6),
            network_service: "load-test".into(),
            settle: Duration::from_millis(100),
            ..LoadOptions::new(Target::Sandbox(Transport::Memory))
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_sandbox_run_connects_refreshes_and_closes_everything() {
        let opts = LoadOptions {
            sample_every: Some(Duration::from_millis(1200)),
            ..sandbox_options()
        };
        let report = run_load(opts, CancellationToken::new()).await.unwrap();
        assert_eq!(report.errors_total(), 0, "{}", report.summary());
        assert_eq!(report.setup.ok, 50);
        assert_eq!(report.setup.latency.count, 50);
        assert_eq!(report.close.ok, 50);
        // 6 s tokens: every connection refreshes 1.2 to 2.4 s after its last Request,
        // so in 3 s each refreshes once or twice (a loaded machine delays some).
        assert!(
            report.soak.refreshes >= 25,
            "{} refreshes",
            report.soak.refreshes
        );
        assert_eq!(report.soak.heal_broken, 0);
        let own = &report.processes["nsm-load"];
        assert!(STAGES.iter().all(|s| own.contains_key(*s)), "{own:?}");
        // Two samples during the 3 s soak, in order between after_setup and end_of_soak.
        assert_eq!(report.stages.len(), 7, "{:?}", report.stages);
        assert_eq!(report.stages[2], "after_setup");
        assert!(report.stages[3].starts_with("soak+"), "{:?}", report.stages);
        assert!(report.stages[4].starts_with("soak+"), "{:?}", report.stages);
        assert_eq!(report.stages[5], "end_of_soak");
        // The SDK's tasks of the connections are gone after Close.
        assert!(
            own["after_setup"]["nsm_live_tasks"] > own["start"]["nsm_live_tasks"],
            "{own:?}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stop_cuts_the_soak_short_and_still_closes() {
        let opts = LoadOptions {
            duration: Duration::from_secs(3600),
            ..sandbox_options()
        };
        let stop = CancellationToken::new();
        let stopper = stop.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(2)).await;
            stopper.cancel();
        });
        let report = tokio::time::timeout(Duration::from_secs(30), run_load(opts, stop))
            .await
            .expect("the stop ended the soak")
            .unwrap();
        assert!(report.interrupted);
        assert_eq!(report.close.ok, 50);
    }
}
