//! The interdomain programs as processes with the KERNEL data plane, as root
//! (docs/INTERDOMAIN.md): a client of `cluster-a` uses a service of `cluster-b` over
//! VXLAN between the two clusters' nodes, through their public addresses only.
//!
//! The network ([`nsm_testkit::clusters`]): two clusters of two nodes, each node a
//! namespace with an internal address behind its cluster's gateway; the gateways are
//! joined by a public link and translate each node's public address 1:1 (nftables), so
//! an internal address of one cluster is unreachable from the other (checked). Each
//! node runs its `nsmgr` and `nsm-forwarder` (tunnel IP: its internal address); each
//! cluster runs `nsm-registry`, `nsm-registry-proxy` and `nsmgr-proxy` (whose address
//! map names each node's public address) in the host namespace, where a real DNS
//! server (dnsmasq, on loopback) holds the clusters' SRV records. Within a cluster the
//! programs talk over unix sockets in the test's directory (reachable from every
//! namespace), across clusters over loopback TCP: only the data plane crosses the
//! public link.
//!
//! Checked: the 8-segment path; the VXLAN devices in the client's and the endpoint's
//! pods each name their own node's internal address as local and the other node's
//! public address as remote (`swap_ip` on both proxies); ping crosses; the endpoint is
//! SIGKILLed, a second one on the other node of `cluster-b` takes over (a new tunnel
//! to that node's public address) and ping crosses again; after the client's SIGTERM,
//! no interface NSM made is left in any namespace. Without root (or `ip`, `ping`,
//! `nft`, `dnsmasq`) it prints a skip line and passes.
//!
//! The bench (BENCHMARKS.md, "interdomain"), ignored by default, runs on the same
//! network against the release programs (`cargo build --release -p nsm-examples
//! --bins`): `NSM_TEST_BIN_DIR=target/release cargo nextest run -p nsm-tests
//! --all-features --test interdomain_kernel --run-ignored only --no-capture`.

use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use nsm_testkit::clusters::{two_clusters, Cluster};
use nsm_testkit::dnsmasq::{dnsmasq, free_addr, DnsServer};
use nsm_testkit::Lab;
use nsm_tests::{poll, Proc, TempDir};
use serde_json::Value;

const READY: Duration = Duration::from_secs(20);
const HEAL_WITHIN: Duration = Duration::from_secs(15);
const SERVICE: &str = "icmp-responder";
const DOMAINS: [&str; 2] = ["cluster-a", "cluster-b"];

fn free_tcp() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
}

/// One cluster's programs and where they listen.
struct Domain {
    name: &'static str,
    net: Cluster,
    /// The registry's TCP address (for other domains' registry proxies).
    registry: SocketAddr,
    /// The nsmgr-proxy's public TCP address.
    nsmgr_proxy: SocketAddr,
    procs: Vec<Proc>,
}

impl Domain {
    fn sock(&self, dir: &TempDir, what: &str) -> String {
        dir.unix(&format!("{what}-{}.sock", self.name))
    }

    fn nsmgr_url(&self, dir: &TempDir, node: usize) -> String {
        self.sock(dir, &format!("nsmgr{node}"))
    }

    /// Starts the registry, the proxies, and a manager and a forwarder on each node.
    fn start(&mut self, dir: &TempDir, lab: &Lab, dns: SocketAddr) {
        let start = |pod: Option<&str>,
                     program: &str,
                     name: String,
                     env: &[(&str, &str)],
                     ready: &[&str]| {
            let pod = pod.map(|p| lab.full(p));
            let mut p = nsm_tests::start_in(pod.as_deref(), dir, program, &name, env, false, READY);
            p.wait_for_log(ready);
            p
        };
        let dns = dns.to_string();
        let reg_unix = self.sock(dir, "registry");
        let reg_tcp = format!("tcp://{}", self.registry);
        let reg_proxy = format!("tcp://{}", free_tcp());
        let proxy_unix = self.sock(dir, "nsmgr-proxy");
        let proxy_tcp = format!("tcp://{}", self.nsmgr_proxy);
        let d = self.name;
        self.procs.push(start(
            None,
            "nsm-registry",
            format!("registry-{d}"),
            &[
                ("NSM_LISTEN_ON", &format!("{reg_unix},{reg_tcp}")),
                ("NSM_REGISTRY_PROXY_URL", &reg_proxy),
            ],
            &["serving", &reg_tcp],
        ));
        self.procs.push(start(
            None,
            "nsm-registry-proxy",
            format!("registry-proxy-{d}"),
            &[
                ("NSM_LISTEN_ON", &reg_proxy),
                // What this domain's forwarders reach the nsmgr-proxy at.
                ("NSM_NSMGR_PROXY_URL", &proxy_unix),
                ("NSM_DNS_SERVER", &dns),
            ],
            &["serving", &reg_proxy],
        ));
        self.procs.push(start(
            None,
            "nsmgr-proxy",
            format!("nsmgr-proxy-{d}"),
            &[
                ("NSM_NAME", &format!("nsmgr-proxy-{d}")),
                ("NSM_DOMAIN", d),
                ("NSM_LISTEN_ON", &format!("{proxy_tcp},{proxy_unix}")),
                ("NSM_PUBLIC_URL", &proxy_tcp),
                ("NSM_REGISTRY_URL", &reg_unix),
                ("NSM_DNS_SERVER", &dns),
                ("NSM_ADDRESS_MAP", &self.net.address_map()),
            ],
            &["serving", &proxy_tcp],
        ));
        for (i, node) in self.net.nodes.clone().iter().enumerate() {
            let nsmgr = self.nsmgr_url(dir, i);
            let name = format!("nsmgr-{d}-{i}");
            self.procs.push(start(
                Some(&node.ns),
                "nsmgr",
                name.clone(),
                &[
                    ("NSM_NAME", &name),
                    ("NSM_LISTEN_ON", &nsmgr),
                    ("NSM_REGISTRY_URL", &reg_unix),
                ],
                &["serving", &nsmgr],
            ));
            let fwd = format!("fwd-{d}-{i}");
            self.procs.push(start(
                Some(&node.ns),
                "nsm-forwarder",
                fwd.clone(),
                &[
                    ("NSM_NAME", &fwd),
                    ("NSM_LISTEN_ON", &self.sock(dir, &format!("fwd{i}"))),
                    ("NSM_CONNECT_TO", &nsmgr),
                    ("NSM_TUNNEL_IP", &node.internal),
                ],
                &["registered endpoint", &format!("name={fwd}")],
            ));
        }
    }
}

/// `(local, remote)` of the VXLAN device of a pod, which must have one.
fn tunnel_ends(lab: &Lab, pod: &str) -> (String, String) {
    lab.vxlan_ends(pod)
        .expect("ip link")
        .unwrap_or_else(|| panic!("no VXLAN device in {pod}: {:?}", lab.links(pod)))
}

/// The links of a namespace but `lo` and the lab's own (`eth0`, `n<i>`, `pub0`).
fn mesh_links(lab: &Lab, ns: &str) -> Vec<String> {
    lab.links(ns)
        .expect("ip link")
        .into_keys()
        .filter(|l| {
            l != "lo" && l != "eth0" && l != "pub0" && !(l.starts_with('n') && l.len() == 2)
        })
        .collect()
}

fn ping(lab: &Lab, pod: &str, to: &str) -> bool {
    lab.exec(pod, "ping", &["-c1", "-W0.5", to]).is_ok()
}

fn next_connection(nsc: &mut Proc, within: Duration, pred: impl Fn(&Value) -> bool) -> Value {
    let until = Instant::now() + within;
    loop {
        let left = until.saturating_duration_since(Instant::now());
        let line = nsc.stdout_within(left).unwrap_or_else(|e| {
            panic!("nsc printed no matching connection within {within:?}: {e}")
        });
        let conn: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
        if pred(&conn) {
            return conn;
        }
    }
}

fn path(conn: &Value) -> Vec<String> {
    conn["path"]["pathSegments"]
        .as_array()
        .unwrap_or_else(|| panic!("no path in {conn}"))
        .iter()
        .map(|s| s["name"].as_str().unwrap_or_default().to_string())
        .collect()
}

fn dst(conn: &Value) -> String {
    let a = conn["context"]["ipContext"]["dstIpAddrs"][0]
        .as_str()
        .unwrap_or_else(|| panic!("no endpoint address in {conn}"));
    a.split('/').next().unwrap_or(a).to_string()
}

/// The two clusters running, DNS included; dropped, every process stops and the lab
/// goes.
struct World {
    domains: [Domain; 2],
    _dns: DnsServer,
    dir: TempDir,
    lab: Lab,
}

/// Builds the network and starts both clusters; `None` (after a skip line) when this
/// machine cannot run it.
fn world() -> Option<World> {
    if !nsm_testkit::can_run("the interdomain kernel process tests") {
        return None;
    }
    if nsm_testkit::lab::sh("nft", &["--version"]).is_err() {
        eprintln!("skipped: interdomain kernel process test: no nft");
        return None;
    }
    let program = dnsmasq("the interdomain kernel process test")?;
    let mut lab = Lab::new(nsm_testkit::unique("nsmid"));
    let [net_a, net_b] = two_clusters(&mut lab, ["a", "b"], 2).expect("two clusters");
    for pod in ["nsc", "nse1", "nse2", "nse-a"] {
        lab.add(pod).expect("pod");
    }
    // The border is real: cluster-b reaches cluster-a's node by its public address only.
    assert!(ping(&lab, &net_b.nodes[0].ns, &net_a.nodes[0].public));
    assert!(!ping(&lab, &net_b.nodes[0].ns, &net_a.nodes[0].internal));

    let dir = TempDir::new("nsm", "interdomain-kernel");
    let mut domains = [net_a, net_b].map(|net| Domain {
        name: if net.name == "a" {
            DOMAINS[0]
        } else {
            DOMAINS[1]
        },
        net,
        registry: free_tcp(),
        nsmgr_proxy: free_tcp(),
        procs: Vec::new(),
    });
    let dns_addr = free_addr();
    let records: Vec<(String, SocketAddr)> = domains
        .iter()
        .flat_map(|d| {
            [
                (format!("registry.nsm-system.{}", d.name), d.registry),
                (format!("nsmgr-proxy.nsm-system.{}", d.name), d.nsmgr_proxy),
            ]
        })
        .collect();
    let dns = DnsServer::start(&program, dns_addr, &records, &DOMAINS.map(String::from))
        .expect("dnsmasq");
    for d in &mut domains {
        d.start(&dir, &lab, dns_addr);
    }
    Some(World {
        domains,
        _dns: dns,
        dir,
        lab,
    })
}

impl World {
    /// `nse-icmp-responder` `name` in the pod of that name, on node `node` of domain
    /// `domain` (0 or 1), handing out `prefix`, registered.
    fn nse(&self, domain: usize, name: &str, node: usize, prefix: &str) -> Proc {
        let mut p = nsm_tests::start_in(
            Some(&self.lab.full(name)),
            &self.dir,
            "nse-icmp-responder",
            name,
            &[
                ("NSM_NAME", name),
                ("NSM_LISTEN_ON", &self.dir.unix(&format!("{name}.sock"))),
                (
                    "NSM_CONNECT_TO",
                    &self.domains[domain].nsmgr_url(&self.dir, node),
                ),
                ("NSM_SERVICE_NAMES", SERVICE),
                ("NSM_CIDR_PREFIX", prefix),
            ],
            false,
            READY,
        );
        p.wait_for_log(&["registered endpoint", &format!("name={name}")]);
        p
    }

    /// `nsc` in the pod `nsc` on cluster-a's node 0, requesting `service`.
    fn nsc(&self, log: &str, service: &str) -> Proc {
        nsm_tests::start_in(
            Some(&self.lab.full("nsc")),
            &self.dir,
            "nsc",
            log,
            &[
                ("NSM_NAME", "nsc"),
                ("NSM_CONNECT_TO", &self.domains[0].nsmgr_url(&self.dir, 0)),
                ("NSM_NETWORK_SERVICES", &format!("kernel://{service}/nsm-1")),
                ("NSM_REQUEST_TIMEOUT", "15s"),
            ],
            true,
            READY,
        )
    }
}

#[test]
fn a_kernel_client_reaches_another_cluster_over_vxlan_through_public_addresses_and_heals() {
    let started = Instant::now();
    let Some(w) = world() else {
        return;
    };
    let lab = &w.lab;
    let [a, b] = &w.domains;
    let mut nse1 = w.nse(1, "nse1", 0, "172.16.101.0/24");
    eprintln!("two clusters up in {:?}", started.elapsed());

    let requested = Instant::now();
    let mut nsc = w.nsc("nsc", &format!("{SERVICE}@cluster-b"));
    let conn = next_connection(&mut nsc, READY, |_| true);
    eprintln!("connected in {:?}", requested.elapsed());
    assert_eq!(
        path(&conn),
        [
            "nsc",
            "nsmgr-cluster-a-0",
            "fwd-cluster-a-0",
            "nsmgr-proxy-cluster-a",
            "nsmgr-proxy-cluster-b",
            "nsmgr-cluster-b-0",
            "fwd-cluster-b-0",
            "nse1"
        ],
        "{conn}"
    );
    assert_eq!(conn["networkServiceEndpointName"], "nse1@cluster-b");
    assert_eq!(conn["mechanism"]["type"], "KERNEL", "{conn}");
    // Each side's tunnel: its own internal address, the other node's public one.
    let (a0, b0, b1) = (&a.net.nodes[0], &b.net.nodes[0], &b.net.nodes[1]);
    assert_eq!(
        tunnel_ends(lab, "nsc"),
        (a0.internal.clone(), b0.public.clone())
    );
    assert_eq!(
        tunnel_ends(lab, "nse1"),
        (b0.internal.clone(), a0.public.clone())
    );
    let to = dst(&conn);
    poll(READY, &format!("ping {to} across the clusters"), || {
        ping(lab, "nsc", &to).then_some(())
    });
    let (_, tx) = lab.packets(&a.net.gateway, "pub0").expect("counters");
    assert!(tx > 0, "the pings crossed the public link");

    // The endpoint dies (still registered); another one on cluster-b's other node.
    let killed = Instant::now();
    nse1.kill9();
    let _nse2 = w.nse(1, "nse2", 1, "172.16.102.0/24");
    let healed = next_connection(&mut nsc, HEAL_WITHIN, |c| {
        c["networkServiceEndpointName"] == "nse2@cluster-b"
    });
    eprintln!("reselected after {:?}", killed.elapsed());
    assert_eq!(
        path(&healed)[5..],
        ["nsmgr-cluster-b-1", "fwd-cluster-b-1", "nse2"]
    );
    let to = dst(&healed);
    poll(HEAL_WITHIN, &format!("ping {to} after the heal"), || {
        ping(lab, "nsc", &to).then_some(())
    });
    eprintln!("heal time (remote endpoint killed): {:?}", killed.elapsed());
    assert_eq!(
        tunnel_ends(lab, "nsc"),
        (a0.internal.clone(), b1.public.clone())
    );
    assert_eq!(
        tunnel_ends(lab, "nse2"),
        (b1.internal.clone(), a0.public.clone())
    );
    poll(READY, "the dead endpoint's device is deleted", || {
        mesh_links(lab, "nse1").is_empty().then_some(())
    });

    // Close: nothing NSM made is left anywhere.
    nsc.terminate();
    let mut all: Vec<String> = ["nsc", "nse1", "nse2"].map(String::from).to_vec();
    for d in &w.domains {
        all.push(d.net.gateway.clone());
        all.extend(d.net.nodes.iter().map(|n| n.ns.clone()));
    }
    for ns in &all {
        poll(READY, &format!("{ns}: nothing left after Close"), || {
            mesh_links(lab, ns).is_empty().then_some(())
        });
    }
    eprintln!("done in {:?}", started.elapsed());
}

/// Request + Close timings of one KERNEL client chain in this process (in the `nsc`
/// pod, at cluster-a's node 0) for `service`, `n` after `warm_up`; (Request, Close).
async fn request_times(
    w: &World,
    service: &str,
    warm_up: usize,
    n: usize,
) -> (Vec<Duration>, Vec<Duration>) {
    use nsm_sdk::chains::{client, ClientOptions, Security};
    use nsm_sdk::config::NsUrl;
    use nsm_sdk::security::PolicySet;
    use nsm_sdk::Cx;

    let identity = w.dir.ca().identity("bench").expect("an identity");
    let security = Security::with_identity(identity.fixed(), PolicySet::defaults().unwrap())
        .expect("security");
    let nsmgr: nsm_sdk::transport::Url = w.domains[0].nsmgr_url(&w.dir, 0).parse().expect("a URL");
    let chain = client(
        ClientOptions::new("bench", nsmgr)
            .security(&security)
            .retry(None)
            .mechanisms(vec![])
            .handler(nsm_sdk_kernel::kernel_client(w.lab.url("nsc")).ifname("nsm-1")),
    );
    let url = NsUrl::parse(&format!("kernel://{service}/nsm-1")).expect("an NS URL");
    let (mut req, mut close) = (Vec::new(), Vec::new());
    for i in 0..warm_up + n {
        let t = Instant::now();
        let conn = chain
            .request(&mut Cx::client(), url.to_request())
            .await
            .unwrap_or_else(|e| panic!("request {i} for {service}: {e}"));
        let r = t.elapsed();
        let t = Instant::now();
        chain
            .close(&mut Cx::client(), conn)
            .await
            .unwrap_or_else(|e| panic!("close {i} for {service}: {e}"));
        if i >= warm_up {
            req.push(r);
            close.push(t.elapsed());
        }
    }
    (req, close)
}

/// The bench: interdomain KERNEL Request (8 segments, VXLAN through the public
/// addresses) beside the same Request inside cluster-a (6 segments, VXLAN between its
/// two nodes), alternating in rounds; then the heal time after the remote endpoint
/// dies (SIGKILL), from the kill to the first ping through the other endpoint, with
/// the nsc program.
#[test]
#[ignore = "a bench: run with --run-ignored only --no-capture, in release"]
fn bench_interdomain_kernel_request_and_heal() {
    let Some(w) = world() else {
        return;
    };
    let samples: usize = std::env::var("NSM_BENCH_SAMPLES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    let heals: usize = std::env::var("NSM_BENCH_HEALS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    eprintln!("machine: {}", nsm_testkit::bench::machine());
    let _local = w.nse(0, "nse-a", 1, "172.16.103.0/24");
    let mut nses = [
        Some(w.nse(1, "nse1", 0, "172.16.101.0/24")),
        Some(w.nse(1, "nse2", 1, "172.16.102.0/24")),
    ];
    let rt = tokio::runtime::Runtime::new().expect("a runtime");
    let (mut remote, mut local) = ((Vec::new(), Vec::new()), (Vec::new(), Vec::new()));
    let rounds = 4;
    for _ in 0..rounds {
        let (r, c) = rt.block_on(request_times(
            &w,
            &format!("{SERVICE}@cluster-b"),
            10,
            samples / rounds,
        ));
        remote.0.extend(r);
        remote.1.extend(c);
        // Only nse-a serves the service inside cluster-a.
        let (r, c) = rt.block_on(request_times(&w, SERVICE, 10, samples / rounds));
        local.0.extend(r);
        local.1.extend(c);
    }
    use nsm_testkit::bench::Stats;
    eprintln!(
        "interdomain Request (8 segments): {}",
        Stats::of(&remote.0).line()
    );
    eprintln!(
        "interdomain Close (8 segments): {}",
        Stats::of(&remote.1).line()
    );
    eprintln!("local Request (6 segments): {}", Stats::of(&local.0).line());
    eprintln!("local Close (6 segments): {}", Stats::of(&local.1).line());
    eprintln!(
        "loadavg after the Requests: {}",
        nsm_testkit::bench::loadavg()
    );

    let mut nsc = w.nsc("nsc-heal", &format!("{SERVICE}@cluster-b"));
    let mut conn = next_connection(&mut nsc, READY, |_| true);
    let mut times = Vec::new();
    for i in 0..heals {
        let victim = if conn["networkServiceEndpointName"] == "nse1@cluster-b" {
            0
        } else {
            1
        };
        let other = format!("nse{}@cluster-b", 2 - victim);
        let killed = Instant::now();
        if let Some(mut p) = nses[victim].take() {
            p.kill9();
        }
        conn = next_connection(&mut nsc, HEAL_WITHIN, |c| {
            c["networkServiceEndpointName"] == other.as_str()
        });
        let to = dst(&conn);
        poll(HEAL_WITHIN, &format!("heal {i}: ping {to}"), || {
            ping(&w.lab, "nsc", &to).then_some(())
        });
        times.push(killed.elapsed());
        let (name, node, prefix) = if victim == 0 {
            ("nse1", 0, "172.16.101.0/24")
        } else {
            ("nse2", 1, "172.16.102.0/24")
        };
        nses[victim] = Some(w.nse(1, name, node, prefix));
    }
    eprintln!(
        "heal after the remote endpoint died (kill to first ping): {}",
        Stats::of(&times).line()
    );
    eprintln!("loadavg at the end: {}", nsm_testkit::bench::loadavg());
    nsc.terminate();
}
