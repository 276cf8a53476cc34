//! The service-function-chaining showcase, as root: a client reaches a corporate
//! network through a firewall NSE and a VPN gateway NSE, selected by the network
//! service `vpn-gateway` of `examples/config/vpn-gateway.json`.
//!
//! `the_chain_*` runs the whole mesh in this test process (a registry, a manager, a
//! KERNEL forwarder, the firewall and the gateway as the example library builds them,
//! and a client), served over unix sockets in a temporary directory. The "pods" are
//! namespaces made by the test (`ip netns add nsmt-<pid>-<n>`, deleted by a guard even
//! when the test fails), plus a "corporate" namespace with the host 10.60.0.10, joined
//! to the gateway's pod by a veth the test makes. `the_binaries_*` runs the same chain
//! as separate processes (the example programs, endpoints and client in their pods).
//!
//! What the kernel holds is read with `ip -j` (an independent observer); traffic is
//! checked with `ping` and TCP connects from inside the client's pod, to listeners in
//! the corporate namespace. Only 172.16.x.x and 10.60.x.x addresses, only inside the
//! test's namespaces. Without root, `ip`, `ping` or `nft` each test prints a skip line
//! and passes.

use std::collections::HashMap;
use std::fs::File;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nsm_examples::{apply_acl, firewall, route_to_corporate, vpn_gateway, Acl};
use nsm_sdk::chains::{
    client, forwarder, nsmgr, registry_server, ClientOptions, EndpointOptions, ForwarderOptions,
    NsmgrOptions,
};
use nsm_sdk::config::ns_file;
use nsm_sdk::proto::connection::Connection;
use nsm_sdk::proto::networkservice::NetworkServiceRequest;
use nsm_sdk::proto::registry::{NetworkService, NetworkServiceEndpoint, NetworkServiceLabels};
use nsm_sdk::registry::RegistryChain;
use nsm_sdk::transport::{grpc_registry, serve, Channels, Server, Url};
use nsm_sdk::{Chain, Cx};
use nsm_sdk_kernel::{kernel_client, kernel_forwarder_mechanisms, NetNs};
use nsm_testkit::lab::run;
use nsm_testkit::{unique, Ns};
use nsm_tests::{bin, read_lines, TempDir};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

const SERVICE: &str = "vpn-gateway";
/// The gateway's IPAM prefix.
const PREFIX: &str = "172.16.61.0/24";
/// The corporate network behind the gateway, and its host.
const CORPORATE: &str = "10.60.0.0/24";
const CORPORATE_HOST: &str = "10.60.0.10";
/// Ports of the corporate host: one the access list allows, one it denies.
const ALLOWED: u16 = 5201;
const DENIED: u16 = 8080;
const ACL: &str = "allow icmp; allow tcp 5201; deny tcp 8080; default deny";

/// Root, `ip`, `ping` and `nft` are needed; otherwise the test is skipped.
fn can_run() -> bool {
    if !nsm_testkit::can_run("firewall tests") {
        return false;
    }
    let nft = run("nft", &["-v"]).0;
    if !nft {
        eprintln!("skipped: firewall tests need nft");
    }
    nft
}

macro_rules! require_root {
    () => {
        if !can_run() {
            return;
        }
    };
}

/// What the showcase reads of a pod beyond what the kit's [`Ns`] reads.
trait PodExt {
    fn netns(&self) -> NetNs;
    fn bridges(&self) -> Vec<(String, Vec<String>)>;
    fn leftovers(&self) -> Vec<String>;
    fn until_ping(&self, addr: &str) -> bool;
    async fn connect(&self, addr: SocketAddr) -> std::io::Result<()>;
    async fn listen(&self, port: u16) -> TcpListener;
}

impl PodExt for Ns {
    fn netns(&self) -> NetNs {
        self.open()
    }

    /// The bridges and, for each, its ports (sorted).
    fn bridges(&self) -> Vec<(String, Vec<String>)> {
        let links = self.json(&["-d", "link", "show"]);
        let mut out: Vec<(String, Vec<String>)> = links
            .iter()
            .filter(|l| l["linkinfo"]["info_kind"] == "bridge")
            .map(|b| {
                let name = b["ifname"].as_str().unwrap_or("?").to_string();
                let mut ports: Vec<String> = links
                    .iter()
                    .filter(|l| l["master"].as_str() == Some(name.as_str()))
                    .map(|l| l["ifname"].as_str().unwrap_or("?").to_string())
                    .collect();
                ports.sort();
                (name, ports)
            })
            .collect();
        out.sort();
        out
    }

    /// Everything a connection could leave behind: links (and their bridge), addresses,
    /// the routes of every table, the policy rules and the permanent neighbour entries;
    /// without the kernel's IPv6 link-local ones.
    fn leftovers(&self) -> Vec<String> {
        let mut v = Vec::new();
        for l in self.json(&["link", "show"]) {
            v.push(format!(
                "link {} mtu {} master {}",
                l["ifname"], l["mtu"], l["master"]
            ));
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
        for n in self.json(&["neigh", "show"]) {
            if n["state"]
                .as_array()
                .is_some_and(|s| s.iter().any(|x| x == "PERMANENT"))
            {
                v.push(format!("neigh {n}"));
            }
        }
        // The kernel's own IPv6 link-local entries come on its own schedule (after DAD).
        v.retain(|e| !e.contains("\"fe80:"));
        v.sort();
        v
    }

    /// Pings `addr` until it answers, for at most 10 s (the firewall's upstream
    /// interface joins its bridge a moment after the client has its connection).
    fn until_ping(&self, addr: &str) -> bool {
        let until = Instant::now() + Duration::from_secs(10);
        while Instant::now() < until {
            if self.ping_with(&[addr]) {
                return true;
            }
        }
        false
    }

    /// A TCP connect to `addr` from inside the pod, waiting at most 1 s.
    async fn connect(&self, addr: SocketAddr) -> std::io::Result<()> {
        self.netns()
            .run(move || TcpStream::connect_timeout(&addr, Duration::from_secs(1)).map(drop))
            .await
            .unwrap()
    }

    /// A listener on `port` inside the pod; the kernel completes handshakes into its
    /// backlog, so nothing needs to accept.
    async fn listen(&self, port: u16) -> TcpListener {
        self.netns()
            .run(move || TcpListener::bind(("0.0.0.0", port)))
            .await
            .unwrap()
            .unwrap()
    }
}

/// The pods of the showcase: client, firewall, gateway, and the corporate network
/// (the gateway's `corp0`, 10.60.0.1/24, cabled to the host's `corp1`, 10.60.0.10/24).
struct Pods {
    nsc: Ns,
    fw: Ns,
    gw: Ns,
    corp: Ns,
}

impl Pods {
    fn new() -> Pods {
        let pods = Pods {
            nsc: Ns::new(),
            fw: Ns::new(),
            gw: Ns::new(),
            corp: Ns::new(),
        };
        let out = run(
            "ip",
            &[
                "link",
                "add",
                "corp0",
                "netns",
                &pods.gw.name,
                "type",
                "veth",
                "peer",
                "name",
                "corp1",
                "netns",
                &pods.corp.name,
            ],
        );
        assert!(out.0, "{}", out.1);
        pods.gw.ip(&["addr", "add", "10.60.0.1/24", "dev", "corp0"]);
        pods.gw.ip(&["link", "set", "corp0", "up"]);
        pods.corp
            .ip(&["addr", "add", "10.60.0.10/24", "dev", "corp1"]);
        pods.corp.ip(&["link", "set", "corp1", "up"]);
        pods
    }

    fn everything(&self) -> [Vec<String>; 4] {
        [&self.nsc, &self.fw, &self.gw, &self.corp].map(PodExt::leftovers)
    }
}

fn service_file() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/config/vpn-gateway.json")
}

fn labels(app: &str) -> HashMap<String, String> {
    HashMap::from([("app".to_string(), app.to_string())])
}

fn registration(name: &str, url: &Url, app: &str) -> NetworkServiceEndpoint {
    NetworkServiceEndpoint {
        name: name.into(),
        network_service_names: vec![SERVICE.into()],
        network_service_labels: HashMap::from([(
            SERVICE.to_string(),
            NetworkServiceLabels {
                labels: labels(app),
            },
        )]),
        url: url.to_string(),
        ..Default::default()
    }
}

/// The mesh of one node in this process, with the firewall in `fw` and the gateway in
/// `gw`; dropped, it stops them and removes its directory.
struct Mesh {
    dir: PathBuf,
    nsmgr_url: Url,
    channels: Channels,
    root: CancellationToken,
    _servers: Vec<Server>,
}

impl Mesh {
    async fn start(pods: &Pods) -> Mesh {
        let dir = std::env::temp_dir().join(unique("sfc"));
        std::fs::create_dir_all(&dir).unwrap();
        let url = |name: &str| Url::Unix(dir.join(format!("{name}.sock")));
        let (registry_url, nsmgr_url, fwd_url) = (url("registry"), url("nsmgr"), url("forwarder"));
        let (fw_url, gw_url) = (url("firewall"), url("gateway"));
        let channels = Channels::new();
        let root = CancellationToken::new();
        let mut servers = Vec::new();

        let registry = registry_server(Duration::from_secs(60));
        servers.push(serve(&registry_url, registry.services()).await.unwrap());
        let mgr = nsmgr(
            NsmgrOptions::new("nsmgr", nsmgr_url.clone(), registry_url)
                .channels(channels.clone())
                .root(root.child_token()),
        );
        servers.push(serve(&nsmgr_url, mgr.services()).await.unwrap());
        let (server_side, client_side) = kernel_forwarder_mechanisms();
        let fwd = forwarder(
            ForwarderOptions::new("forwarder", nsmgr_url.clone())
                .channels(channels.clone())
                .root(root.child_token())
                .server_mechanisms(server_side)
                .client_mechanisms(client_side),
        );
        servers.push(serve(&fwd_url, fwd.services()).await.unwrap());

        // The firewall and the gateway, as nse-firewall and nse-vpn-gateway build them.
        let fw = firewall(
            "firewall",
            &pods.fw.url(),
            labels("firewall"),
            EndpointOptions::new().root(root.child_token()),
            ClientOptions::new("firewall-client", nsmgr_url.clone())
                .channels(channels.clone())
                .root(root.child_token())
                .retry(None),
        );
        servers.push(serve(&fw_url, fw.services()).await.unwrap());
        apply_acl(&pods.fw.netns(), &ACL.parse::<Acl>().unwrap())
            .await
            .unwrap();
        let gw = vpn_gateway(
            "vpn-gateway",
            &pods.gw.url(),
            vec![PREFIX.parse().unwrap()],
            vec![CORPORATE.parse().unwrap()],
            EndpointOptions::new().root(root.child_token()),
        );
        servers.push(serve(&gw_url, gw.services()).await.unwrap());
        route_to_corporate(&pods.gw.netns(), &[CORPORATE.parse().unwrap()])
            .await
            .unwrap();

        let front_ns = RegistryChain::<NetworkService>::builder()
            .push(grpc_registry(channels.clone(), nsmgr_url.clone()))
            .build();
        let front_nse = RegistryChain::<NetworkServiceEndpoint>::builder()
            .push(grpc_registry(channels.clone(), nsmgr_url.clone()))
            .build();
        for ns in ns_file::load(service_file()).unwrap() {
            front_ns.register(&mut Cx::client(), ns).await.unwrap();
        }
        for entry in [
            fwd.registration(&fwd_url),
            registration("firewall", &fw_url, "firewall"),
            registration("vpn-gateway", &gw_url, "vpn-gateway"),
        ] {
            front_nse.register(&mut Cx::client(), entry).await.unwrap();
        }
        Mesh {
            dir,
            nsmgr_url,
            channels,
            root,
            _servers: servers,
        }
    }

    fn client(&self, pod: &Ns) -> Chain {
        client(
            ClientOptions::new("nsc", self.nsmgr_url.clone())
                .channels(self.channels.clone())
                .root(self.root.child_token())
                .retry(None)
                .mechanisms(vec![])
                .handler(kernel_client(pod.url()).ifname("nsm-1")),
        )
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        self.root.cancel();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn names(conn: &Connection) -> Vec<String> {
    conn.path
        .as_ref()
        .map(|p| p.path_segments.iter().map(|s| s.name.clone()).collect())
        .unwrap_or_default()
}

fn host(cidr: &str) -> &str {
    cidr.split('/').next().unwrap_or(cidr)
}

fn corporate(port: u16) -> SocketAddr {
    SocketAddr::new(CORPORATE_HOST.parse().unwrap(), port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chain_passes_the_firewall_filters_tcp_reaches_the_corporate_host_and_leaves_nothing() {
    require_root!();
    let pods = Pods::new();
    let mesh = Mesh::start(&pods).await;
    let baseline = pods.everything();
    let _listeners = (
        pods.corp.listen(ALLOWED).await,
        pods.corp.listen(DENIED).await,
    );
    let nsc = mesh.client(&pods.nsc);
    let req = NetworkServiceRequest {
        connection: Some(Connection {
            network_service: SERVICE.into(),
            ..Default::default()
        }),
        mechanism_preferences: vec![],
    };
    let started = Instant::now();
    let conn = nsc.request(&mut Cx::client(), req).await.unwrap();
    let answered = started.elapsed();

    // Selected by the service's matches: the plain client to the firewall, the
    // firewall (app=firewall) on to the gateway.
    let path = names(&conn);
    assert_eq!(
        path,
        [
            "nsc",
            "nsmgr",
            "forwarder",
            "firewall",
            "firewall-client",
            "nsmgr",
            "forwarder",
            "vpn-gateway"
        ],
        "{path:?}"
    );
    let ipc = conn.context.as_ref().unwrap().ip_context.as_ref().unwrap();
    let (client_addr, gateway_addr) = (ipc.src_ip_addrs[0].clone(), ipc.dst_ip_addrs[0].clone());
    assert_eq!(
        pods.nsc.addresses("nsm-1"),
        std::slice::from_ref(&client_addr)
    );
    let routes = pods.nsc.json(&["route", "show", CORPORATE]);
    assert_eq!(routes.len(), 1, "{routes:?}");
    assert_eq!(routes[0]["gateway"], host(&gateway_addr), "{routes:?}");

    // The firewall holds one bridge joining its two interfaces, which have no address.
    let want_ports = |b: &[(String, Vec<String>)]| b.len() == 1 && b[0].1.len() == 2;
    let until = Instant::now() + Duration::from_secs(5);
    while !want_ports(&pods.fw.bridges()) {
        assert!(Instant::now() < until, "bridge: {:?}", pods.fw.bridges());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let bridged = started.elapsed();
    let bridges = pods.fw.bridges();
    for port in &bridges[0].1 {
        assert_eq!(pods.fw.addresses(port), Vec::<String>::new(), "{port}");
    }
    let gw_links: Vec<String> = pods
        .gw
        .json(&["addr", "show"])
        .iter()
        .filter(|l| l["ifname"] != "lo" && l["ifname"] != "corp0")
        .map(|l| l["ifname"].as_str().unwrap_or("?").to_string())
        .collect();
    assert_eq!(gw_links.len(), 1, "{gw_links:?}");
    assert_eq!(
        pods.gw.addresses(&gw_links[0]),
        std::slice::from_ref(&gateway_addr)
    );

    // Traffic: the gateway, then the corporate host through it (masqueraded).
    assert!(
        pods.nsc.until_ping(host(&gateway_addr)),
        "client -> gateway"
    );
    assert!(
        pods.nsc.until_ping(CORPORATE_HOST),
        "client -> corporate host"
    );
    eprintln!(
        "request answered after {answered:?}, the firewall's interfaces both bridged after {bridged:?}"
    );
    pods.nsc
        .connect(corporate(ALLOWED))
        .await
        .expect("the allowed port connects");
    let denied = pods.nsc.connect(corporate(DENIED)).await.unwrap_err();
    assert_eq!(denied.kind(), std::io::ErrorKind::TimedOut, "{denied}");
    // Not allowed, not denied: the default (deny). Nothing listens there, so a reset
    // would say "refused": a time-out says the firewall dropped the SYN.
    let other = pods.nsc.connect(corporate(9000)).await.unwrap_err();
    assert_eq!(other.kind(), std::io::ErrorKind::TimedOut, "{other}");
    // The same port passes once the access list allows it: it was the firewall.
    apply_acl(&pods.fw.netns(), &"default allow".parse::<Acl>().unwrap())
        .await
        .unwrap();
    pods.nsc
        .connect(corporate(DENIED))
        .await
        .expect("the port connects without the rule");
    let refused = pods.nsc.connect(corporate(9000)).await.unwrap_err();
    assert_eq!(
        refused.kind(),
        std::io::ErrorKind::ConnectionRefused,
        "{refused}"
    );
    apply_acl(&pods.fw.netns(), &ACL.parse::<Acl>().unwrap())
        .await
        .unwrap();

    // A refresh keeps the chain and its bridge.
    let again = nsc
        .request(
            &mut Cx::client(),
            NetworkServiceRequest {
                connection: Some(conn),
                mechanism_preferences: vec![],
            },
        )
        .await
        .unwrap();
    assert_eq!(names(&again), path);
    assert_eq!(pods.fw.bridges(), bridges, "a refresh keeps the bridge");
    assert!(pods.nsc.ping_with(&[CORPORATE_HOST]), "after the refresh");

    nsc.close(&mut Cx::client(), again).await.unwrap();
    assert_eq!(pods.fw.bridges(), [], "the firewall's bridge is gone");
    let after = pods.everything();
    for (i, pod) in ["client", "firewall", "gateway", "corporate"]
        .iter()
        .enumerate()
    {
        assert_eq!(after[i], baseline[i], "{pod} pod after Close");
    }
}

/// How long a program may take to get ready, or to exit after SIGTERM.
const READY: Duration = Duration::from_secs(15);

/// One running example program. Dropping it kills it and reaps it.
struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
    stdout: Option<std::sync::mpsc::Receiver<String>>,
    done: bool,
}

impl Proc {
    /// Starts `program` (inside `pod` when given) with `env`; stderr goes to
    /// `<name>.log` in `dir`.
    fn start(dir: &TempDir, program: &str, pod: Option<&Ns>, env: &[(&str, &str)]) -> Proc {
        let log = dir.0.join(format!("{program}.log"));
        let mut cmd = match pod {
            Some(pod) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", &pod.name]).arg(bin(program));
                c
            }
            None => Command::new(bin(program)),
        };
        for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("NSM_")) {
            cmd.env_remove(k);
        }
        let mut child = cmd
            .env("NSM_LOG_LEVEL", "info")
            .envs(nsm_tests::identity_env(dir, program, env))
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(File::create(&log).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {program}: {e}"));
        let stdout = child.stdout.take().map(read_lines);
        Proc {
            name: program.to_string(),
            child,
            log,
            stdout,
            done: false,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn wait_for_log(&mut self, parts: &[&str]) {
        let until = Instant::now() + READY;
        while !self
            .log()
            .lines()
            .any(|l| parts.iter().all(|p| l.contains(p)))
        {
            if let Ok(Some(status)) = self.child.try_wait() {
                self.done = true;
                panic!(
                    "{} exited ({status}) before {parts:?}:\n{}",
                    self.name,
                    self.log()
                );
            }
            assert!(
                Instant::now() < until,
                "{} did not log {parts:?}:\n{}",
                self.name,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn next_json(&mut self) -> Value {
        let line = self
            .stdout
            .as_ref()
            .unwrap()
            .recv_timeout(READY)
            .unwrap_or_else(|e| panic!("{} printed nothing ({e}):\n{}", self.name, self.log()));
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"))
    }

    /// SIGTERM, then asserts a clean exit.
    fn terminate(&mut self) {
        let pid = self.child.id().to_string();
        assert!(run("kill", &["-TERM", &pid]).0);
        let until = Instant::now() + READY;
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            assert!(
                Instant::now() < until,
                "{} still runs:\n{}",
                self.name,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        self.done = true;
        assert_eq!(
            status.code(),
            Some(0),
            "{}: {status}\n{}",
            self.name,
            self.log()
        );
    }

    /// Waits for the exit and returns (status code, stderr).
    fn exit(mut self) -> (Option<i32>, String) {
        let status = self.child.wait().unwrap();
        self.done = true;
        (status.code(), self.log())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if !self.done {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!("----- {} -----\n{}", self.name, self.log());
        }
    }
}

fn nft_tables(pod: &Ns) -> String {
    run("ip", &["netns", "exec", &pod.name, "nft", "list", "tables"]).1
}

#[test]
fn the_binaries_make_the_same_chain_and_undo_it_when_they_stop() {
    require_root!();
    let pods = Pods::new();
    let dir = TempDir::new("nsm-sfc", "binaries");
    let (reg_url, mgr_url) = (dir.unix("registry.sock"), dir.unix("nsmgr.sock"));
    let (fwd_url, fw_url, gw_url) = (
        dir.unix("forwarder.sock"),
        dir.unix("firewall.sock"),
        dir.unix("gateway.sock"),
    );
    let file = service_file().display().to_string();
    // The demo's access list: the same rules as ACL.
    let acl_file = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/config/firewall.acl")
        .display()
        .to_string();
    let demo: Acl = std::fs::read_to_string(&acl_file).unwrap().parse().unwrap();
    assert_eq!(demo, ACL.parse::<Acl>().unwrap());
    let mut registry = Proc::start(&dir, "nsm-registry", None, &[("NSM_LISTEN_ON", &reg_url)]);
    registry.wait_for_log(&["serving", &reg_url]);
    let mut mgr = Proc::start(
        &dir,
        "nsmgr",
        None,
        &[
            ("NSM_NAME", "nsmgr"),
            ("NSM_LISTEN_ON", &mgr_url),
            ("NSM_REGISTRY_URL", &reg_url),
        ],
    );
    mgr.wait_for_log(&["serving", &mgr_url]);
    let mut fwd = Proc::start(
        &dir,
        "nsm-forwarder",
        None,
        &[
            ("NSM_NAME", "forwarder"),
            ("NSM_LISTEN_ON", &fwd_url),
            ("NSM_CONNECT_TO", &mgr_url),
        ],
    );
    fwd.wait_for_log(&["registered endpoint", "name=forwarder"]);
    let mut gw = Proc::start(
        &dir,
        "nse-vpn-gateway",
        Some(&pods.gw),
        &[
            ("NSM_NAME", "vpn-gateway"),
            ("NSM_LISTEN_ON", &gw_url),
            ("NSM_CONNECT_TO", &mgr_url),
            ("NSM_SERVICE_NAMES", SERVICE),
            ("NSM_SERVICE_FILE", &file),
            ("NSM_CIDR_PREFIX", "172.16.62.0/24"),
            ("NSM_CORPORATE_PREFIX", CORPORATE),
        ],
    );
    gw.wait_for_log(&["registered endpoint", "name=vpn-gateway"]);
    let mut fw = Proc::start(
        &dir,
        "nse-firewall",
        Some(&pods.fw),
        &[
            ("NSM_NAME", "firewall"),
            ("NSM_LISTEN_ON", &fw_url),
            ("NSM_CONNECT_TO", &mgr_url),
            ("NSM_SERVICE_NAME", SERVICE),
            ("NSM_SERVICE_FILE", &file),
            ("NSM_ACL_FILE", &acl_file),
        ],
    );
    fw.wait_for_log(&["registered endpoint", "name=firewall"]);
    assert!(nft_tables(&pods.fw).contains("table bridge nsm-firewall"));
    assert!(nft_tables(&pods.gw).contains("table inet nsm-vpn-gateway"));
    let baseline = pods.everything();

    let mut nsc = Proc::start(
        &dir,
        "nsc",
        Some(&pods.nsc),
        &[
            ("NSM_NAME", "nsc"),
            ("NSM_CONNECT_TO", &mgr_url),
            ("NSM_NETWORK_SERVICES", "kernel://vpn-gateway/nsm-1"),
            ("NSM_REQUEST_TIMEOUT", "10s"),
        ],
    );
    let conn = nsc.next_json();
    let path: Vec<&str> = conn["path"]["pathSegments"]
        .as_array()
        .unwrap_or_else(|| panic!("{conn}"))
        .iter()
        .map(|s| s["name"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(
        path,
        [
            "nsc",
            "nsmgr",
            "forwarder",
            "firewall",
            "firewall-client",
            "nsmgr",
            "forwarder",
            "vpn-gateway"
        ]
    );
    assert!(
        pods.nsc.until_ping(CORPORATE_HOST),
        "client -> corporate host"
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let _listeners = (
            pods.corp.listen(ALLOWED).await,
            pods.corp.listen(DENIED).await,
        );
        pods.nsc.connect(corporate(ALLOWED)).await.expect("allowed");
        let denied = pods.nsc.connect(corporate(DENIED)).await.unwrap_err();
        assert_eq!(denied.kind(), std::io::ErrorKind::TimedOut, "{denied}");
    });
    assert_eq!(pods.fw.bridges().len(), 1);

    // The client closes its connection when it stops: the whole chain goes.
    nsc.terminate();
    let until = Instant::now() + READY;
    while pods.everything() != baseline {
        assert!(
            Instant::now() < until,
            "left after the client stopped: {:?}",
            pods.everything()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The endpoints stop cleanly and take their nftables tables with them.
    fw.terminate();
    gw.terminate();
    assert!(!nft_tables(&pods.fw).contains("nsm-firewall"));
    assert!(!nft_tables(&pods.gw).contains("nsm-vpn-gateway"));
}

#[test]
fn a_bad_access_list_service_file_or_prefix_is_one_line_and_exit_2() {
    let dir = TempDir::new("nsm-sfc", "config");
    let bad_file = dir.0.join("bad.json");
    std::fs::write(
        &bad_file,
        r#"{"name":"x","matches":[{"routes":[{"destinationSelector":["a"]}]}]}"#,
    )
    .unwrap();
    let bad = bad_file.display().to_string();
    let common = [
        ("NSM_NAME", "x"),
        ("NSM_LISTEN_ON", "unix:///nonexistent/x.sock"),
    ];
    for (program, env, says) in [
        (
            "nse-firewall",
            vec![("NSM_SERVICE_NAME", "s"), ("NSM_ACL", "allow tcp 99999")],
            "bad port",
        ),
        (
            "nse-firewall",
            vec![
                ("NSM_SERVICE_NAME", "s"),
                ("NSM_SERVICE_FILE", bad.as_str()),
            ],
            "matches[0].routes[0].destinationSelector: expected a map of strings",
        ),
        (
            "nse-vpn-gateway",
            vec![("NSM_SERVICE_NAMES", "s")],
            "--corporate-prefix",
        ),
        (
            "nse-vpn-gateway",
            vec![
                ("NSM_SERVICE_NAMES", "s"),
                ("NSM_CORPORATE_PREFIX", "10.60.0.0/33"),
            ],
            "10.60.0.0/33",
        ),
    ] {
        let mut all = common.to_vec();
        all.extend(env);
        let (code, log) = Proc::start(&dir, program, None, &all).exit();
        assert_eq!(code, Some(2), "{program} {all:?}: {log}");
        assert_eq!(log.trim().lines().count(), 1, "{program}: {log}");
        assert!(
            log.contains(says) && log.starts_with(program),
            "{program}: {log}"
        );
    }
}
