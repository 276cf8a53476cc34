//! The vL3 bench (`benches/vl3.rs`, issue 18's Performance section) as a function, so
//! that a root test runs it at a tiny size: clients joining a running [`Vl3Mesh`],
//! ping RTT and iperf3 throughput between two of them on different nodes through the
//! vL3 routers, against two pods joined by a VXLAN made by hand over the same underlay.
//! The bench's doc says what each step does and prints.

use std::time::{Duration, Instant};

use crate::vl3::{Vl3Mesh, Vl3Options, SERVICE};
use crate::TempDir;
use futures::stream::{self, StreamExt};
use nsm_proto::connection::Connection;
use nsm_sdk::chains::{client, ClientOptions, Security};
use nsm_sdk::security::PolicySet;
use nsm_sdk::transport::{Channels, Url};
use nsm_sdk::Chain;
use nsm_sdk_kernel::kernel_client;
use nsm_testkit::bench::{
    address_by_hand, addrs, cx, ip_of, loadavg, ms, ping_rtts, throughput_against, Res, Side, Stats,
};
use nsm_testkit::{switched_underlay, underlay_addr, Ns};

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

/// A client of the vL3: its pod, its chain, its connection once joined.
pub struct Client {
    /// The pod its interface is made in.
    pub pod: Ns,
    chain: Chain,
    conn: Option<Connection>,
}

impl Client {
    /// A client `name` of the manager at `nsmgr`, its interface in a new pod.
    pub fn new(name: &str, nsmgr: &str, security: &Security, channels: &Channels) -> Res<Client> {
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
    pub async fn join(&mut self, endpoint: Option<&str>) -> Res<Duration> {
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
    pub fn check(&self) -> Res<()> {
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
    pub fn endpoint(&self) -> &str {
        self.conn
            .as_ref()
            .map_or("", |c| c.network_service_endpoint_name.as_str())
    }

    /// Its IPv4 address (without length).
    pub fn address(&self) -> Res<String> {
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

/// The sizes of a run.
#[derive(Debug, Clone, Copy)]
pub struct Sizes {
    /// How many clients join one at a time, and then how many concurrently.
    pub clients: usize,
    /// How many of the concurrent joins are in flight at once.
    pub concurrency: usize,
    /// How many pings each way of measuring the RTT.
    pub pings: u32,
    /// How long each iperf3 run.
    pub seconds: u32,
    /// How many iperf3 runs of each side.
    pub runs: usize,
}

impl Sizes {
    /// The bench's: `NSM_BENCH_CLIENTS` (100), `NSM_BENCH_CONCURRENCY` (10),
    /// `NSM_BENCH_PINGS` (200), `NSM_BENCH_SECONDS` (5), `NSM_BENCH_RUNS` (3).
    pub fn from_env() -> Sizes {
        let setting = |name: &str, default: usize| {
            std::env::var(name)
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(default)
        };
        Sizes {
            clients: setting("NSM_BENCH_CLIENTS", 100),
            concurrency: setting("NSM_BENCH_CONCURRENCY", 10).max(1),
            pings: setting("NSM_BENCH_PINGS", 200) as u32,
            seconds: setting("NSM_BENCH_SECONDS", 5) as u32,
            runs: setting("NSM_BENCH_RUNS", 3),
        }
    }
}

/// What a run measured.
#[derive(Debug, Clone)]
pub struct Report {
    /// How long each join one at a time took.
    pub joins_one_at_a_time: Vec<Duration>,
    /// How long each concurrent join took.
    pub joins_concurrently: Vec<Duration>,
    /// How many joined clients were on `vl3-0` and on `vl3-1`.
    pub per_endpoint: [usize; 2],
    /// The RTT through the vL3 routers and by hand.
    pub rtt: [Stats; 2],
    /// The throughput ratio vL3 / by hand (ratio of means).
    pub throughput_ratio: f64,
    /// How long each Close took.
    pub closes: Vec<Duration>,
}

/// Runs the whole bench (see the bench's doc, `benches/vl3.rs`) at `sizes` on `rt`,
/// printing each result on stderr; every namespace and program is gone when it
/// returns, failed or not.
///
/// # Errors
/// When a step fails: a Request, a client without its interface, a ping or an iperf3
/// run that does not cross, a pod not clean after Close.
///
/// # Panics
/// When a program does not start, or a namespace cannot be made.
pub fn run(rt: &tokio::runtime::Runtime, sizes: Sizes) -> Res<Report> {
    let Sizes {
        clients: n,
        concurrency,
        pings,
        seconds,
        runs,
    } = sizes;

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
    let joins_one_at_a_time = took;
    let mut many = clients("nsc-c", n, &mesh, &security, &channels)?;
    let t = Instant::now();
    let results: Vec<Res<Duration>> = rt.block_on(
        stream::iter(many.iter_mut())
            .map(|c| c.join(None))
            .buffer_unordered(concurrency)
            .collect(),
    );
    let wall = t.elapsed();
    let joins_concurrently = results.into_iter().collect::<Res<Vec<Duration>>>()?;
    let took = &joins_concurrently;
    for c in &many {
        c.check()?;
    }
    report_joins(
        &format!("concurrently ({concurrency} in flight)"),
        took,
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
    let throughput_ratio = throughput_against(
        Side::new("vL3 (two routers)", &b.pod, &a.pod),
        Side::new("VXLAN by hand", &hand_b, &hand_a),
        &addr_b,
        runs,
        seconds,
        TARGET,
    )?;

    let on_0 = one
        .iter()
        .chain(&many)
        .filter(|c| c.endpoint() == "vl3-0")
        .count();

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
    Ok(Report {
        joins_one_at_a_time,
        joins_concurrently,
        per_endpoint: [on_0, 2 * n - on_0],
        rtt: [vl3, hand],
        throughput_ratio,
        closes,
    })
}
