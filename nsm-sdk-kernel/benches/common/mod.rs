//! What the kernel benches share: namespaces made by the bench (`nsmt-<pid>-<n>`,
//! deleted by a guard even when the bench fails), the in-process mesh of
//! `tests/mesh.rs` (registry, nsmgr, forwarder, NSE over unix sockets) with either the
//! KERNEL or the NOOP mechanism, a timing handler, and percentile helpers.

#![allow(dead_code, unreachable_pub)]

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nsm_sdk::chains::{
    client, endpoint, forwarder, nsmgr, registry_server, ClientOptions, EndpointOptions,
    ForwarderOptions, NsmgrOptions,
};
use nsm_sdk::handlers::{mechanisms, noop_server, point_to_point};
use nsm_sdk::proto::connection::Connection;
use nsm_sdk::proto::networkservice::NetworkServiceRequest;
use nsm_sdk::proto::registry::{NetworkService, NetworkServiceEndpoint, NetworkServiceLabels};
use nsm_sdk::registry::RegistryChain;
use nsm_sdk::transport::{grpc_registry, serve, Channels, Server, Url};
use nsm_sdk::wire::types;
use nsm_sdk::{async_trait, Chain, Cx, Handler, Next};
use nsm_sdk_kernel::{
    kernel_client, kernel_endpoint, kernel_forwarder_client, kernel_forwarder_server,
};
use serde_json::Value;
use tokio::runtime::{Builder, Runtime};
use tokio_util::sync::CancellationToken;

/// Any failure of a bench step.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// A bench step's result.
pub type Res<T> = Result<T, BoxError>;

pub const SERVICE: &str = "kernel-svc";
pub const PREFIX: &str = "172.16.50.0/24";
/// The client's interface name in its pod (fixed: the pair is deleted on every Close).
pub const CLIENT_IF: &str = "nsm-1";

static NEXT: AtomicU32 = AtomicU32::new(0);

pub fn unique(what: &str) -> String {
    format!(
        "nsmt-{}-{what}{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Runs a command, returns (success, stdout + stderr).
pub fn run(cmd: &str, args: &[&str]) -> (bool, String) {
    match std::process::Command::new(cmd).args(args).output() {
        Ok(o) => (
            o.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
        ),
        Err(e) => (false, e.to_string()),
    }
}

/// Runs a command that must succeed.
pub fn must(cmd: &str, args: &[&str]) -> Res<String> {
    let (ok, out) = run(cmd, args);
    if ok {
        Ok(out)
    } else {
        Err(format!("{cmd} {args:?}: {out}").into())
    }
}

/// Root, `ip` and `ping` are needed; otherwise the bench prints why and does nothing.
pub fn can_run() -> bool {
    let root = std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0);
    let tools = run("ip", &["-V"]).0 && run("ping", &["-V"]).0;
    if !root || !tools {
        eprintln!("skipped: kernel benches need root, ip and ping (root={root}, tools={tools})");
    }
    root && tools
}

/// A named namespace (a "pod") that is deleted when the guard drops (also on panic).
pub struct Ns {
    pub name: String,
}

impl Ns {
    pub fn new() -> Res<Ns> {
        let name = unique("");
        let _ = run("ip", &["netns", "del", &name]);
        must("ip", &["netns", "add", &name])?;
        let ns = Ns { name };
        must("ip", &["-n", &ns.name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn url(&self) -> String {
        format!("file:///run/netns/{}", self.name)
    }

    pub fn ip(&self, args: &[&str]) -> Res<String> {
        let mut full = vec!["-n", &self.name];
        full.extend_from_slice(args);
        must("ip", &full)
    }

    pub fn json(&self, args: &[&str]) -> Res<Vec<Value>> {
        let mut full = vec!["-j"];
        full.extend_from_slice(args);
        let out = self.ip(&full)?;
        match serde_json::from_str::<Value>(&out) {
            Ok(Value::Array(v)) => Ok(v),
            _ if out.trim().is_empty() => Ok(Vec::new()),
            other => Err(format!("ip -n {} {full:?}: {other:?}", self.name).into()),
        }
    }

    /// Interface names, sorted.
    pub fn links(&self) -> Res<Vec<String>> {
        let mut v: Vec<String> = self
            .json(&["link", "show"])?
            .iter()
            .filter_map(|l| l["ifname"].as_str().map(str::to_string))
            .collect();
        v.sort();
        Ok(v)
    }

    /// The one interface besides `lo`.
    pub fn mesh_link(&self) -> Res<String> {
        let links: Vec<String> = self.links()?.into_iter().filter(|l| l != "lo").collect();
        match &links[..] {
            [one] => Ok(one.clone()),
            _ => Err(format!(
                "{}: expected one interface besides lo: {links:?}",
                self.name
            )
            .into()),
        }
    }

    /// What the data plane of `dev` looks like, without what names or numbers a device
    /// (ifindex, MAC, IPv6 link-local): MTU, flags, qdisc, queues, GSO/TSO/GRO limits,
    /// addresses, main-table IPv4 routes.
    pub fn shape(&self, dev: &str) -> Res<Vec<String>> {
        let mut v = Vec::new();
        for l in self.json(&["-d", "link", "show", "dev", dev])? {
            v.push(format!(
                "mtu {} qlen {} flags {} qdisc {}",
                l["mtu"], l["txqlen"], l["flags"], l["qdisc"]
            ));
            v.push(format!(
                "queues tx {} rx {} gso {}/{} tso {}/{} gro {} addrgen {}",
                l["num_tx_queues"],
                l["num_rx_queues"],
                l["gso_max_size"],
                l["gso_max_segs"],
                l["tso_max_size"],
                l["tso_max_segs"],
                l["gro_max_size"],
                l["inet6_addr_gen_mode"]
            ));
        }
        for l in self.json(&["addr", "show", "dev", dev])? {
            for a in l["addr_info"].as_array().into_iter().flatten() {
                if a["scope"] == "global" {
                    v.push(format!("addr {}/{}", a["local"], a["prefixlen"]));
                }
            }
        }
        for r in self.json(&["-4", "route", "show"])? {
            v.push(format!(
                "route {} scope {} gw {} proto {}",
                r["dst"], r["scope"], r["gateway"], r["protocol"]
            ));
        }
        v.sort();
        Ok(v)
    }

    /// `ping -c1` from inside the namespace.
    pub fn ping(&self, addr: &str) -> bool {
        run(
            "ip",
            &["netns", "exec", &self.name, "ping", "-c1", "-W1", addr],
        )
        .0
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = run("ip", &["netns", "del", &self.name]);
    }
}

/// Times what passes through it (Request and Close separately), in call order.
#[derive(Clone, Default)]
pub struct Timer {
    pub requests: Arc<Mutex<Vec<Duration>>>,
    pub closes: Arc<Mutex<Vec<Duration>>>,
}

impl Timer {
    pub fn take(&self) -> (Vec<Duration>, Vec<Duration>) {
        let r = std::mem::take(&mut *self.requests.lock().unwrap_or_else(|p| p.into_inner()));
        let c = std::mem::take(&mut *self.closes.lock().unwrap_or_else(|p| p.into_inner()));
        (r, c)
    }
}

#[async_trait]
impl Handler for Timer {
    async fn request(
        &self,
        cx: &mut Cx,
        req: NetworkServiceRequest,
        next: Next,
    ) -> nsm_sdk::Result<Connection> {
        let t = Instant::now();
        let out = next.request(cx, req).await;
        let d = t.elapsed();
        self.requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(d);
        out
    }
    async fn close(&self, cx: &mut Cx, conn: Connection, next: Next) -> nsm_sdk::Result<()> {
        let t = Instant::now();
        let out = next.close(cx, conn).await;
        let d = t.elapsed();
        self.closes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(d);
        out
    }
}

/// Which mechanism the mesh uses end to end.
pub enum Kind<'a> {
    /// KERNEL: the client in `nsc`, the endpoint in `nse`. With `timers`, the
    /// forwarder's client chain is `[timers.0, kernel_forwarder_client, timers.1]`: the
    /// first sees the pair's creation plus the endpoint call, the second the endpoint
    /// call alone.
    Kernel {
        nsc: &'a Ns,
        nse: &'a Ns,
        timers: Option<(Timer, Timer)>,
    },
    /// NOOP (the forwarder's and the client's defaults), as `nsm-sdk/benches/request.rs`.
    Noop,
}

/// A registry, a manager, a forwarder and one endpoint, served over unix sockets, and
/// a client chain (no retry); dropped, it stops them and removes its directory.
/// Drop it inside its runtime (`rt.enter()`).
pub struct Mesh {
    pub client: Chain,
    dir: PathBuf,
    root: CancellationToken,
    _servers: Vec<Server>,
}

impl Mesh {
    pub async fn start(kind: Kind<'_>) -> Res<Mesh> {
        let dir = std::env::temp_dir().join(unique("mesh"));
        std::fs::create_dir_all(&dir)?;
        let url = |name: &str| Url::Unix(dir.join(format!("{name}.sock")));
        let (registry_url, nsmgr_url, fwd_url, nse_url) =
            (url("registry"), url("nsmgr"), url("forwarder"), url("nse"));
        let channels = Channels::new();
        let root = CancellationToken::new();
        let mut servers = Vec::new();
        // From here on the directory is removed on failure too.
        let mut mesh = Mesh {
            client: Chain::builder().build(),
            dir,
            root: root.clone(),
            _servers: Vec::new(),
        };

        let registry = registry_server(Duration::from_secs(3600));
        servers.push(serve(&registry_url, registry.services()).await?);
        let mgr = nsmgr(
            NsmgrOptions::new("nsmgr", nsmgr_url.clone(), registry_url)
                .channels(channels.clone())
                .root(root.child_token()),
        );
        servers.push(serve(&nsmgr_url, mgr.services()).await?);

        let mut fwd_opts = ForwarderOptions::new("forwarder", nsmgr_url.clone())
            .channels(channels.clone())
            .root(root.child_token());
        let mut nse_opts = EndpointOptions::new()
            .root(root.child_token())
            .handler(point_to_point(vec![PREFIX.parse()?]));
        let mut client_opts = ClientOptions::new("nsc", nsmgr_url.clone())
            .channels(channels.clone())
            .root(root.child_token())
            .retry(None);
        match kind {
            Kind::Kernel { nsc, nse, timers } => {
                let fwd_client: Arc<dyn Handler> = Arc::new(kernel_forwarder_client());
                let client_side = match timers {
                    Some((total, nse_call)) => {
                        vec![
                            Arc::new(total) as Arc<dyn Handler>,
                            fwd_client,
                            Arc::new(nse_call),
                        ]
                    }
                    None => vec![fwd_client],
                };
                fwd_opts = fwd_opts
                    .server_mechanisms(mechanisms().with(types::KERNEL, kernel_forwarder_server()))
                    .client_mechanisms(client_side);
                nse_opts =
                    nse_opts.handler(mechanisms().with(types::KERNEL, kernel_endpoint(nse.url())));
                client_opts = client_opts
                    .mechanisms(vec![])
                    .handler(kernel_client(nsc.url()).ifname(CLIENT_IF));
            }
            Kind::Noop => {
                nse_opts = nse_opts.handler(mechanisms().with(types::NOOP, noop_server()));
            }
        }
        let fwd = forwarder(fwd_opts);
        servers.push(serve(&fwd_url, fwd.services()).await?);
        let ep = endpoint("nse", nse_opts);
        servers.push(serve(&nse_url, ep.services()).await?);
        mesh._servers = servers;

        let front_ns = RegistryChain::<NetworkService>::builder()
            .push(grpc_registry(channels.clone(), nsmgr_url.clone()))
            .build();
        let front_nse = RegistryChain::<NetworkServiceEndpoint>::builder()
            .push(grpc_registry(channels.clone(), nsmgr_url.clone()))
            .build();
        front_ns
            .register(
                &mut Cx::client(),
                NetworkService {
                    name: SERVICE.into(),
                    payload: "IP".into(),
                    ..Default::default()
                },
            )
            .await?;
        front_nse
            .register(&mut Cx::client(), fwd.registration(&fwd_url))
            .await?;
        front_nse
            .register(
                &mut Cx::client(),
                NetworkServiceEndpoint {
                    name: "nse".into(),
                    network_service_names: vec![SERVICE.into()],
                    network_service_labels: [(
                        SERVICE.to_string(),
                        NetworkServiceLabels::default(),
                    )]
                    .into(),
                    url: nse_url.to_string(),
                    ..Default::default()
                },
            )
            .await?;
        mesh.client = client(client_opts);
        Ok(mesh)
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        self.root.cancel();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn cx() -> Cx {
    Cx::client().with_timeout(Duration::from_secs(10))
}

/// A first Request for a fresh connection.
pub fn request() -> NetworkServiceRequest {
    NetworkServiceRequest {
        connection: Some(Connection {
            network_service: SERVICE.into(),
            ..Default::default()
        }),
        mechanism_preferences: vec![],
    }
}

/// The names of the path segments of `conn`.
pub fn path_names(conn: &Connection) -> Vec<String> {
    conn.path
        .as_ref()
        .map(|p| p.path_segments.iter().map(|s| s.name.clone()).collect())
        .unwrap_or_default()
}

/// The client's and the endpoint's address (`a.b.c.d/32`) of a connection.
pub fn addrs(conn: &Connection) -> Res<(String, String)> {
    let ipc = conn
        .context
        .as_ref()
        .and_then(|c| c.ip_context.as_ref())
        .ok_or("the connection has no IP context")?;
    let host = |s: Option<&String>| -> Res<String> {
        let s = s.ok_or("the IP context has no address")?;
        Ok(if s.contains('/') {
            s.clone()
        } else {
            format!("{s}/32")
        })
    };
    Ok((
        host(ipc.src_ip_addrs.first())?,
        host(ipc.dst_ip_addrs.first())?,
    ))
}

pub fn ip_of(cidr: &str) -> &str {
    cidr.split('/').next().unwrap_or(cidr)
}

/// The runtime every component of the mesh runs on: `multi_thread_2` (two workers, as
/// many as the machine's cores) or `current_thread`.
pub fn runtime(kind: &str) -> Res<Runtime> {
    Ok(match kind {
        "current_thread" => Builder::new_current_thread().enable_all().build()?,
        _ => Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?,
    })
}

/// Percentiles of a sample, sorted on construction.
pub struct Stats {
    pub n: usize,
    pub mean: Duration,
    pub p50: Duration,
    pub p99: Duration,
    pub max: Duration,
}

impl Stats {
    pub fn of(samples: &[Duration]) -> Stats {
        let mut s = samples.to_vec();
        s.sort();
        let n = s.len();
        if n == 0 {
            return Stats {
                n,
                mean: Duration::ZERO,
                p50: Duration::ZERO,
                p99: Duration::ZERO,
                max: Duration::ZERO,
            };
        }
        Stats {
            n,
            mean: s.iter().sum::<Duration>() / n as u32,
            p50: s[n / 2],
            p99: s[(n * 99).div_ceil(100) - 1],
            max: s[n - 1],
        }
    }

    /// `mean m, p50 a, p99 b, max c` in ms.
    pub fn line(&self) -> String {
        format!(
            "n {}, mean {:.3} ms, p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms",
            self.n,
            ms(self.mean),
            ms(self.p50),
            ms(self.p99),
            ms(self.max)
        )
    }
}

pub fn ms(d: Duration) -> f64 {
    d.as_nanos() as f64 / 1e6
}

/// CPU time of this process so far, all threads, user + system (clock ticks of 10 ms).
pub fn cpu_time() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| -> Option<u64> { fields.get(i)?.parse::<u64>().ok() };
    Some(Duration::from_millis((tick(11)? + tick(12)?) * 10))
}

/// The machine's load average.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".to_string())
}

/// `nproc`, `uname -r`, `rustc -V`: printed at the start of each bench.
pub fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = run("uname", &["-r"]).1.trim().to_string();
    let rustc = run("rustc", &["-V"]).1.trim().to_string();
    format!(
        "nproc {cpus}, kernel {kernel}, {rustc}, loadavg {}",
        loadavg()
    )
}
