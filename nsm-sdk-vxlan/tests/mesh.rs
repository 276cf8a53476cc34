//! Kernel2VXLAN2Kernel through two nodes' meshes, as root.
//!
//! Two "nodes" are namespaces joined by a veth underlay `ul0` (192.0.2.1/24 and
//! 192.0.2.2/24, MTU 1500). Each node has a manager and a forwarder whose [`Tunnel`]
//! is bound to the node's namespace (so its VXLAN devices' UDP sockets and VNIs live
//! there); a registry serves both. Everything runs in this test process, served over
//! unix sockets in a temporary directory. Pods are namespaces too
//! (`ip netns add nsmt-<pid>-<n>`, deleted by a guard even when the test fails), named
//! `file:///run/netns/<name>`: endpoints with point-to-point IPAM and `kernel_endpoint`,
//! clients with `kernel_client`. What the kernel holds is read with `ip -j` (an
//! independent observer), traffic checked with `ping` from inside a pod. Without root
//! (or without `ip`/`ping`) each test prints a skip line and passes.

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nsm_sdk::chains::{
    client, endpoint, forwarder, nsmgr, registry_server, ClientOptions, EndpointOptions,
    ForwarderOptions, NsmgrOptions,
};
use nsm_sdk::handlers::{mechanisms, point_to_point};
use nsm_sdk::proto::connection::Connection;
use nsm_sdk::proto::networkservice::NetworkServiceRequest;
use nsm_sdk::proto::registry::{NetworkService, NetworkServiceEndpoint, NetworkServiceLabels};
use nsm_sdk::registry::RegistryChain;
use nsm_sdk::transport::{grpc_registry, serve, Channels, Server, Url};
use nsm_sdk::wire::{params, types};
use nsm_sdk::{async_trait, Chain, Cx, Handler, Next};
use nsm_sdk_kernel::{kernel_client, kernel_endpoint, NetNs};
use nsm_sdk_vxlan::mechanism::{vxlan_forwarder_mechanisms, Tunnel};
use nsm_sdk_vxlan::{Vni, VniAllocator};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

static NEXT: AtomicU32 = AtomicU32::new(0);

fn unique(what: &str) -> String {
    format!(
        "nsmt-{}-{what}{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// A named namespace (a node or a pod) that is deleted when the guard drops (also on
/// panic).
struct Ns {
    name: String,
}

impl Ns {
    fn new() -> Ns {
        let name = unique("");
        let _ = run("ip", &["netns", "del", &name]);
        let out = run("ip", &["netns", "add", &name]);
        assert!(out.0, "ip netns add {name}: {}", out.1);
        let ns = Ns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    fn url(&self) -> String {
        format!("file:///run/netns/{}", self.name)
    }

    fn ip(&self, args: &[&str]) -> String {
        let mut full = vec!["-n", &self.name];
        full.extend_from_slice(args);
        let (ok, out) = run("ip", &full);
        assert!(ok, "ip {full:?}: {out}");
        out
    }

    fn json(&self, args: &[&str]) -> Vec<Value> {
        let mut full = vec!["-j"];
        full.extend_from_slice(args);
        let out = self.ip(&full);
        // `ip` may print a warning (stderr is merged into `out`), e.g. "Peer netns
        // reference is invalid." when another test's namespace is gone: parse the JSON
        // array only.
        let json = match (out.find('['), out.rfind(']')) {
            (Some(a), Some(b)) if a < b => &out[a..=b],
            _ => out.as_str(),
        };
        match serde_json::from_str::<Value>(json) {
            Ok(Value::Array(v)) => v,
            _ if out.trim().is_empty() => Vec::new(),
            other => panic!("ip {full:?}: {other:?}"),
        }
    }

    /// Interface names, sorted.
    fn links(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .json(&["link", "show"])
            .iter()
            .filter_map(|l| l["ifname"].as_str().map(str::to_string))
            .collect();
        v.sort();
        v
    }

    /// The one interface the mesh made (everything but `lo`).
    fn mesh_link(&self) -> String {
        let links: Vec<String> = self.links().into_iter().filter(|l| l != "lo").collect();
        assert_eq!(links.len(), 1, "{}: {links:?}", self.name);
        links[0].clone()
    }

    fn link(&self, dev: &str) -> Value {
        self.json(&["-d", "link", "show", "dev", dev])
            .pop()
            .unwrap_or(Value::Null)
    }

    /// `(vni, local, remote, port)` of the VXLAN device `dev`.
    fn vxlan(&self, dev: &str) -> (u64, String, String, u64) {
        let l = self.link(dev);
        assert_eq!(l["linkinfo"]["info_kind"], "vxlan", "{dev}: {l}");
        let d = &l["linkinfo"]["info_data"];
        (
            d["id"].as_u64().unwrap_or(0),
            d["local"].as_str().unwrap_or("").to_string(),
            d["remote"].as_str().unwrap_or("").to_string(),
            d["port"].as_u64().unwrap_or(0),
        )
    }

    /// Global addresses of `dev`, e.g. `["172.16.60.1/32"]`.
    fn addresses(&self, dev: &str) -> Vec<String> {
        let mut v = Vec::new();
        for l in self.json(&["addr", "show", "dev", dev]) {
            for a in l["addr_info"].as_array().into_iter().flatten() {
                if a["scope"] == "global" {
                    v.push(format!(
                        "{}/{}",
                        a["local"].as_str().unwrap_or("?"),
                        a["prefixlen"]
                    ));
                }
            }
        }
        v.sort();
        v
    }

    /// What a refresh must not change: each interface (index, MAC, MTU, flags), its
    /// global addresses and the main-table routes (without IPv6 link-local ones).
    fn state(&self) -> Vec<String> {
        let mut v = Vec::new();
        for l in self.json(&["link", "show"]) {
            let name = l["ifname"].as_str().unwrap_or("?").to_string();
            v.push(format!(
                "link {name} index {} mac {} mtu {} flags {}",
                l["ifindex"], l["address"], l["mtu"], l["flags"]
            ));
            for a in self.addresses(&name) {
                v.push(format!("addr {name} {a}"));
            }
        }
        for fam in ["-4", "-6"] {
            for r in self.json(&[fam, "route", "show"]) {
                if !r["dst"].as_str().unwrap_or("").starts_with("fe80:") {
                    v.push(format!("route {r}"));
                }
            }
        }
        v
    }

    /// What a connection could leave behind: links, all addresses, the routes of
    /// every table and the policy rules, and for a pod the neighbour entries. A node's
    /// view leaves out what its underlay gets on its own schedule: the neighbour
    /// entries and the IPv6 link-local address and routes.
    fn everything(&self, pod: bool) -> Vec<String> {
        let mut v = Vec::new();
        for l in self.json(&["link", "show"]) {
            v.push(format!("link {} mtu {}", l["ifname"], l["mtu"]));
        }
        for l in self.json(&["addr", "show"]) {
            for a in l["addr_info"].as_array().into_iter().flatten() {
                v.push(format!(
                    "addr {} {}/{}",
                    l["ifname"], a["local"], a["prefixlen"]
                ));
            }
        }
        for fam in ["-4", "-6"] {
            for r in self.json(&[fam, "route", "show", "table", "all"]) {
                v.push(format!("route {r}"));
            }
            for r in self.json(&[fam, "rule", "show"]) {
                v.push(format!("rule {r}"));
            }
        }
        if pod {
            for n in self.json(&["neigh", "show"]) {
                v.push(format!("neigh {n}"));
            }
        } else {
            v.retain(|e| !e.contains("fe80:"));
        }
        v.sort();
        v
    }

    /// (tx packets, rx packets) of `dev`.
    fn counters(&self, dev: &str) -> (u64, u64) {
        let l = self
            .json(&["-s", "link", "show", "dev", dev])
            .pop()
            .unwrap_or(Value::Null);
        let stats = &l["stats64"];
        (
            stats["tx"]["packets"].as_u64().unwrap_or(0),
            stats["rx"]["packets"].as_u64().unwrap_or(0),
        )
    }

    /// `ping -c1` from inside the namespace, with extra arguments.
    async fn ping_with(&self, extra: &[&str], addr: &str) -> bool {
        let mut args = vec!["netns", "exec", &self.name, "ping", "-c1", "-W2"];
        args.extend_from_slice(extra);
        args.push(addr);
        let out = tokio::process::Command::new("ip")
            .args(&args)
            .output()
            .await;
        out.is_ok_and(|o| o.status.success())
    }

    async fn ping(&self, addr: &str) -> bool {
        self.ping_with(&[], addr).await
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = run("ip", &["netns", "del", &self.name]);
    }
}

fn run(cmd: &str, args: &[&str]) -> (bool, String) {
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

/// Root, `ip` and `ping` are needed; otherwise the test is skipped.
fn can_run() -> bool {
    let root = std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0);
    let tools = run("ip", &["-V"]).0 && run("ping", &["-V"]).0;
    if !root || !tools {
        eprintln!("skipped: VXLAN mesh tests need root, ip and ping (root={root}, tools={tools})");
    }
    root && tools
}

macro_rules! require_root {
    () => {
        if !can_run() {
            return;
        }
    };
}

const UNDERLAY: [&str; 2] = ["192.0.2.1", "192.0.2.2"];

/// Two nodes joined by a veth underlay `ul0` with MTU 1500.
fn underlay() -> [Ns; 2] {
    let nodes = [Ns::new(), Ns::new()];
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
    ]);
    for (n, addr) in nodes.iter().zip(UNDERLAY) {
        n.ip(&["addr", "add", &format!("{addr}/24"), "dev", "ul0"]);
        n.ip(&["link", "set", "ul0", "mtu", "1500", "up"]);
    }
    nodes
}

/// Counts what reaches an endpoint's application handlers.
#[derive(Clone, Default)]
struct Count {
    requests: Arc<AtomicUsize>,
    closes: Arc<AtomicUsize>,
}

#[async_trait]
impl Handler for Count {
    async fn request(
        &self,
        cx: &mut Cx,
        req: NetworkServiceRequest,
        next: Next,
    ) -> nsm_sdk::Result<Connection> {
        self.requests.fetch_add(1, Ordering::SeqCst);
        next.request(cx, req).await
    }
    async fn close(&self, cx: &mut Cx, conn: Connection, next: Next) -> nsm_sdk::Result<()> {
        self.closes.fetch_add(1, Ordering::SeqCst);
        next.close(cx, conn).await
    }
}

/// A registry and, per node, a manager and a VXLAN+KERNEL forwarder, served over unix
/// sockets; dropped, it stops them and removes its directory.
struct Mesh {
    dir: PathBuf,
    channels: Channels,
    root: CancellationToken,
    nsmgr_urls: Vec<Url>,
    tunnels: Vec<Tunnel>,
    servers: Vec<Server>,
}

impl Mesh {
    /// The mesh over `nodes`, node `i`'s forwarder with `allocators[i]` (a fresh one
    /// when `None`).
    async fn start(nodes: &[Ns; 2], allocators: [Option<Arc<VniAllocator>>; 2]) -> Mesh {
        let dir = std::env::temp_dir().join(unique("mesh"));
        std::fs::create_dir_all(&dir).unwrap();
        let mut mesh = Mesh {
            dir,
            channels: Channels::new(),
            root: CancellationToken::new(),
            nsmgr_urls: Vec::new(),
            tunnels: Vec::new(),
            servers: Vec::new(),
        };
        let registry_url = mesh.url("registry");
        let registry = registry_server(Duration::from_secs(60));
        mesh.servers
            .push(serve(&registry_url, registry.services()).await.unwrap());
        for (i, (node, allocator)) in nodes.iter().zip(allocators).enumerate() {
            let n = i + 1;
            let nsmgr_url = mesh.url(&format!("nsmgr-{n}"));
            let mgr = nsmgr(
                NsmgrOptions::new(
                    format!("nsmgr-{n}"),
                    nsmgr_url.clone(),
                    registry_url.clone(),
                )
                .channels(mesh.channels.clone())
                .root(mesh.root.child_token()),
            );
            mesh.servers
                .push(serve(&nsmgr_url, mgr.services()).await.unwrap());
            let mut tunnel = Tunnel::builder(UNDERLAY[i].parse().unwrap())
                .netns(NetNs::named(&node.name).unwrap());
            if let Some(a) = allocator {
                tunnel = tunnel.allocator(a);
            }
            let tunnel = tunnel.build().await.unwrap();
            assert_eq!(tunnel.mtu().get(), 1450, "the underlay's 1500 - 50");
            let (server_side, client_side) = vxlan_forwarder_mechanisms(tunnel.clone());
            let fwd = forwarder(
                ForwarderOptions::new(format!("fwd-{n}"), nsmgr_url.clone())
                    .channels(mesh.channels.clone())
                    .root(mesh.root.child_token())
                    .server_mechanisms(server_side)
                    .client_mechanisms(client_side),
            );
            let fwd_url = mesh.url(&format!("fwd-{n}"));
            mesh.servers
                .push(serve(&fwd_url, fwd.services()).await.unwrap());
            mesh.front(&nsmgr_url)
                .1
                .register(&mut Cx::client(), fwd.registration(&fwd_url))
                .await
                .unwrap();
            mesh.nsmgr_urls.push(nsmgr_url);
            mesh.tunnels.push(tunnel);
        }
        mesh
    }

    fn url(&self, name: &str) -> Url {
        Url::Unix(self.dir.join(format!("{name}.sock")))
    }

    fn front(
        &self,
        nsmgr_url: &Url,
    ) -> (
        RegistryChain<NetworkService>,
        RegistryChain<NetworkServiceEndpoint>,
    ) {
        (
            RegistryChain::<NetworkService>::builder()
                .push(grpc_registry(self.channels.clone(), nsmgr_url.clone()))
                .build(),
            RegistryChain::<NetworkServiceEndpoint>::builder()
                .push(grpc_registry(self.channels.clone(), nsmgr_url.clone()))
                .build(),
        )
    }

    /// An endpoint `name` of `service` in `pod` on node `node` (0 or 1), with
    /// addresses from `prefix`, registered through that node's manager.
    async fn add_nse(
        &mut self,
        node: usize,
        name: &str,
        service: &str,
        pod: &Ns,
        prefix: &str,
    ) -> Count {
        let count = Count::default();
        let ep = endpoint(
            name,
            EndpointOptions::new()
                .root(self.root.child_token())
                .handler(count.clone())
                .handler(point_to_point(vec![prefix.parse().unwrap()]))
                .handler(mechanisms().with(types::KERNEL, kernel_endpoint(pod.url()))),
        );
        let url = self.url(name);
        self.servers.push(serve(&url, ep.services()).await.unwrap());
        let (ns, nse) = self.front(&self.nsmgr_urls[node]);
        ns.register(
            &mut Cx::client(),
            NetworkService {
                name: service.into(),
                payload: "IP".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        nse.register(
            &mut Cx::client(),
            NetworkServiceEndpoint {
                name: name.into(),
                network_service_names: vec![service.into()],
                network_service_labels: [(service.to_string(), NetworkServiceLabels::default())]
                    .into(),
                url: url.to_string(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        count
    }

    /// A client on node `node` whose interface `ifname` goes into `pod`, no retry.
    fn client(&self, node: usize, pod: &Ns, ifname: &str) -> Chain {
        client(
            ClientOptions::new("nsc", self.nsmgr_urls[node].clone())
                .channels(self.channels.clone())
                .root(self.root.child_token())
                .retry(None)
                .mechanisms(vec![])
                .handler(kernel_client(pod.url()).ifname(ifname)),
        )
    }

    fn allocators_empty(&self) -> bool {
        self.tunnels.iter().all(|t| t.allocator().is_empty())
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        self.root.cancel();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn request(service: &str) -> NetworkServiceRequest {
    NetworkServiceRequest {
        connection: Some(Connection {
            network_service: service.into(),
            ..Default::default()
        }),
        mechanism_preferences: vec![],
    }
}

fn refresh(conn: &Connection) -> NetworkServiceRequest {
    NetworkServiceRequest {
        connection: Some(conn.clone()),
        mechanism_preferences: vec![],
    }
}

/// The client's and the endpoint's address (`a.b.c.d/32`) of a connection.
fn addrs(conn: &Connection) -> (String, String) {
    let ipc = conn
        .context
        .as_ref()
        .and_then(|c| c.ip_context.as_ref())
        .expect("the IPAM filled the IP context");
    let host = |s: &String| {
        if s.contains('/') {
            s.clone()
        } else {
            format!("{s}/32")
        }
    };
    (host(&ipc.src_ip_addrs[0]), host(&ipc.dst_ip_addrs[0]))
}

fn ip_of(cidr: &str) -> &str {
    cidr.split('/').next().unwrap_or(cidr)
}

fn path_names(conn: &Connection) -> Vec<String> {
    conn.path
        .as_ref()
        .map(|p| p.path_segments.iter().map(|s| s.name.clone()).collect())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kernel2vxlan2kernel_pings_across_the_underlay_at_the_tunnel_mtu_and_leaves_nothing() {
    require_root!();
    let nodes = underlay();
    let (nsc, nse) = (Ns::new(), Ns::new());
    let baseline: Vec<Vec<String>> = [&nsc, &nse]
        .iter()
        .map(|n| n.everything(true))
        .chain(nodes.iter().map(|n| n.everything(false)))
        .collect();
    let mut mesh = Mesh::start(&nodes, [None, None]).await;
    let count = mesh
        .add_nse(1, "nse", "vx-svc", &nse, "172.16.60.0/24")
        .await;
    let chain = mesh.client(0, &nsc, "nsm-1");

    let conn = chain
        .request(&mut Cx::client(), request("vx-svc"))
        .await
        .unwrap();
    assert_eq!(
        path_names(&conn),
        ["nsc", "nsmgr-1", "fwd-1", "nsmgr-2", "fwd-2", "nse"]
    );
    let m = conn.mechanism.as_ref().unwrap();
    assert_eq!(m.r#type, types::KERNEL);
    assert_eq!(m.parameters[params::NAME], "nsm-1");
    assert_eq!(conn.context.as_ref().unwrap().mtu, 1450);
    let (client_addr, endpoint_addr) = addrs(&conn);

    // A VXLAN device in each pod, one VNI, each node's socket towards the other.
    assert_eq!(nsc.links(), ["lo", "nsm-1"]);
    let nse_if = nse.mesh_link();
    let (vni, local, remote, port) = nsc.vxlan("nsm-1");
    assert_eq!(
        (local.as_str(), remote.as_str(), port),
        (UNDERLAY[0], UNDERLAY[1], 4789)
    );
    let (vni2, local2, remote2, port2) = nse.vxlan(&nse_if);
    assert_eq!(
        (vni2, local2.as_str(), remote2.as_str(), port2),
        (vni, UNDERLAY[1], UNDERLAY[0], 4789)
    );
    assert!(
        vni != 0 && vni % 2 == 0,
        "192.0.2.1 <= 192.0.2.2 gives an even VNI: {vni}"
    );
    assert!(mesh.tunnels[1]
        .allocator()
        .is_taken(Vni::new(vni as u32).unwrap()));
    for (pod, dev, addr) in [
        (&nsc, "nsm-1", &client_addr),
        (&nse, nse_if.as_str(), &endpoint_addr),
    ] {
        assert_eq!(pod.addresses(dev), std::slice::from_ref(addr));
        assert_eq!(pod.link(dev)["mtu"], 1450, "{dev}: underlay 1500 - 50");
    }
    for n in &nodes {
        assert_eq!(
            n.links(),
            ["lo", "ul0"],
            "nothing of the tunnel in the node"
        );
    }

    // Pings cross the underlay.
    let (tx0, rx0) = nodes[0].counters("ul0");
    assert!(nsc.ping(ip_of(&endpoint_addr)).await, "client -> endpoint");
    assert!(nse.ping(ip_of(&client_addr)).await, "endpoint -> client");
    let (tx1, rx1) = nodes[0].counters("ul0");
    assert!(
        tx1 >= tx0 + 2 && rx1 >= rx0 + 2,
        "underlay of node 1: tx {tx0} -> {tx1}, rx {rx0} -> {rx1}"
    );
    // The tunnel MTU exactly: 1450 - 28 = 1422 bytes of ICMP payload with DF.
    assert!(
        nsc.ping_with(&["-M", "do", "-s", "1422"], ip_of(&endpoint_addr))
            .await,
        "a DF ping of the full tunnel MTU"
    );
    assert!(
        !nsc.ping_with(&["-M", "do", "-s", "1423"], ip_of(&endpoint_addr))
            .await,
        "one byte more does not fit"
    );

    // A refresh changes nothing.
    let before = (nsc.state(), nse.state());
    let again = chain
        .request(&mut Cx::client(), refresh(&conn))
        .await
        .unwrap();
    assert_eq!(addrs(&again), addrs(&conn));
    assert_eq!(
        (nsc.state(), nse.state()),
        before,
        "a refresh changes nothing"
    );
    assert_eq!(nsc.vxlan("nsm-1").0, vni, "the same VNI");
    assert!(nsc.ping(ip_of(&endpoint_addr)).await, "after the refresh");

    chain.close(&mut Cx::client(), again).await.unwrap();
    assert_eq!(count.closes.load(Ordering::SeqCst), 1);
    let after: Vec<Vec<String>> = [&nsc, &nse]
        .iter()
        .map(|n| n.everything(true))
        .chain(nodes.iter().map(|n| n.everything(false)))
        .collect();
    for (i, (a, b)) in after.iter().zip(&baseline).enumerate() {
        assert_eq!(a, b, "namespace {i} (nsc, nse, node 1, node 2) after Close");
    }
    assert!(mesh.allocators_empty(), "VNIs freed on both nodes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_in_both_directions_ping_with_distinct_vnis_and_close_cleanly() {
    require_root!();
    let nodes = underlay();
    let (nsc1, nsc2, nsc3) = (Ns::new(), Ns::new(), Ns::new());
    let (nse_a, nse_b, nse_c) = (Ns::new(), Ns::new(), Ns::new());
    let pods = [&nsc1, &nsc2, &nsc3, &nse_a, &nse_b, &nse_c];
    let baseline: Vec<Vec<String>> = pods.iter().map(|p| p.everything(true)).collect();
    let mut mesh = Mesh::start(&nodes, [None, None]).await;
    let counts = [
        mesh.add_nse(1, "nse-a", "svc-a", &nse_a, "172.16.61.0/24")
            .await,
        mesh.add_nse(1, "nse-b", "svc-b", &nse_b, "172.16.62.0/24")
            .await,
        mesh.add_nse(0, "nse-c", "svc-c", &nse_c, "172.16.63.0/24")
            .await,
    ];
    // Two clients on node 1 to the endpoints of node 2, one the other way.
    let clients = [
        (mesh.client(0, &nsc1, "nsm-1"), "svc-a", &nsc1, &nse_a),
        (mesh.client(0, &nsc2, "nsm-1"), "svc-b", &nsc2, &nse_b),
        (mesh.client(1, &nsc3, "nsm-1"), "svc-c", &nsc3, &nse_c),
    ];
    let conns: Vec<Connection> = futures::future::join_all(
        clients
            .iter()
            .map(|(c, svc, _, _)| async move { c.request(&mut Cx::client(), request(svc)).await }),
    )
    .await
    .into_iter()
    .collect::<Result<_, _>>()
    .unwrap();

    let mut vnis = Vec::new();
    for ((_, svc, nsc, nse), conn) in clients.iter().zip(&conns) {
        assert_eq!(path_names(conn).len(), 6, "{svc}: {:?}", path_names(conn));
        let (client_addr, endpoint_addr) = addrs(conn);
        let (vni, ..) = nsc.vxlan("nsm-1");
        assert_eq!(nse.vxlan(&nse.mesh_link()).0, vni, "{svc}");
        assert_eq!(nsc.addresses("nsm-1"), [client_addr]);
        assert!(
            nsc.ping(ip_of(&endpoint_addr)).await,
            "{svc}: client -> endpoint"
        );
        vnis.push(vni);
    }
    // Node 2 picks even VNIs for 192.0.2.1 -> 192.0.2.2, node 1 an odd one for the
    // reverse direction.
    assert!(
        vnis[0] % 2 == 0 && vnis[1] % 2 == 0 && vnis[2] % 2 == 1,
        "{vnis:?}"
    );
    let distinct: std::collections::BTreeSet<_> = vnis.iter().collect();
    assert_eq!(distinct.len(), 3, "{vnis:?}");
    // Each node holds the VNIs it chose and records those its client side uses.
    for t in &mesh.tunnels {
        assert_eq!(t.allocator().len(), 3, "{t:?}");
    }

    futures::future::join_all(
        clients
            .iter()
            .zip(conns)
            .map(|((c, ..), conn)| async move { c.close(&mut Cx::client(), conn).await }),
    )
    .await
    .into_iter()
    .collect::<Result<Vec<()>, _>>()
    .unwrap();
    for c in &counts {
        assert_eq!(c.closes.load(Ordering::SeqCst), 1);
    }
    for (p, base) in pods.iter().zip(&baseline) {
        assert_eq!(&p.everything(true), base, "{} after Close", p.name);
    }
    assert!(mesh.allocators_empty());
}

/// Requests and closes connections until `clashed` is reserved in `allocator` (the
/// clash happened), checking that each one works and that its VNI is in `allowed`.
async fn until_clash(
    mesh: &Mesh,
    nsc: &Ns,
    nse: &Ns,
    allocator: &VniAllocator,
    clashed: u32,
    allowed: &[u64],
) -> usize {
    let chain = mesh.client(0, nsc, "nsm-1");
    for attempt in 1..=30 {
        let conn = chain
            .request(&mut Cx::client(), request("vx-svc"))
            .await
            .expect("a clash is not the user's error");
        let (vni, ..) = nsc.vxlan("nsm-1");
        assert!(allowed.contains(&vni), "VNI {vni} not in {allowed:?}");
        assert_eq!(nse.vxlan(&nse.mesh_link()).0, vni);
        assert!(nsc.ping(ip_of(&addrs(&conn).1)).await, "VNI {vni}");
        chain.close(&mut Cx::client(), conn).await.unwrap();
        assert_eq!(nsc.links(), ["lo"]);
        if allocator.is_taken(Vni::new(clashed).unwrap()) {
            return attempt;
        }
    }
    panic!("the allocator never picked VNI {clashed} in 30 connections");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vni_clashes_on_either_node_are_resolved_without_an_error() {
    require_root!();
    let nodes = underlay();
    let (nsc, nse) = (Ns::new(), Ns::new());
    // Node 2 picks among the even VNIs 2, 4 and 6 only.
    let server_vnis = Arc::new(VniAllocator::with_max(7).unwrap());
    let mut mesh = Mesh::start(&nodes, [None, Some(server_vnis.clone())]).await;
    mesh.add_nse(1, "nse", "vx-svc", &nse, "172.16.64.0/24")
        .await;
    let squat = |node: &Ns, name: &str, vni: &str, local: &str| {
        node.ip(&[
            "link",
            "add",
            name,
            "type",
            "vxlan",
            "id",
            vni,
            "dstport",
            "4789",
            "local",
            local,
            "remote",
            "192.0.2.99",
        ]);
    };

    // VNI 2 is held on the endpoint's node by a device the mesh does not know: when
    // node 2 picks it, its forwarder moves on by itself.
    squat(&nodes[1], "squat2", "2", UNDERLAY[1]);
    let n = until_clash(&mesh, &nsc, &nse, &server_vnis, 2, &[4, 6]).await;
    eprintln!("clash on the endpoint's node after {n} connection(s)");
    assert_eq!(server_vnis.len(), 1, "only the reserved VNI 2 is left");

    // VNI 4 is held on the client's node: node 1 cannot make its device and asks
    // node 2 for another VNI, which can only be 6 now.
    squat(&nodes[0], "squat4", "4", UNDERLAY[0]);
    let n = until_clash(&mesh, &nsc, &nse, &server_vnis, 4, &[6]).await;
    eprintln!("clash on the client's node after {n} connection(s)");
    assert_eq!(server_vnis.len(), 2, "VNIs 2 and 4 reserved, 6 free again");
    assert!(mesh.tunnels[0].allocator().is_taken(Vni::new(4).unwrap()));
    assert_eq!(
        mesh.tunnels[0].allocator().len(),
        1,
        "only the reserved VNI 4"
    );
    assert_eq!(nse.links(), ["lo"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_left_for_the_same_connection_is_replaced_and_a_foreign_one_kept() {
    require_root!();
    let nodes = underlay();
    let (nsc, nse) = (Ns::new(), Ns::new());
    let mut mesh = Mesh::start(&nodes, [None, None]).await;
    mesh.add_nse(1, "nse", "vx-svc", &nse, "172.16.65.0/24")
        .await;
    let chain = mesh.client(0, &nsc, "nsm-1");
    let with_id = |id: &str| {
        let mut r = request("vx-svc");
        r.connection.as_mut().unwrap().id = id.into();
        r
    };
    // What a dead forwarder left for connection "left-over": its client end.
    nsc.ip(&[
        "link", "add", "nsm-1", "type", "veth", "peer", "name", "old-peer",
    ]);
    nsc.ip(&["link", "set", "nsm-1", "alias", "nsm-client-left-over"]);
    let conn = chain
        .request(&mut Cx::client(), with_id("left-over"))
        .await
        .unwrap();
    assert_eq!(
        nsc.links(),
        ["lo", "nsm-1"],
        "the old end and its peer are gone"
    );
    assert!(nsc.vxlan("nsm-1").0 > 0);
    assert!(nsc.ping(ip_of(&addrs(&conn).1)).await);
    chain.close(&mut Cx::client(), conn).await.unwrap();

    // A link of anything else is left alone, and the request fails without leftovers.
    nsc.ip(&[
        "link", "add", "nsm-1", "type", "veth", "peer", "name", "theirs",
    ]);
    nsc.ip(&["link", "set", "nsm-1", "alias", "not-nsm"]);
    let err = chain
        .request(&mut Cx::client(), with_id("another"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
    assert!(err.to_string().contains("not-nsm"), "{err}");
    assert_eq!(nsc.links(), ["lo", "nsm-1", "theirs"]);
    assert_eq!(nse.links(), ["lo"], "the endpoint's side was closed again");
    assert!(mesh.allocators_empty());
}
