//! What the VXLAN benches share: namespaces made by the bench (`nsmt-<pid>-<n>`,
//! deleted by a guard even when the bench fails), two "nodes" joined by a veth underlay
//! (192.0.2.1/24, 192.0.2.2/24, MTU 1500), the two-node mesh of `tests/mesh.rs`
//! (registry, a manager and a forwarder per node, an endpoint on node 2, a client chain
//! on node 1, all over unix sockets) with either the VXLAN or the NOOP mechanism, and
//! percentile helpers.

#![allow(dead_code, unreachable_pub)]

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

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
use nsm_sdk::{Chain, Cx};
use nsm_sdk_kernel::{kernel_client, kernel_endpoint, NetNs};
use nsm_sdk_vxlan::mechanism::{vxlan_forwarder_mechanisms, Tunnel};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

/// Any failure of a bench step.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// A bench step's result.
pub type Res<T> = Result<T, BoxError>;

pub const SERVICE: &str = "vxlan-svc";
pub const PREFIX: &str = "172.16.70.0/24";
/// The client's interface name in its pod.
pub const CLIENT_IF: &str = "nsm-1";
/// The nodes' underlay addresses.
pub const UNDERLAY: [&str; 2] = ["192.0.2.1", "192.0.2.2"];

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
        eprintln!("skipped: VXLAN benches need root, ip and ping (root={root}, tools={tools})");
    }
    root && tools
}

/// A named namespace (a node or a pod) that is deleted when the guard drops.
pub struct Ns {
    pub name: String,
}

impl Ns {
    pub fn new() -> Res<Ns> {
        let name = unique("");
        let _ = run("ip", &["netns", "del", &name]);
        must("ip", &["netns", "add", &name])?;
        let ns = Ns { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn url(&self) -> String {
        format!("file:///run/netns/{}", self.name)
    }

    pub fn open(&self) -> Res<NetNs> {
        Ok(NetNs::named(&self.name)?)
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
        let json = match (out.find('['), out.rfind(']')) {
            (Some(a), Some(b)) if a < b => &out[a..=b],
            _ => out.as_str(),
        };
        match serde_json::from_str::<Value>(json) {
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

    /// `(kind, mtu, vni)` of `dev` (vni 0 when it is not VXLAN).
    pub fn kind(&self, dev: &str) -> Res<(String, u64, u64)> {
        let l = self
            .json(&["-d", "link", "show", "dev", dev])?
            .pop()
            .unwrap_or(Value::Null);
        Ok((
            l["linkinfo"]["info_kind"]
                .as_str()
                .unwrap_or("")
                .to_string(),
            l["mtu"].as_u64().unwrap_or(0),
            l["linkinfo"]["info_data"]["id"].as_u64().unwrap_or(0),
        ))
    }

    /// `ping -c1` from inside the namespace.
    pub fn ping(&self, addr: &str) -> bool {
        run(
            "ip",
            &["netns", "exec", &self.name, "ping", "-c1", "-W2", addr],
        )
        .0
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = run("ip", &["netns", "del", &self.name]);
    }
}

/// Two nodes joined by a veth underlay `ul0` with MTU 1500.
pub fn underlay() -> Res<[Ns; 2]> {
    let nodes = [Ns::new()?, Ns::new()?];
    nodes[0].ip(&[
        "link",
        "add",
        "ul0",
        "type",
        "veth",
        "peer",
        "name",
        "ul0",
        "netns",
        &nodes[1].name,
    ])?;
    for (n, addr) in nodes.iter().zip(UNDERLAY) {
        n.ip(&["addr", "add", &format!("{addr}/24"), "dev", "ul0"])?;
        n.ip(&["link", "set", "ul0", "mtu", "1500", "up"])?;
    }
    Ok(nodes)
}

/// Which mechanism the two-node mesh uses.
pub enum Kind<'a> {
    /// KERNEL pods joined by VXLAN: the client in `nsc` on node 1, the endpoint in
    /// `nse` on node 2.
    Vxlan { nsc: &'a Ns, nse: &'a Ns },
    /// NOOP everywhere: the six gRPC hops alone.
    Noop,
}

/// A registry, per node a manager and a forwarder, an endpoint on node 2 and a client
/// chain on node 1 (no retry); dropped, it stops them and removes its directory. Drop
/// it inside its runtime.
pub struct Mesh {
    pub client: Chain,
    pub tunnels: Vec<Tunnel>,
    dir: PathBuf,
    root: CancellationToken,
    _servers: Vec<Server>,
}

impl Mesh {
    pub async fn start(nodes: &[Ns; 2], kind: Kind<'_>) -> Res<Mesh> {
        let dir = std::env::temp_dir().join(unique("mesh"));
        std::fs::create_dir_all(&dir)?;
        let url = |name: &str| Url::Unix(dir.join(format!("{name}.sock")));
        let channels = Channels::new();
        let root = CancellationToken::new();
        let mut mesh = Mesh {
            client: Chain::builder().build(),
            tunnels: Vec::new(),
            dir: dir.clone(),
            root: root.clone(),
            _servers: Vec::new(),
        };
        let mut servers = Vec::new();
        let registry_url = url("registry");
        let registry = registry_server(Duration::from_secs(3600));
        servers.push(serve(&registry_url, registry.services()).await?);
        let front = |nsmgr_url: &Url| {
            (
                RegistryChain::<NetworkService>::builder()
                    .push(grpc_registry(channels.clone(), nsmgr_url.clone()))
                    .build(),
                RegistryChain::<NetworkServiceEndpoint>::builder()
                    .push(grpc_registry(channels.clone(), nsmgr_url.clone()))
                    .build(),
            )
        };
        let mut nsmgr_urls = Vec::new();
        for (i, node) in nodes.iter().enumerate() {
            let n = i + 1;
            let nsmgr_url = url(&format!("nsmgr-{n}"));
            let mgr = nsmgr(
                NsmgrOptions::new(
                    format!("nsmgr-{n}"),
                    nsmgr_url.clone(),
                    registry_url.clone(),
                )
                .channels(channels.clone())
                .root(root.child_token()),
            );
            servers.push(serve(&nsmgr_url, mgr.services()).await?);
            let mut opts = ForwarderOptions::new(format!("fwd-{n}"), nsmgr_url.clone())
                .channels(channels.clone())
                .root(root.child_token());
            if let Kind::Vxlan { .. } = kind {
                let tunnel = Tunnel::builder(UNDERLAY[i].parse()?)
                    .netns(node.open()?)
                    .build()
                    .await?;
                let (server_side, client_side) = vxlan_forwarder_mechanisms(tunnel.clone());
                opts = opts
                    .server_mechanisms(server_side)
                    .client_mechanisms(client_side);
                mesh.tunnels.push(tunnel);
            }
            let fwd = forwarder(opts);
            let fwd_url = url(&format!("fwd-{n}"));
            servers.push(serve(&fwd_url, fwd.services()).await?);
            front(&nsmgr_url)
                .1
                .register(&mut Cx::client(), fwd.registration(&fwd_url))
                .await?;
            nsmgr_urls.push(nsmgr_url);
        }

        let mut nse_opts = EndpointOptions::new()
            .root(root.child_token())
            .handler(point_to_point(vec![PREFIX.parse()?]));
        let mut client_opts = ClientOptions::new("nsc", nsmgr_urls[0].clone())
            .channels(channels.clone())
            .root(root.child_token())
            .retry(None);
        match kind {
            Kind::Vxlan { nsc, nse } => {
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
        let nse_url = url("nse");
        let ep = endpoint("nse", nse_opts);
        servers.push(serve(&nse_url, ep.services()).await?);
        let (ns_reg, nse_reg) = front(&nsmgr_urls[1]);
        ns_reg
            .register(
                &mut Cx::client(),
                NetworkService {
                    name: SERVICE.into(),
                    payload: "IP".into(),
                    ..Default::default()
                },
            )
            .await?;
        nse_reg
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
        mesh._servers = servers;
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

    /// `n, mean, p50, p99, max` in ms.
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

/// The machine's load average.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".to_string())
}

/// `nproc`, `uname -r`: printed at the start of each bench.
pub fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = run("uname", &["-r"]).1.trim().to_string();
    format!("nproc {cpus}, kernel {kernel}, loadavg {}", loadavg())
}
