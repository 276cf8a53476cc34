//! A kernel vL3 with the example programs as processes, as root (docs/VL3.md).
//!
//! Three nodes (network namespaces on one bridge, `nsm_testkit::switched_underlay`),
//! each with its `nsmgr` and `nsm-forwarder` (VXLAN between the nodes); the registry and
//! the vL3 prefix server (`nsm-vl3-ipam`) in the host namespace; a vL3 endpoint
//! (`nse-vl3`) in a pod of each of the first two nodes and two client pods (`nsc`) per
//! node (the target: three nodes, two vL3 endpoints, six clients). All talk
//! over unix sockets in the test's temp directory (files, reachable from every
//! namespace). Only 172.16.0.0/16 and fd10::/64 addresses, only inside the test's
//! namespaces.
//!
//! Checked: every ordered pair of clients pings, IPv4 and IPv6 (through at most two vL3
//! endpoints); a vL3 endpoint killed (SIGKILL), its clients come back on the other one
//! (new addresses from its prefix) and ping again within [`HEAL_WITHIN`]; the other
//! endpoint loses its link to the dead one (interface and route) when the link's token
//! runs out; after every program stopped, only `lo` (and the underlay) is left in
//! every namespace. Without root (or `ip`/`ping`) it prints a skip line and passes.
//!
//! The second test runs the vL3 bench (`benches/vl3.rs`) at a tiny size on two nodes:
//! joins, pings through the routers and by hand, iperf3 both ways, clean pods after
//! Close (no timing asserted).
//!
//! DNS (docs/VL3.md, docs/DNS.md): each client is `nsc-<node>-<n>.vl3` (its `podName`),
//! served by its vL3 endpoint, and `nsc` writes its pod's resolv.conf. glibc in every
//! pod (`getent`) resolves every other client, the clients of the other endpoint through
//! the fanout: the short name (the search domain) to the IPv6 address (AAAA) and
//! `ahostsv4` to the IPv4 one (A), each the address the pings use; a client that
//! closes stops resolving from all the others (within the names' TTL) and its pod's
//! resolv.conf is gone; after the heal every name resolves to the new address.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use nsm_testkit::{switched_underlay, Ns as Pod};
use nsm_tests::vl3::{start_vl3, Vl3Mesh, Vl3Options};
use nsm_tests::vl3_bench::{self, Sizes};
use nsm_tests::{poll, Proc, TempDir};
use serde_json::Value;

/// How long a process may take to get ready, or a step to happen.
const READY: Duration = Duration::from_secs(20);
/// How long the clients of a dead vL3 endpoint may take to ping again.
const HEAL_WITHIN: Duration = Duration::from_secs(2);
/// The token lifetime of the links between vL3 endpoints.
const LINK_TOKEN: &str = "6s";
const POLL: Duration = Duration::from_millis(50);
const NODES: usize = 3;
const CLIENTS_PER_NODE: usize = 2;
/// The TTL of the vL3 names: how long the other endpoint may answer a closed client.
const DNS_TTL: Duration = Duration::from_secs(2);

/// The links of a namespace other than `lo` and the underlay.
fn links(ns: &Pod) -> Vec<String> {
    ns.links()
        .into_iter()
        .filter(|l| l != "lo" && l != "ul0")
        .collect()
}

/// The addresses (without length) of `field` in a connection nsc printed.
fn addrs(conn: &Value, field: &str) -> Vec<String> {
    conn["context"]["ipContext"][field]
        .as_array()
        .unwrap_or_else(|| panic!("no {field} in {conn}"))
        .iter()
        .map(|a| {
            a.as_str()
                .unwrap_or_default()
                .split('/')
                .next()
                .unwrap_or_default()
                .to_string()
        })
        .collect()
}

/// A client: its name, its pod, its process, the endpoint it is on and its addresses
/// (v4, v6).
struct Client {
    name: String,
    pod: Pod,
    nsc: Proc,
    endpoint: String,
    addrs: Vec<String>,
}

impl Client {
    fn take(&mut self, conn: &Value) {
        self.endpoint = conn["networkServiceEndpointName"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        self.addrs = addrs(conn, "srcIpAddrs");
        assert_eq!(self.addrs.len(), 2, "one v4 and one v6 address: {conn}");
    }

    fn next_connection(&mut self, within: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        let until = Instant::now() + within;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            let line = self.nsc.stdout_within(left).unwrap_or_else(|e| {
                panic!("{}: no connection within {within:?}: {e}", self.nsc.name())
            });
            let conn: Value =
                serde_json::from_str(&line).unwrap_or_else(|e| panic!("no JSON ({e}): {line}"));
            if pred(&conn) {
                return conn;
            }
        }
    }
}

/// One echo request from `pod` to `to`, waiting at most 300 ms.
fn ping(pod: &Pod, to: &str) -> bool {
    std::process::Command::new("ip")
        .args(["netns", "exec", &pod.name, "ping", "-c1", "-W0.3", to])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Waits until every ordered pair of clients pinged, both families (each pair until
/// it answers once); fails with the pairs that never did.
fn all_ping(clients: &[Client], within: Duration, what: &str) {
    let until = Instant::now() + within;
    let mut pending: Vec<(usize, String)> = Vec::new();
    for i in 0..clients.len() {
        for (j, b) in clients.iter().enumerate() {
            if i != j {
                pending.extend(b.addrs.iter().map(|to| (i, to.clone())));
            }
        }
    }
    loop {
        pending.retain(|(i, to)| !ping(&clients[*i].pod, to));
        if pending.is_empty() {
            return;
        }
        if Instant::now() >= until {
            let bad: Vec<String> = pending
                .iter()
                .map(|(i, to)| {
                    format!(
                        "{} ({}) -> {to}",
                        clients[*i].pod.name, clients[*i].endpoint
                    )
                })
                .collect();
            panic!("{what}: not within {within:?}: {bad:#?}");
        }
        std::thread::sleep(POLL);
    }
}

/// Waits until every client resolves every other's name, both families, to the
/// address the pings use; fails with the lookups that never did.
fn all_resolve(clients: &[Client], within: Duration, what: &str) {
    let until = Instant::now() + within;
    let mut pending: Vec<(usize, usize, &str)> = Vec::new();
    for i in 0..clients.len() {
        for j in (0..clients.len()).filter(|j| *j != i) {
            // The short name through the search domain: AAAA first (`hosts`).
            pending.push((i, j, "hosts"));
            pending.push((i, j, "ahostsv4"));
        }
    }
    let lookup = |i: usize, j: usize, db: &str| {
        let (name, want) = match db {
            "hosts" => (clients[j].name.clone(), &clients[j].addrs[1]),
            _ => (format!("{}.vl3", clients[j].name), &clients[j].addrs[0]),
        };
        let got = clients[i].pod.getent(db, &name);
        (
            got.as_deref() == Some(std::slice::from_ref(want)),
            name,
            got,
        )
    };
    loop {
        pending.retain(|(i, j, db)| !lookup(*i, *j, db).0);
        if pending.is_empty() {
            return;
        }
        if Instant::now() >= until {
            let bad: Vec<String> = pending
                .iter()
                .map(|(i, j, db)| {
                    let (_, name, got) = lookup(*i, *j, db);
                    format!(
                        "{} ({}): getent {db} {name} = {got:?}, want {:?} ({})",
                        clients[*i].name,
                        clients[*i].endpoint,
                        clients[*j].addrs,
                        clients[*j].endpoint
                    )
                })
                .collect();
            panic!("{what}: not within {within:?}: {bad:#?}");
        }
        std::thread::sleep(POLL);
    }
}

/// The prefixes routed in a namespace, as `ip route` prints them (v4 and v6).
fn routes(ns: &Pod) -> Vec<String> {
    let mut out = Vec::new();
    for family in ["-4", "-6"] {
        out.extend(
            ns.ip(&[family, "route", "show"])
                .lines()
                .map(|l| l.split_whitespace().next().unwrap_or_default().to_string()),
        );
    }
    out
}

#[test]
fn a_kernel_vl3_on_three_nodes_pings_every_pair_heals_and_leaves_nothing() {
    nsm_testkit::require_root!("kernel vL3 process test");
    let (_switch, nodes) = switched_underlay(NODES);
    let dir = TempDir::new("nsm-vl3", "mesh");
    let mut mesh = Vl3Mesh::start(
        &dir,
        &nodes,
        Vl3Options {
            endpoints: 2,
            link_token: LINK_TOKEN,
            dns_ttl: "2s",
            ready: READY,
            ..Vl3Options::default()
        },
    );

    let started = Instant::now();
    let mut clients = Vec::new();
    for (i, url) in mesh.nsmgr_urls.iter().enumerate() {
        for c in 0..CLIENTS_PER_NODE {
            let pod = Pod::new();
            let name = format!("nsc-{i}-{c}");
            let nsc = start_vl3(
                &dir,
                Some(&pod),
                "nsc",
                &name,
                &[
                    ("NSM_NAME", &name),
                    ("NSM_CONNECT_TO", url),
                    (
                        "NSM_NETWORK_SERVICES",
                        &format!("kernel://vl3/nsm-1?podName={name}"),
                    ),
                    ("NSM_REQUEST_TIMEOUT", "15s"),
                    ("NSM_DNS_NETNS", &pod.name),
                ],
                true,
                READY,
            );
            clients.push(Client {
                name,
                pod,
                nsc,
                endpoint: String::new(),
                addrs: Vec::new(),
            });
        }
    }
    for c in &mut clients {
        let conn = c.next_connection(READY, |_| true);
        c.take(&conn);
    }
    eprintln!(
        "{} clients connected in {:?}",
        clients.len(),
        started.elapsed()
    );
    let per_endpoint: BTreeMap<&str, usize> = clients.iter().fold(BTreeMap::new(), |mut m, c| {
        *m.entry(c.endpoint.as_str()).or_default() += 1;
        m
    });
    eprintln!("clients per vL3 endpoint: {per_endpoint:?}");
    let all: Vec<&String> = clients.iter().flat_map(|c| &c.addrs).collect();
    for (i, a) in all.iter().enumerate() {
        assert!(!all[..i].contains(a), "{a} handed out twice");
    }
    let pinging = Instant::now();
    all_ping(&clients, READY, "every pair pings");
    eprintln!(
        "every pair pinged {:?} after the connections",
        pinging.elapsed()
    );
    eprintln!(
        "all {} ordered pairs ping, v4 and v6",
        clients.len() * (clients.len() - 1)
    );

    // DNS: every pod resolves every other client, v4 and v6.
    let resolving = Instant::now();
    all_resolve(&clients, Duration::from_secs(5), "every name resolves");
    eprintln!(
        "every pod resolved the {} others' names (A and AAAA) in {:?}",
        clients.len() - 1,
        resolving.elapsed()
    );
    // A client closes: its name goes (from the other endpoint's cache within the
    // TTL), and so does its pod's resolv.conf.
    let mut leaving = clients.pop().expect("six clients");
    let resolv_conf = format!("/etc/netns/{}/resolv.conf", leaving.pod.name);
    assert!(std::path::Path::new(&resolv_conf).exists(), "{resolv_conf}");
    leaving.nsc.terminate();
    assert!(
        !std::path::Path::new(&resolv_conf).exists(),
        "{resolv_conf} left after Close"
    );
    let name = format!("{}.vl3", leaving.name);
    poll(
        DNS_TTL + Duration::from_secs(3),
        &format!("{name} stops resolving everywhere"),
        || {
            clients
                .iter()
                .all(|c| c.pod.getent("ahostsv4", &name).is_none())
                .then_some(())
        },
    );
    eprintln!("{name} ({}) closed: no pod resolves it", leaving.endpoint);
    all_resolve(&clients, Duration::from_secs(5), "the others still resolve");
    let per_endpoint: BTreeMap<&str, usize> = clients.iter().fold(BTreeMap::new(), |mut m, c| {
        *m.entry(c.endpoint.as_str()).or_default() += 1;
        m
    });

    // Kill the vL3 endpoint with the most clients; they come back on the other one.
    let victim = if per_endpoint.get("vl3-0").copied().unwrap_or(0)
        >= per_endpoint.get("vl3-1").copied().unwrap_or(0)
    {
        0
    } else {
        1
    };
    let (dead, alive) = (format!("vl3-{victim}"), format!("vl3-{}", 1 - victim));
    let killed = Instant::now();
    mesh.endpoints[victim].kill9();
    for c in clients.iter_mut().filter(|c| c.endpoint == dead) {
        let alive = alive.clone();
        let conn = c.next_connection(HEAL_WITHIN + Duration::from_secs(3), move |v| {
            v["networkServiceEndpointName"] == alive.as_str()
        });
        c.take(&conn);
    }
    all_ping(&clients, HEAL_WITHIN, "every pair pings after the heal");
    eprintln!("heal time (vL3 endpoint killed): {:?}", killed.elapsed());
    assert!(clients.iter().all(|c| c.endpoint == alive));
    // The names follow the new addresses; no resolv.conf names the dead endpoint.
    all_resolve(
        &clients,
        Duration::from_secs(5),
        "every name resolves after the heal",
    );
    // The survivor's link to the dead endpoint goes when its token runs out.
    let survivor = &mesh.endpoint_pods[1 - victim];
    poll(
        Duration::from_secs(20),
        "the link to the dead vL3 endpoint is gone",
        || (links(survivor).len() == clients.len()).then_some(()),
    );
    let dead_routes: Vec<String> = routes(survivor)
        .into_iter()
        .filter(|r| r.ends_with("/24") || r.ends_with("/120"))
        .collect();
    assert!(
        dead_routes.is_empty(),
        "routes to other prefixes left: {dead_routes:?}"
    );

    // Everything stops: nothing is left anywhere.
    for c in &mut clients {
        c.nsc.terminate();
    }
    for c in &clients {
        poll(READY, &format!("{} empty", c.pod.name), || {
            links(&c.pod).is_empty().then_some(())
        });
    }
    mesh.endpoints[1 - victim].terminate();
    for pod in &mesh.endpoint_pods {
        poll(
            Duration::from_secs(20),
            &format!("{} empty", pod.name),
            || links(pod).is_empty().then_some(()),
        );
    }
    mesh.stop();
    for node in &nodes {
        assert!(links(node).is_empty(), "left on a node: {:?}", node.links());
    }
}

/// The vL3 bench (`benches/vl3.rs`) at a tiny size: every client joins with its
/// interface, address and route (checked by the run), the probes ping each other
/// through the two routers and by hand, iperf3 moves data both ways, every pod is
/// clean after Close. No timing is asserted. Skips without iperf3.
#[test]
fn the_vl3_bench_runs_at_a_tiny_size() {
    nsm_testkit::require_root!("kernel vL3 bench test");
    if !nsm_testkit::lab::run("iperf3", &["--version"]).0 {
        eprintln!("skipped: iperf3 is not installed (apt-get install -y iperf3)");
        return;
    }
    let rt = nsm_testkit::bench::runtime("multi_thread_2").expect("a runtime");
    let sizes = Sizes {
        clients: 3,
        concurrency: 3,
        pings: 10,
        seconds: 1,
        runs: 1,
    };
    let report = vl3_bench::run(&rt, sizes).unwrap_or_else(|e| panic!("the bench: {e}"));
    assert_eq!(report.joins_one_at_a_time.len(), 3);
    assert_eq!(report.joins_concurrently.len(), 3);
    assert_eq!(report.per_endpoint.iter().sum::<usize>(), 6);
    assert_eq!([report.rtt[0].n, report.rtt[1].n], [10, 10]);
    assert!(report.throughput_ratio > 0.0, "{report:?}");
    assert_eq!(report.closes.len(), 8, "6 clients and the 2 probes");
}
