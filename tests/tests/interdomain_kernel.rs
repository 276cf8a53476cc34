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

/// `(local, remote)` of the VXLAN device of a pod (its only link but `lo`).
fn tunnel_ends(lab: &Lab, pod: &str) -> (String, String) {
    let out = lab.ip(pod, &["-j", "-d", "link", "show"]).expect("ip link");
    let links: Vec<Value> = serde_json::from_str(&out).expect("ip -j");
    let vxlan: Vec<&Value> = links
        .iter()
        .filter(|l| l["linkinfo"]["info_kind"] == "vxlan")
        .collect();
    assert_eq!(vxlan.len(), 1, "one VXLAN device in {pod}: {out}");
    let data = &vxlan[0]["linkinfo"]["info_data"];
    let s = |k: &str| data[k].as_str().unwrap_or_default().to_string();
    (s("local"), s("remote"))
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

#[test]
fn a_kernel_client_reaches_another_cluster_over_vxlan_through_public_addresses_and_heals() {
    nsm_testkit::require_root!("interdomain kernel process test");
    if nsm_testkit::lab::sh("nft", &["--version"]).is_err() {
        eprintln!("skipped: interdomain kernel process test: no nft");
        return;
    }
    let Some(program) = dnsmasq("the interdomain kernel process test") else {
        return;
    };
    let started = Instant::now();
    let mut lab = Lab::new(nsm_testkit::unique("nsmid"));
    let [net_a, net_b] = two_clusters(&mut lab, ["a", "b"], 2).expect("two clusters");
    for pod in ["nsc", "nse1", "nse2"] {
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
    let _dns = DnsServer::start(&program, dns_addr, &records, &DOMAINS.map(String::from))
        .expect("dnsmasq");
    for d in &mut domains {
        d.start(&dir, &lab, dns_addr);
    }
    let [a, b] = &domains;
    let nse = |name: &str, node: usize, prefix: &str| {
        let mut p = nsm_tests::start_in(
            Some(&lab.full(name)),
            &dir,
            "nse-icmp-responder",
            name,
            &[
                ("NSM_NAME", name),
                ("NSM_LISTEN_ON", &dir.unix(&format!("{name}.sock"))),
                ("NSM_CONNECT_TO", &b.nsmgr_url(&dir, node)),
                ("NSM_SERVICE_NAMES", SERVICE),
                ("NSM_CIDR_PREFIX", prefix),
            ],
            false,
            READY,
        );
        p.wait_for_log(&["registered endpoint", &format!("name={name}")]);
        p
    };
    let mut nse1 = nse("nse1", 0, "172.16.101.0/24");
    eprintln!("two clusters up in {:?}", started.elapsed());

    let requested = Instant::now();
    let mut nsc = nsm_tests::start_in(
        Some(&lab.full("nsc")),
        &dir,
        "nsc",
        "nsc",
        &[
            ("NSM_NAME", "nsc"),
            ("NSM_CONNECT_TO", &a.nsmgr_url(&dir, 0)),
            (
                "NSM_NETWORK_SERVICES",
                &format!("kernel://{SERVICE}@cluster-b/nsm-1"),
            ),
            ("NSM_REQUEST_TIMEOUT", "15s"),
        ],
        true,
        READY,
    );
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
        tunnel_ends(&lab, "nsc"),
        (a0.internal.clone(), b0.public.clone())
    );
    assert_eq!(
        tunnel_ends(&lab, "nse1"),
        (b0.internal.clone(), a0.public.clone())
    );
    let to = dst(&conn);
    poll(READY, &format!("ping {to} across the clusters"), || {
        ping(&lab, "nsc", &to).then_some(())
    });
    let (_, tx) = lab.packets(&a.net.gateway, "pub0").expect("counters");
    assert!(tx > 0, "the pings crossed the public link");

    // The endpoint dies (still registered); another one on cluster-b's other node.
    let killed = Instant::now();
    nse1.kill9();
    let _nse2 = nse("nse2", 1, "172.16.102.0/24");
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
        ping(&lab, "nsc", &to).then_some(())
    });
    eprintln!("heal time (remote endpoint killed): {:?}", killed.elapsed());
    assert_eq!(
        tunnel_ends(&lab, "nsc"),
        (a0.internal.clone(), b1.public.clone())
    );
    assert_eq!(
        tunnel_ends(&lab, "nse2"),
        (b1.internal.clone(), a0.public.clone())
    );
    poll(READY, "the dead endpoint's device is deleted", || {
        mesh_links(&lab, "nse1").is_empty().then_some(())
    });

    // Close: nothing NSM made is left anywhere.
    nsc.terminate();
    let mut all: Vec<String> = ["nsc", "nse1", "nse2"].map(String::from).to_vec();
    for d in &domains {
        all.push(d.net.gateway.clone());
        all.extend(d.net.nodes.iter().map(|n| n.ns.clone()));
    }
    for ns in &all {
        poll(READY, &format!("{ns}: nothing left after Close"), || {
            mesh_links(&lab, ns).is_empty().then_some(())
        });
    }
    eprintln!("done in {:?}", started.elapsed());
}
