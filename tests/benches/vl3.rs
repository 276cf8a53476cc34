//! The kernel vL3 as processes (issue 18's Performance section): joins, ping RTT and TCP
//! throughput between clients on two nodes through the vL3 routers, against two pods
//! joined by a VXLAN link made by hand over the same underlay (the floor).
//!
//! The mesh is `nsm_tests::vl3::Vl3Mesh` (the one `tests/vl3_kernel.rs` checks): two
//! nodes on one bridge (`switched_underlay`, MTU 1500), each with its `nsmgr` and
//! `nsm-forwarder` (VXLAN between the nodes), the registry and `nsm-vl3-ipam` in the
//! host namespace, `nse-vl3` `vl3-0` in a pod of node 0 and `vl3-1` in a pod of node 1,
//! linked to each other; every program with its identity (mTLS, signed tokens, the
//! default policies). This bench is the clients: client chains over the nodes'
//! managers (identity `spiffe://nsm.test/vl3-bench`), each client's interface `nsm-1`
//! made in a pod of its own (`kernel_client`).
//!
//! It prints on stderr:
//!
//! * `probe`: two clients pinned to an endpoint each (`network_service_endpoint_name`):
//!   A through node 0's manager to `vl3-0`, B through node 1's to `vl3-1`; a packet
//!   from A to B crosses A's veth, router `vl3-0`, the VXLAN link between the routers,
//!   router `vl3-1` and B's veth.
//! * `join one at a time` / `join concurrently`: `NSM_BENCH_CLIENTS` (100) clients
//!   joining the running network one after the other, then as many again with
//!   `NSM_BENCH_CONCURRENCY` (10) Requests in flight, alternately through each node's
//!   manager, the endpoint left to the managers: each Request timed until it returns
//!   (the forwarders program the pod before answering: every client's interface is
//!   then checked, untimed, to be up with its addresses and the route to the vL3
//!   network; a client without them stops the bench).
//! * `rtt`: `NSM_BENCH_PINGS` (200) pings from A to B (`ping -i 0.01`, per-packet
//!   RTT), p50 / p99, then the same between pods A' (node 0) and B' (node 1) joined by
//!   hand: on each node `ip link add vx mtu 1450 type vxlan id 4242 local <own> remote
//!   <peer> dstport 4789`, moved into its pod, then the same addresses as A and B and a
//!   route to the other (`address_by_hand`); the ratios of p50 and p99.
//! * `throughput`: `iperf3 -c B -t NSM_BENCH_SECONDS (5) -P 1` from A against
//!   `iperf3 -s -1` in B, alternating with A' to B', `NSM_BENCH_RUNS` (3) runs each:
//!   the ratio against the target (vL3 >= 90 % of by hand).
//! * `close`: every client's Close, then each pod has only `lo` left.
//!
//! Every namespace is deleted and every program killed when the bench ends, failed or
//! not (the harness's guards). Needs root, `ip`, `ping` and `iperf3`; without them it
//! prints a skip line.
//!
//! The programs are the example binaries next to this bench's executable: build them
//! with the same profile first. Release (the numbers of BENCHMARKS.md):
//!
//! ```text
//! cargo build --release -p nsm-examples --bins
//! cargo bench -p nsm-tests --bench vl3
//! ```
//!
//! Dev profile, small (a check that it runs):
//!
//! ```text
//! cargo build -p nsm-examples --bins
//! NSM_BENCH_CLIENTS=10 NSM_BENCH_SECONDS=1 NSM_BENCH_RUNS=1 \
//!   cargo bench --profile dev -p nsm-tests --bench vl3
//! ```

use std::time::{Duration, Instant};

use futures::stream::{self, StreamExt};
use nsm_proto::connection::Connection;
use nsm_sdk::chains::{client, ClientOptions, Security};
use nsm_sdk::security::PolicySet;
use nsm_sdk::transport::{Channels, Url};
use nsm_sdk::Chain;
use nsm_sdk_kernel::kernel_client;
use nsm_testkit::bench::{
    address_by_hand, addrs, cx, ip_of, loadavg, ms, ping_rtts, throughput_against, throughput_main,
    Res, Side, Stats,
};
use nsm_testkit::{switched_underlay, underlay_addr, Ns};
use nsm_tests::vl3::{Vl3Mesh, Vl3Options, SERVICE};
use nsm_tests::TempDir;

/// How long a program may take to get ready.
const READY: Duration = Duration::from_secs(30);
/// The interface of every client.
const IFNAME: &str = "nsm-1";
/// The IPv4 vL3 network (`nsm_tests::vl3::NETWORKS`), routed in every client's pod.
const NETWORK_V4: &str = "172.16.0.0/16";
/// The MTU of the hand-made VXLAN: the underlay's 1500 minus VXLAN's 50, what the
/// forwarders give their VXLAN devices.
const HAND_MTU: &str = "1450";
/// The VNI of the hand-made VXLAN (the forwarders' allocator moves on if it clashes).
const HAND_VNI: &str = "4242";
/// The throughput target: vL3 >= 90 % of by hand.
const TARGET: f64 = 0.90;

fn setting(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A client of the vL3: its pod, its chain, its connection once joined.
struct Client {
    pod: Ns,
    chain: Chain,
    conn: Option<Connection>,
}

impl Client {
    /// A client `name` of the manager at `nsmgr`, its interface in a new pod.
    fn new(name: &str, nsmgr: &str, security: &Security, channels: &Channels) -> Res<Client> {
        let url: Url = nsmgr.parse()?;
        let pod = Ns::new();
        let chain = client(
            ClientOptions::new(name, url)
                .security(security)
                .channels(channels.clone())
                .retry(None)
                .mechanisms(Vec::new())
                .handler(kernel_client(pod.url()).ifname(IFNAME)),
        );
        Ok(Client {
            pod,
            chain,
            conn: None,
        })
    }

    /// Requests the vL3 (from `endpoint` when given); the time the Request took.
    async fn join(&mut self, endpoint: Option<&str>) -> Res<Duration> {
        let mut req = nsm_testkit::request(SERVICE);
        if let (Some(c), Some(e)) = (req.connection.as_mut(), endpoint) {
            c.network_service_endpoint_name = e.to_string();
        }
        let t = Instant::now();
        let conn = self.chain.request(&mut cx(), req).await?;
        let took = t.elapsed();
        self.conn = Some(conn);
        Ok(took)
    }

    /// Checks that the pod has the interface up, with the connection's addresses and a
    /// route to the vL3 network through it.
    fn check(&self) -> Res<()> {
        let conn = self.conn.as_ref().ok_or("not joined")?;
        let (own, _) = addrs(conn)?;
        let link = self.pod.link(IFNAME);
        let up = link["flags"]
            .as_array()
            .is_some_and(|f| f.iter().any(|f| f == "UP"));
        let addresses = self.pod.addresses(IFNAME);
        let route = self.pod.ip(&["route", "show", NETWORK_V4, "dev", IFNAME]);
        if !up || !addresses.contains(&own) || route.trim().is_empty() {
            return Err(format!(
                "{}: {IFNAME} up {up}, addresses {addresses:?} (want {own}), route to \
                 {NETWORK_V4}: {route:?}",
                self.pod.name
            )
            .into());
        }
        Ok(())
    }

    /// The endpoint it joined through.
    fn endpoint(&self) -> &str {
        self.conn
            .as_ref()
            .map_or("", |c| c.network_service_endpoint_name.as_str())
    }

    /// Its IPv4 address (without length).
    fn address(&self) -> Res<String> {
        let (own, _) = addrs(self.conn.as_ref().ok_or("not joined")?)?;
        Ok(ip_of(&own).to_string())
    }
}

/// `n` clients named `<what>-<i>`, alternately of each node's manager.
fn clients(
    what: &str,
    n: usize,
    mesh: &Vl3Mesh,
    security: &Security,
    channels: &Channels,
) -> Res<Vec<Client>> {
    (0..n)
        .map(|i| {
            let url = &mesh.nsmgr_urls[i % mesh.nsmgr_urls.len()];
            Client::new(&format!("{what}-{i}"), url, security, channels)
        })
        .collect()
}

/// Prints the join statistics of `took` and how the clients spread over the endpoints.
fn report_joins(what: &str, took: &[Duration], clients: &[Client], wall: Duration) {
    let on_0 = clients.iter().filter(|c| c.endpoint() == "vl3-0").count();
    eprintln!(
        "summary join {what}: {} in {:.2} s; {}; on vl3-0 {on_0}, on vl3-1 {} (loadavg {})",
        took.len(),
        wall.as_secs_f64(),
        Stats::of(took).line(),
        clients.len() - on_0,
        loadavg()
    );
}

fn measure(rt: &tokio::runtime::Runtime) -> Res<()> {
    let n = setting("NSM_BENCH_CLIENTS", 100);
    let concurrency = setting("NSM_BENCH_CONCURRENCY", 10).max(1);
    let pings = setting("NSM_BENCH_PINGS", 200) as u32;
    let seconds = setting("NSM_BENCH_SECONDS", 5) as u32;
    let runs = setting("NSM_BENCH_RUNS", 3);

    let (_switch, nodes) = switched_underlay(2);
    let dir = TempDir::new("nsm-vl3", "bench");
    let started = Instant::now();
    // /22 and /118 per endpoint: room for 2 n clients on one endpoint.
    let mesh = Vl3Mesh::start(
        &dir,
        &nodes,
        Vl3Options {
            endpoints: 2,
            prefix_len: "22,118",
            ready: READY,
            ..Vl3Options::default()
        },
    );
    eprintln!(
        "vL3 up (2 nodes, 2 endpoints linked) in {:.2} s",
        started.elapsed().as_secs_f64()
    );
    let security = Security::with_identity(
        dir.ca().identity("vl3-bench")?.fixed(),
        PolicySet::defaults()?,
    )?;
    let channels = security.channels();

    // The probes: A on node 0 through vl3-0, B on node 1 through vl3-1.
    let mut a = Client::new("probe-a", &mesh.nsmgr_urls[0], &security, &channels)?;
    let mut b = Client::new("probe-b", &mesh.nsmgr_urls[1], &security, &channels)?;
    rt.block_on(async {
        a.join(Some("vl3-0")).await?;
        b.join(Some("vl3-1")).await?;
        Res::Ok(())
    })?;
    a.check()?;
    b.check()?;
    if (a.endpoint(), b.endpoint()) != ("vl3-0", "vl3-1") {
        return Err(format!("probes on {} and {}", a.endpoint(), b.endpoint()).into());
    }
    let (addr_a, addr_b) = (a.address()?, b.address()?);
    eprintln!(
        "probe: A {addr_a} (via vl3-0, MTU {}) -> B {addr_b} (via vl3-1, MTU {})",
        a.pod.link(IFNAME)["mtu"],
        b.pod.link(IFNAME)["mtu"]
    );
    for (pod, name) in mesh.endpoint_pods.iter().zip(["vl3-0", "vl3-1"]) {
        let links: Vec<String> = pod
            .json(&["-d", "link", "show"])
            .iter()
            .filter(|l| l["ifname"] != "lo")
            .map(|l| {
                format!(
                    "{} {} mtu {}",
                    l["ifname"].as_str().unwrap_or("?"),
                    l["linkinfo"]["info_kind"].as_str().unwrap_or("?"),
                    l["mtu"]
                )
            })
            .collect();
        eprintln!("router {name}: {links:?}");
    }
    // The first packets resolve neighbours: not timed.
    if !a.pod.ping_with(&["-W2", &addr_b]) {
        return Err("A does not reach B through the vL3".into());
    }

    // Joins: one at a time, then concurrently.
    let mut one = clients("nsc", n, &mesh, &security, &channels)?;
    let t = Instant::now();
    let mut took = Vec::new();
    for c in &mut one {
        took.push(rt.block_on(c.join(None))?);
        c.check()?;
    }
    report_joins("one at a time", &took, &one, t.elapsed());
    let mut many = clients("nsc-c", n, &mesh, &security, &channels)?;
    let t = Instant::now();
    let results: Vec<Res<Duration>> = rt.block_on(
        stream::iter(many.iter_mut())
            .map(|c| c.join(None))
            .buffer_unordered(concurrency)
            .collect(),
    );
    let wall = t.elapsed();
    let took = results.into_iter().collect::<Res<Vec<Duration>>>()?;
    for c in &many {
        c.check()?;
    }
    report_joins(
        &format!("concurrently ({concurrency} in flight)"),
        &took,
        &many,
        wall,
    );
    // One client of each endpoint reaches A: the joined ones are in the network.
    for c in [&one[0], &one[1]] {
        if !c.pod.ping_with(&["-W2", &addr_a]) {
            return Err(format!("{} ({}) does not reach A", c.pod.name, c.endpoint()).into());
        }
    }

    // The hand-made floor: A' on node 0, B' on node 1, a VXLAN between them.
    let (hand_a, hand_b) = (Ns::new(), Ns::new());
    for (i, (node, pod)) in [(&nodes[0], &hand_a), (&nodes[1], &hand_b)]
        .into_iter()
        .enumerate()
    {
        node.ip(&[
            "link",
            "add",
            IFNAME,
            "mtu",
            HAND_MTU,
            "type",
            "vxlan",
            "id",
            HAND_VNI,
            "local",
            &underlay_addr(i),
            "remote",
            &underlay_addr(1 - i),
            "dstport",
            "4789",
        ]);
        node.ip(&["link", "set", IFNAME, "netns", &pod.name]);
    }
    address_by_hand([
        (
            &hand_a,
            IFNAME,
            &format!("{addr_a}/32"),
            &format!("{addr_b}/32"),
        ),
        (
            &hand_b,
            IFNAME,
            &format!("{addr_b}/32"),
            &format!("{addr_a}/32"),
        ),
    ]);
    if !hand_a.ping_with(&["-W2", &addr_b]) {
        return Err("A' does not reach B' by hand".into());
    }

    // RTT.
    eprintln!("loadavg before the pings: {}", loadavg());
    let vl3 = Stats::of(&ping_rtts(&a.pod, &addr_b, pings, "0.01")?);
    let hand = Stats::of(&ping_rtts(&hand_a, &addr_b, pings, "0.01")?);
    eprintln!("summary rtt vL3 (A -> vl3-0 -> vl3-1 -> B): {}", vl3.line());
    eprintln!(
        "summary rtt VXLAN by hand (A' -> B'):       {}",
        hand.line()
    );
    eprintln!(
        "summary rtt ratio vL3 / by hand: p50 {:.2}, p99 {:.2}",
        ms(vl3.p50) / ms(hand.p50),
        ms(vl3.p99) / ms(hand.p99)
    );

    // Throughput.
    throughput_against(
        Side::new("vL3 (two routers)", &b.pod, &a.pod),
        Side::new("VXLAN by hand", &hand_b, &hand_a),
        &addr_b,
        runs,
        seconds,
        TARGET,
    )?;

    // Close everything; only lo is left in each client's pod.
    let mut all: Vec<&mut Client> = one.iter_mut().chain(many.iter_mut()).collect();
    all.push(&mut a);
    all.push(&mut b);
    let mut closes = Vec::new();
    for c in &mut all {
        if let Some(conn) = c.conn.take() {
            let t = Instant::now();
            rt.block_on(c.chain.close(&mut cx(), conn))?;
            closes.push(t.elapsed());
        }
    }
    eprintln!("summary close one at a time: {}", Stats::of(&closes).line());
    for c in &all {
        if c.pod.links() != ["lo"] {
            return Err(format!("{} after Close: {:?}", c.pod.name, c.pod.links()).into());
        }
    }
    mesh.stop();
    Ok(())
}

fn main() {
    throughput_main("vL3 benches", measure);
}
