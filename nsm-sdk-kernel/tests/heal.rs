//! Heal with a real data plane, as root: Kernel2Kernel connections through the whole
//! mesh in this process (as in `mesh.rs`), where a component dies or the data plane
//! breaks, and the NSC's `heal` brings the ping back without the NSC doing anything.
//!
//! - a forwarder restart: the old forwarder's veth pair is still in the kernel, the
//!   new forwarder recognises it by its alias and replaces it;
//! - an endpoint death: heal reselects a second endpoint with another IPAM prefix;
//! - a deleted interface: the ping liveness check fails, heal reselects.
//!
//! The pods are namespaces made by the test and deleted by a guard even when it fails;
//! only 172.16.x.x addresses are used inside them. Each test prints its heal time, from
//! the fault to the first successful `ping` (run by the `ping` binary inside the
//! client's pod, polled every 50 ms): `cargo test -p nsm-sdk-kernel --test heal --
//! --nocapture`. Without root (or without `ip`/`ping`) each test prints a skip line
//! and passes.

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use nsm_sdk::chains::{
    client, endpoint, forwarder, nsmgr, registry_server, ClientOptions, EndpointOptions,
    ForwarderOptions, NsmgrOptions,
};
use nsm_sdk::handlers::{heal, mechanisms, point_to_point, HealOptions, LivenessFn};
use nsm_sdk::proto::connection::Connection;
use nsm_sdk::proto::networkservice::NetworkServiceRequest;
use nsm_sdk::proto::registry::{NetworkService, NetworkServiceEndpoint, NetworkServiceLabels};
use nsm_sdk::registry::RegistryChain;
use nsm_sdk::transport::{grpc_registry, serve, Channels, Server, Url};
use nsm_sdk::wire::types;
use nsm_sdk::{Chain, Cx};
use nsm_sdk_kernel::{
    kernel_client, kernel_endpoint, kernel_forwarder_mechanisms, ping_liveness, NetNs, PingOptions,
};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

const SERVICE: &str = "kernel-heal";
/// How long a heal may take before the test fails.
const HEAL_WITHIN: Duration = Duration::from_secs(10);
/// How often the data plane is probed while waiting.
const POLL: Duration = Duration::from_millis(50);

static NEXT: AtomicU32 = AtomicU32::new(0);

fn unique(what: &str) -> String {
    format!(
        "nsmh-{}-{what}{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
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
        eprintln!("skipped: kernel heal tests need root, ip and ping (root={root}, tools={tools})");
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

/// A named namespace (a "pod") that is deleted when the guard drops (also on panic).
struct Ns {
    name: String,
}

impl Ns {
    fn new() -> Ns {
        let name = unique("");
        let _ = run("ip", &["netns", "del", &name]);
        let out = run("ip", &["netns", "add", &name]);
        assert!(out.0, "ip netns add {name}: {}", out.1);
        let out = run("ip", &["-n", &name, "link", "set", "lo", "up"]);
        assert!(out.0, "{}", out.1);
        Ns { name }
    }

    fn url(&self) -> String {
        format!("file:///run/netns/{}", self.name)
    }

    fn json(&self, args: &[&str]) -> Vec<Value> {
        let mut full = vec!["-n", &self.name, "-j"];
        full.extend_from_slice(args);
        let (ok, out) = run("ip", &full);
        assert!(ok, "ip {full:?}: {out}");
        // `ip` may print a warning (stderr is merged into `out`), e.g. "Peer netns reference
        // is invalid." when another test's namespace is gone: parse the JSON array only.
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

    /// The links other than `lo`: (name, ifindex, alias).
    fn mesh_links(&self) -> Vec<(String, u64, String)> {
        let mut v: Vec<_> = self
            .json(&["link", "show"])
            .iter()
            .filter(|l| l["ifname"] != "lo")
            .map(|l| {
                (
                    l["ifname"].as_str().unwrap_or("?").to_string(),
                    l["ifindex"].as_u64().unwrap_or(0),
                    l["ifalias"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect();
        v.sort();
        v
    }

    /// Global IPv4 addresses of `dev`, e.g. `["172.16.50.1/32"]`.
    fn addresses(&self, dev: &str) -> Vec<String> {
        let mut v = Vec::new();
        for l in self.json(&["-4", "addr", "show", "dev", dev]) {
            for a in l["addr_info"].as_array().into_iter().flatten() {
                v.push(format!(
                    "{}/{}",
                    a["local"].as_str().unwrap_or("?"),
                    a["prefixlen"]
                ));
            }
        }
        v.sort();
        v
    }

    /// One echo request with a 200 ms wait, by the `ping` binary inside the pod.
    async fn ping(&self, addr: &str) -> bool {
        let out = tokio::process::Command::new("ip")
            .args([
                "netns", "exec", &self.name, "ping", "-c1", "-W0.2", "-q", addr,
            ])
            .output()
            .await;
        out.is_ok_and(|o| o.status.success())
    }

    /// Polls every [`POLL`] until `ready` holds and a ping to `addr` succeeds; fails the
    /// test after [`HEAL_WITHIN`]. Returns the time since `since`.
    async fn until_ping(
        &self,
        addr: &str,
        since: Instant,
        what: &str,
        mut ready: impl FnMut() -> bool,
    ) -> Duration {
        let deadline = since + HEAL_WITHIN;
        loop {
            if ready() && self.ping(addr).await {
                let took = since.elapsed();
                eprintln!("heal time ({what}): {took:?}");
                return took;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: no working ping to {addr} within {HEAL_WITHIN:?}; links {:?}",
                self.mesh_links()
            );
            tokio::time::sleep(POLL).await;
        }
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = run("ip", &["netns", "del", &self.name]);
    }
}

/// A served component that can be killed like a dying process.
struct Running {
    server: Server,
    root: CancellationToken,
}

impl Running {
    /// The server stops at once (open connections and monitor streams break) and
    /// every task of the component ends.
    fn kill(&self) {
        self.server.kill();
        self.root.cancel();
    }
}

/// An endpoint with point-to-point IPAM and `kernel_endpoint` in its pod.
struct Nse {
    running: Running,
    registration: NetworkServiceEndpoint,
}

/// A registry and a manager served over unix sockets, a KERNEL forwarder that can be
/// killed and started again on the same URL, and endpoints; dropped, it stops all of
/// them and removes its directory.
struct Mesh {
    dir: PathBuf,
    nsmgr_url: Url,
    forwarder_url: Url,
    channels: Channels,
    root: CancellationToken,
    front_nse: RegistryChain<NetworkServiceEndpoint>,
    forwarder: Option<Running>,
    _servers: Vec<Server>,
}

impl Mesh {
    async fn start() -> Mesh {
        let dir = std::env::temp_dir().join(unique("mesh"));
        std::fs::create_dir_all(&dir).unwrap();
        let url = |name: &str| Url::Unix(dir.join(format!("{name}.sock")));
        let (registry_url, nsmgr_url) = (url("registry"), url("nsmgr"));
        let channels = Channels::new();
        let root = CancellationToken::new();
        let registry = registry_server(Duration::from_secs(60));
        let mut servers = vec![serve(&registry_url, registry.services()).await.unwrap()];
        let mgr = nsmgr(
            NsmgrOptions::new("nsmgr", nsmgr_url.clone(), registry_url)
                .channels(channels.clone())
                .root(root.child_token()),
        );
        servers.push(serve(&nsmgr_url, mgr.services()).await.unwrap());
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
            .await
            .unwrap();
        let mut mesh = Mesh {
            forwarder_url: url("forwarder"),
            dir,
            nsmgr_url,
            channels,
            root,
            front_nse,
            forwarder: None,
            _servers: servers,
        };
        mesh.start_forwarder().await;
        mesh
    }

    /// Starts a fresh forwarder (no state from any earlier one) on the forwarder URL
    /// and registers it.
    async fn start_forwarder(&mut self) {
        let root = self.root.child_token();
        let (server_side, client_side) = kernel_forwarder_mechanisms();
        let fwd = forwarder(
            ForwarderOptions::new("forwarder", self.nsmgr_url.clone())
                .channels(self.channels.clone())
                .root(root.clone())
                .server_mechanisms(server_side)
                .client_mechanisms(client_side),
        );
        let server = serve(&self.forwarder_url, fwd.services()).await.unwrap();
        self.front_nse
            .register(&mut Cx::client(), fwd.registration(&self.forwarder_url))
            .await
            .unwrap();
        self.forwarder = Some(Running { server, root });
    }

    fn kill_forwarder(&mut self) {
        if let Some(f) = self.forwarder.take() {
            f.kill();
        }
    }

    /// Starts and registers endpoint `name` in pod `ns`, handing out `prefix`.
    async fn start_nse(&self, name: &str, ns: &Ns, prefix: &str) -> Nse {
        let url = Url::Unix(self.dir.join(format!("{name}.sock")));
        let root = self.root.child_token();
        let ep = endpoint(
            name,
            EndpointOptions::new()
                .root(root.clone())
                .handler(point_to_point(vec![prefix.parse().unwrap()]))
                .handler(mechanisms().with(types::KERNEL, kernel_endpoint(ns.url()))),
        );
        let server = serve(&url, ep.services()).await.unwrap();
        let registration = NetworkServiceEndpoint {
            name: name.into(),
            network_service_names: vec![SERVICE.into()],
            network_service_labels: [(SERVICE.to_string(), NetworkServiceLabels::default())].into(),
            url: url.to_string(),
            ..Default::default()
        };
        self.front_nse
            .register(&mut Cx::client(), registration.clone())
            .await
            .unwrap();
        Nse {
            running: Running { server, root },
            registration,
        }
    }

    /// The endpoint dies and the registry learns of it.
    async fn kill_nse(&self, nse: Nse) {
        nse.running.kill();
        self.front_nse
            .unregister(&mut Cx::client(), nse.registration)
            .await
            .unwrap();
    }

    /// An NSC in pod `ns` asking for interface `nsm-1`, with `heal` (and a liveness
    /// check if given) among its handlers.
    fn nsc(&self, ns: &Ns, liveness: Option<LivenessFn>) -> Chain {
        let mut opts = HealOptions::new(self.channels.clone());
        if let Some(check) = liveness {
            opts = opts
                .liveness(check)
                .liveness_interval(Duration::from_millis(100));
        }
        client(
            ClientOptions::new("nsc", self.nsmgr_url.clone())
                .channels(self.channels.clone())
                .root(self.root.child_token())
                .mechanisms(vec![])
                .handler(heal(opts))
                .handler(kernel_client(ns.url()).ifname("nsm-1")),
        )
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        self.kill_forwarder();
        self.root.cancel();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn request() -> NetworkServiceRequest {
    NetworkServiceRequest {
        connection: Some(Connection {
            network_service: SERVICE.into(),
            ..Default::default()
        }),
        mechanism_preferences: vec![],
    }
}

/// The endpoint's address of a connection, without prefix length.
fn endpoint_ip(conn: &Connection) -> String {
    let ipc = conn
        .context
        .as_ref()
        .and_then(|c| c.ip_context.as_ref())
        .expect("the IPAM filled the IP context");
    let first = &ipc.dst_ip_addrs[0];
    first.split('/').next().unwrap_or(first).to_string()
}

/// The forwarder dies (server stopped, every task cancelled) and a new one starts on
/// the same URL. The manager's relay reports the connection DOWN, the NSC's heal
/// re-requests it, and the new forwarder finds the pair its predecessor left (the
/// interface names are taken) with this connection's alias: it replaces the pair, and
/// the ping works over the new one. Close through the new forwarder removes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_forwarder_replaces_the_pair_it_finds_and_the_ping_comes_back() {
    require_root!();
    let (nsc_pod, nse_pod) = (Ns::new(), Ns::new());
    let mut mesh = Mesh::start().await;
    let _nse = mesh.start_nse("nse", &nse_pod, "172.16.70.0/24").await;
    let nsc = mesh.nsc(&nsc_pod, None);
    let conn = nsc.request(&mut Cx::client(), request()).await.unwrap();
    let addr = endpoint_ip(&conn);
    assert!(nsc_pod.ping(&addr).await);
    let [(name, old_index, alias)] = &nsc_pod.mesh_links()[..] else {
        panic!("{:?}", nsc_pod.mesh_links())
    };
    assert_eq!(name, "nsm-1");
    let first_segment = &conn.path.as_ref().unwrap().path_segments[0].id;
    assert_eq!(alias, &format!("nsm-client-{first_segment}"));
    let old_nse_link = nse_pod.mesh_links();

    let killed = Instant::now();
    mesh.kill_forwarder();
    mesh.start_forwarder().await;
    let replaced = || {
        nsc_pod
            .mesh_links()
            .first()
            .is_some_and(|(name, index, _)| name == "nsm-1" && index != old_index)
    };
    nsc_pod
        .until_ping(&addr, killed, "forwarder restart", replaced)
        .await;

    let nsc_links = nsc_pod.mesh_links();
    assert_eq!(nsc_links.len(), 1, "{nsc_links:?}");
    assert_eq!(&nsc_links[0].2, alias, "the same connection");
    let nse_links = nse_pod.mesh_links();
    assert_eq!(nse_links.len(), 1, "the old pair is gone: {nse_links:?}");
    assert_ne!(nse_links, old_nse_link, "the endpoint's end is new too");
    // The same name: heal's re-request reached the new forwarder and the endpoint kept
    // the connection; another name: a reselect made a new endpoint connection.
    eprintln!(
        "forwarder restart: the endpoint's end kept its name: {}",
        nse_links[0].0 == old_nse_link[0].0
    );

    nsc.close(&mut Cx::client(), conn).await.unwrap();
    assert!(
        nsc_pod.mesh_links().is_empty(),
        "{:?}",
        nsc_pod.mesh_links()
    );
    assert!(
        nse_pod.mesh_links().is_empty(),
        "{:?}",
        nse_pod.mesh_links()
    );
}

/// The endpoint dies (server stopped, tasks cancelled, unregistered) and a second one
/// with another IPAM prefix starts in another pod. The NSC's heal reselects it; the
/// ping to the new endpoint's address works and the old pair is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_endpoint_is_replaced_by_a_second_one_and_the_new_address_pings() {
    require_root!();
    let (nsc_pod, nse1_pod, nse2_pod) = (Ns::new(), Ns::new(), Ns::new());
    let mesh = Mesh::start().await;
    let nse1 = mesh.start_nse("nse-1", &nse1_pod, "172.16.80.0/24").await;
    let nsc = mesh.nsc(&nsc_pod, None);
    let conn = nsc.request(&mut Cx::client(), request()).await.unwrap();
    let old_addr = endpoint_ip(&conn);
    assert!(old_addr.starts_with("172.16.80."), "{old_addr}");
    assert!(nsc_pod.ping(&old_addr).await);

    let killed = Instant::now();
    mesh.kill_nse(nse1).await;
    let _nse2 = mesh.start_nse("nse-2", &nse2_pod, "172.16.90.0/24").await;
    // The address the new endpoint's IPAM gave its own end. (The request still
    // carries the old endpoint's addresses, which this IPAM keeps: see below.)
    let new_addr = || {
        let (name, _, _) = nse2_pod.mesh_links().into_iter().next()?;
        nse2_pod
            .addresses(&name)
            .into_iter()
            .find(|a| a.starts_with("172.16.90."))
            .map(|a| a.split('/').next().unwrap_or_default().to_string())
    };
    let mut target = None;
    let deadline = killed + HEAL_WITHIN;
    while target.is_none() {
        target = new_addr();
        assert!(
            Instant::now() < deadline,
            "no interface in the new endpoint's pod"
        );
        tokio::time::sleep(POLL).await;
    }
    let target = target.unwrap_or_default();
    assert!(target.starts_with("172.16.90."), "{target}");
    nsc_pod
        .until_ping(&target, killed, "endpoint death, reselect", || true)
        .await;

    assert!(
        nse1_pod.mesh_links().is_empty(),
        "{:?}",
        nse1_pod.mesh_links()
    );
    let nsc_links = nsc_pod.mesh_links();
    assert_eq!(nsc_links.len(), 1, "{nsc_links:?}");
    let client_addrs = nsc_pod.addresses("nsm-1");
    assert!(
        client_addrs.iter().any(|a| a.starts_with("172.16.90.")),
        "{client_addrs:?}"
    );
    // point_to_point (like Go's point2pointipam) removes only addresses inside its
    // own prefixes, so both pods also keep the old endpoint's pair of addresses.
    eprintln!(
        "after the reselect: client addresses {client_addrs:?}, endpoint addresses {:?}",
        nse2_pod.addresses(&nse2_pod.mesh_links()[0].0)
    );

    nsc.close(&mut Cx::client(), conn).await.unwrap();
    assert!(nsc_pod.mesh_links().is_empty());
    assert!(nse2_pod.mesh_links().is_empty());
}

/// The NSC's interface is deleted behind the mesh's back. Nothing in the control plane
/// notices; the ping liveness check does, heal reselects, the forwarder makes a new
/// pair and the ping works again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_interface_is_noticed_by_the_ping_liveness_check_and_healed() {
    require_root!();
    let (nsc_pod, nse_pod) = (Ns::new(), Ns::new());
    let mesh = Mesh::start().await;
    let _nse = mesh.start_nse("nse", &nse_pod, "172.16.100.0/24").await;
    let check = ping_liveness(
        PingOptions::new()
            .netns(NetNs::named(&nsc_pod.name).unwrap())
            .timeout(Duration::from_millis(300)),
    );
    let nsc = mesh.nsc(&nsc_pod, Some(check));
    let conn = nsc.request(&mut Cx::client(), request()).await.unwrap();
    let addr = endpoint_ip(&conn);
    assert!(nsc_pod.ping(&addr).await);
    // The liveness check keeps passing on a working connection.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let [(_, index, _)] = nsc_pod.mesh_links()[..] else {
        panic!("{:?}", nsc_pod.mesh_links())
    };

    let broke = Instant::now();
    let out = run("ip", &["-n", &nsc_pod.name, "link", "del", "nsm-1"]);
    assert!(out.0, "{}", out.1);
    assert!(!nsc_pod.ping(&addr).await, "the data plane is broken");
    let replaced = || {
        nsc_pod
            .mesh_links()
            .first()
            .is_some_and(|(name, i, _)| name == "nsm-1" && *i != index)
    };
    nsc_pod
        .until_ping(&addr, broke, "deleted interface, liveness", replaced)
        .await;
    assert_eq!(nse_pod.mesh_links().len(), 1, "{:?}", nse_pod.mesh_links());

    nsc.close(&mut Cx::client(), conn).await.unwrap();
    assert!(nsc_pod.mesh_links().is_empty());
    assert!(nse_pod.mesh_links().is_empty());
}
