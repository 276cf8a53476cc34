//! Kernel2Kernel Request and Close latency through the whole mesh, against its floors.
//!
//! The mesh is the one of `tests/mesh.rs`, all in this process over unix sockets: a
//! registry, a manager, a forwarder with the KERNEL mechanism, an endpoint
//! (`point_to_point` IPAM + `kernel_endpoint`) in pod `nse`, and a client chain with
//! `kernel_client(nsc).ifname("nsm-1")`, no retry. Pods are namespaces made by the
//! bench (`nsmt-<pid>-<n>`, deleted by a guard even on failure). Each sample is a
//! fresh connection: its Request creates the veth pair (each end born in its pod,
//! addresses, routes, aliases) and its Close deletes it.
//!
//! Measured in the same run, interleaved in blocks of 20 so that a change in the
//! machine's load hits all three alike (20 warm-up samples each first, then 10 blocks):
//!
//! - `mesh`: Request alone and Close alone of the KERNEL mesh (200 samples);
//! - `floor a`: the same netlink work without the mesh — `kernel_side_up` with the same
//!   plans (the connection context the mesh's IPAM gives, same names and aliases) and
//!   `down` (200 samples);
//! - `floor b`: the gRPC hops alone — the same mesh with the NOOP mechanism (200
//!   samples).
//!
//! The ratio is mesh / (floor a + floor b) on p50 and on p99, for Request (up) and for
//! Close (down). Target: mesh Request p50 <= 5 ms, ratio <= 3.
//!
//! Then, to show where the mesh's time beyond the floor goes, a second KERNEL mesh
//! with two timing handlers around `kernel_forwarder_client` in the forwarder's client
//! chain (100 samples): the pair's creation/deletion as the forwarder does it, and the
//! endpoint call. Also timed on their own: what the forwarder does per Request besides
//! `kernel_side_up` (`allow_ping` in both pods, opening both namespaces). Last, floor (a)
//! taken apart (100 samples): `veth_up` and `down` with netlink handles that time each
//! call, so the p50 of every kernel operation per connection is printed.
//!
//! Both runtimes: `multi_thread_2` (two workers) and `current_thread`, the whole mesh
//! on one runtime. `NSM_BENCH_FILTER=current` runs only the names containing it.
//!
//! Run (root): `cargo bench -p nsm-sdk-kernel --bench k2k_latency`

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{request, Kind, Mesh, CLIENT_IF};
use ipnet::IpNet;
use nsm_sdk::async_trait;
use nsm_sdk::proto::connection::Connection;
use nsm_sdk::proto::connectioncontext::ConnectionContext;
use nsm_sdk::wire::{params, types};
use nsm_sdk_kernel::liveness::allow_ping;
use nsm_sdk_kernel::{
    down, kernel_side_up, plan_from_context, veth_alias, veth_up, IfName, Link, Mtu, Neighbour,
    NetNs, Netlink, PodSide, Route, RtNetlink, Rule, VethEnd,
};
use nsm_testkit::bench::{
    addrs, cpu_time, cx, ip_of, loadavg, machine, ms, runtime, Res, Stats, Timer,
};
use nsm_testkit::{names as path_names, Ns};
use tokio::runtime::Runtime;

const WARMUP: usize = 20;
const BLOCKS: usize = 10;
const BLOCK: usize = 20;
const BREAKDOWN: usize = 100;
const ANATOMY: usize = 100;

/// Request and Close samples of one thing measured, and its CPU time.
#[derive(Default)]
struct Samples {
    up: Vec<Duration>,
    down: Vec<Duration>,
    cpu: Duration,
}

/// One Request + Close of a fresh connection through `mesh`.
async fn mesh_once(mesh: &Mesh, s: Option<&mut Samples>) -> Res<Connection> {
    let t = Instant::now();
    let conn = mesh.client.request(&mut cx(), request()).await?;
    let up = t.elapsed();
    let t = Instant::now();
    mesh.client.close(&mut cx(), conn.clone()).await?;
    let dn = t.elapsed();
    if let Some(s) = s {
        s.up.push(up);
        s.down.push(dn);
    }
    Ok(conn)
}

/// What floor (a) works with: both pods opened once, the context the mesh gave.
struct Direct {
    nsc: NetNs,
    nse: NetNs,
    ctx: ConnectionContext,
    nse_if: String,
    key: String,
}

impl Direct {
    /// `kernel_side_up` with the plans the forwarder makes, then `down`.
    async fn once(&self, s: Option<&mut Samples>) -> Res<()> {
        let client = plan_from_context(&self.ctx, PodSide::Client, CLIENT_IF)?
            .with_alias(veth_alias(PodSide::Client, &self.key));
        let endpoint = plan_from_context(&self.ctx, PodSide::Endpoint, &self.nse_if)?
            .with_alias(veth_alias(PodSide::Endpoint, &self.key));
        let t = Instant::now();
        let created = kernel_side_up(&self.nsc, &self.nse, client, endpoint).await?;
        let up = t.elapsed();
        let t = Instant::now();
        down(created).await?;
        let dn = t.elapsed();
        if let Some(s) = s {
            s.up.push(up);
            s.down.push(dn);
        }
        Ok(())
    }
}

/// Adds the CPU time since `since` to `s`.
fn add_cpu(s: &mut Samples, since: Option<Duration>) {
    if let (Some(a), Some(b)) = (since, cpu_time()) {
        s.cpu += b.saturating_sub(a);
    }
}

fn report(name: &str, what: &str, s: &Samples) {
    let n = s.up.len().max(1) as u32;
    eprintln!(
        "summary {name}: {what}: Request {}",
        Stats::of(&s.up).line()
    );
    eprintln!(
        "summary {name}: {what}: Close   {}",
        Stats::of(&s.down).line()
    );
    eprintln!(
        "summary {name}: {what}: process CPU per Request+Close {:.3} ms",
        ms(s.cpu / n)
    );
}

fn ratio_line(name: &str, op: &str, mesh: &[Duration], a: &[Duration], b: &[Duration]) {
    let (m, a, b) = (Stats::of(mesh), Stats::of(a), Stats::of(b));
    let r50 = ms(m.p50) / (ms(a.p50) + ms(b.p50));
    let r99 = ms(m.p99) / (ms(a.p99) + ms(b.p99));
    eprintln!(
        "summary {name}: {op}: mesh p50 {:.3} ms vs floor {:.3} + {:.3} = {:.3} ms -> ratio {r50:.2}; \
         p99 {:.3} ms vs {:.3} + {:.3} = {:.3} ms -> ratio {r99:.2}",
        ms(m.p50),
        ms(a.p50),
        ms(b.p50),
        ms(a.p50) + ms(b.p50),
        ms(m.p99),
        ms(a.p99),
        ms(b.p99),
        ms(a.p99) + ms(b.p99),
    );
}

/// Checks the pods hold only `lo`.
fn clean(pods: &[&Ns]) -> Res<()> {
    for ns in pods {
        let links = ns.links();
        if links != ["lo"] {
            return Err(format!("{} is not clean: {links:?}", ns.name).into());
        }
    }
    Ok(())
}

async fn measure(name: &str, nsc: &Ns, nse: &Ns) -> Res<()> {
    let kernel = Mesh::start(Kind::Kernel {
        nsc,
        nse,
        timers: None,
    })
    .await?;
    let noop = Mesh::start(Kind::Noop).await?;

    // Check: one KERNEL connection works (path, mechanism, a ping) and Close cleans up.
    let conn = kernel.client.request(&mut cx(), request()).await?;
    let path = path_names(&conn);
    let m = conn.mechanism.clone().unwrap_or_default();
    let nse_if = nse.mesh_link();
    let (client_addr, endpoint_addr) = addrs(&conn)?;
    let pinged = nsc.ping_with(&[ip_of(&endpoint_addr)]);
    eprintln!(
        "check {name}: path {path:?}, mechanism {} name {:?}, client {client_addr} endpoint {endpoint_addr} \
         on {nse_if}, MTU {}, ping {pinged}",
        m.r#type,
        m.parameters.get(params::NAME),
        conn.context.as_ref().map_or(0, |c| c.mtu),
    );
    if path != ["nsc", "nsmgr-0", "forwarder-0-0", "nse"] || m.r#type != types::KERNEL || !pinged {
        return Err(format!("{name}: the KERNEL connection does not work: {conn:?}").into());
    }
    kernel.client.close(&mut cx(), conn.clone()).await?;
    clean(&[nsc, nse])?;
    let noop_conn = noop.client.request(&mut cx(), request()).await?;
    noop.client.close(&mut cx(), noop_conn.clone()).await?;
    eprintln!(
        "check {name}: NOOP path {:?}, mechanism {:?}",
        path_names(&noop_conn),
        noop_conn.mechanism.as_ref().map(|m| m.r#type.as_str())
    );

    let direct = Direct {
        nsc: NetNs::from_url(&nsc.url())?,
        nse: NetNs::from_url(&nse.url())?,
        ctx: conn.context.clone().unwrap_or_default(),
        nse_if,
        key: conn
            .path
            .as_ref()
            .and_then(|p| p.path_segments.first())
            .map(|s| s.id.clone())
            .unwrap_or_default(),
    };

    for _ in 0..WARMUP {
        mesh_once(&kernel, None).await?;
        direct.once(None).await?;
        mesh_once(&noop, None).await?;
    }
    clean(&[nsc, nse])?;
    eprintln!("summary {name}: loadavg before: {}", loadavg());
    let (mut k, mut a, mut b) = (Samples::default(), Samples::default(), Samples::default());
    for _ in 0..BLOCKS {
        // The pair exists between Request and Close (checked once per block, untimed).
        let conn = kernel.client.request(&mut cx(), request()).await?;
        let links = nsc.links();
        kernel.client.close(&mut cx(), conn).await?;
        if links != ["lo", CLIENT_IF] {
            return Err(format!("{name}: client pod during a connection: {links:?}").into());
        }
        let c0 = cpu_time();
        for _ in 0..BLOCK {
            mesh_once(&kernel, Some(&mut k)).await?;
        }
        add_cpu(&mut k, c0);
        let c0 = cpu_time();
        for _ in 0..BLOCK {
            direct.once(Some(&mut a)).await?;
        }
        add_cpu(&mut a, c0);
        let c0 = cpu_time();
        for _ in 0..BLOCK {
            mesh_once(&noop, Some(&mut b)).await?;
        }
        add_cpu(&mut b, c0);
    }
    eprintln!("summary {name}: loadavg after: {}", loadavg());
    clean(&[nsc, nse])?;
    report(name, "mesh KERNEL", &k);
    report(name, "floor a: kernel_side_up/down", &a);
    report(name, "floor b: mesh NOOP", &b);
    ratio_line(name, "Request", &k.up, &a.up, &b.up);
    ratio_line(name, "Close", &k.down, &a.down, &b.down);
    let p50 = Stats::of(&k.up).p50;
    let r = ms(p50) / (ms(Stats::of(&a.up).p50) + ms(Stats::of(&b.up).p50));
    eprintln!(
        "summary {name}: targets: mesh Request p50 {:.3} ms <= 5 ms: {}; ratio {r:.2} <= 3: {}",
        ms(p50),
        if p50 <= Duration::from_millis(5) {
            "met"
        } else {
            "NOT met"
        },
        if r <= 3.0 { "met" } else { "NOT met" },
    );

    // What the forwarder does per Request besides kernel_side_up.
    let (mut ping_range, mut open) = (Vec::new(), Vec::new());
    for i in 0..(WARMUP + 200) {
        let t = Instant::now();
        allow_ping(&direct.nsc).await?;
        allow_ping(&direct.nse).await?;
        let d = t.elapsed();
        let t = Instant::now();
        let _c = NetNs::from_url(&nsc.url())?;
        let _e = NetNs::from_url(&nse.url())?;
        let o = t.elapsed();
        if i >= WARMUP {
            ping_range.push(d);
            open.push(o);
        }
    }
    eprintln!(
        "summary {name}: extra: allow_ping in both pods: {}",
        Stats::of(&ping_range).line()
    );
    eprintln!(
        "summary {name}: extra: NetNs::from_url of both pods: {}",
        Stats::of(&open).line()
    );
    drop(kernel);
    drop(noop);

    // Where the mesh's time goes: timers around the forwarder's KERNEL client handler.
    let (total, nse_call) = (Timer::default(), Timer::default());
    let timed = Mesh::start(Kind::Kernel {
        nsc,
        nse,
        timers: Some((total.clone(), nse_call.clone())),
    })
    .await?;
    for _ in 0..WARMUP {
        mesh_once(&timed, None).await?;
    }
    total.take();
    nse_call.take();
    let mut s = Samples::default();
    for _ in 0..BREAKDOWN {
        mesh_once(&timed, Some(&mut s)).await?;
    }
    let (t_up, t_down) = total.take();
    let (n_up, n_down) = nse_call.take();
    let pair = |t: &[Duration], n: &[Duration]| -> Vec<Duration> {
        t.iter().zip(n).map(|(t, n)| t.saturating_sub(*n)).collect()
    };
    let rest = |c: &[Duration], t: &[Duration]| -> Vec<Duration> {
        c.iter().zip(t).map(|(c, t)| c.saturating_sub(*t)).collect()
    };
    let (pair_up, pair_down) = (pair(&t_up, &n_up), pair(&t_down, &n_down));
    for (op, client, fwd, nse_side, pair) in [
        ("Request", &s.up, &t_up, &n_up, &pair_up),
        ("Close", &s.down, &t_down, &n_down, &pair_down),
    ] {
        eprintln!(
            "summary {name}: breakdown {op}: at the client {}",
            Stats::of(client).line()
        );
        eprintln!(
            "summary {name}: breakdown {op}:   forwarder KERNEL client handler and below {}",
            Stats::of(fwd).line()
        );
        eprintln!(
            "summary {name}: breakdown {op}:     the pair (handler minus endpoint call) {}",
            Stats::of(pair).line()
        );
        eprintln!(
            "summary {name}: breakdown {op}:     the endpoint call (gRPC + NSE) {}",
            Stats::of(nse_side).line()
        );
        eprintln!(
            "summary {name}: breakdown {op}:   above the handler (client, nsmgr, forwarder server side, gRPC) {}",
            Stats::of(&rest(client, fwd)).line()
        );
    }
    drop(timed);
    clean(&[nsc, nse])?;
    anatomy(name, &direct).await?;
    clean(&[nsc, nse])?;
    Ok(())
}

/// The calls of one sample, per operation.
type Calls = Arc<Mutex<BTreeMap<&'static str, Vec<Duration>>>>;

/// A [`Netlink`] that times every call of the one it wraps.
#[derive(Debug)]
struct Timed {
    inner: RtNetlink,
    calls: Calls,
}

impl Timed {
    async fn time<T>(&self, op: &'static str, f: impl std::future::Future<Output = T>) -> T {
        let t = Instant::now();
        let out = f.await;
        let d = t.elapsed();
        self.calls
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(op)
            .or_default()
            .push(d);
        out
    }
}

#[async_trait]
impl Netlink for Timed {
    fn netns(&self) -> &str {
        self.inner.netns()
    }
    async fn set_mac(&self, name: &IfName, mac: [u8; 6]) -> nsm_sdk_kernel::Result<()> {
        self.time("set_mac", self.inner.set_mac(name, mac)).await
    }
    async fn create_veth_pair(
        &self,
        a: &IfName,
        ns_a: &NetNs,
        b: &IfName,
        ns_b: &NetNs,
        mtu: Option<Mtu>,
    ) -> nsm_sdk_kernel::Result<()> {
        self.time(
            "create_veth_pair",
            self.inner.create_veth_pair(a, ns_a, b, ns_b, mtu),
        )
        .await
    }
    async fn delete_link(&self, name: &IfName) -> nsm_sdk_kernel::Result<()> {
        self.time("delete_link", self.inner.delete_link(name)).await
    }
    async fn link(&self, name: &IfName) -> nsm_sdk_kernel::Result<Option<Link>> {
        self.time("link", self.inner.link(name)).await
    }
    async fn links(&self) -> nsm_sdk_kernel::Result<Vec<Link>> {
        self.time("links", self.inner.links()).await
    }
    async fn set_mtu(&self, name: &IfName, mtu: Mtu) -> nsm_sdk_kernel::Result<()> {
        self.time("set_mtu", self.inner.set_mtu(name, mtu)).await
    }
    async fn set_up(&self, name: &IfName) -> nsm_sdk_kernel::Result<()> {
        self.time("set_up", self.inner.set_up(name)).await
    }
    async fn set_alias(&self, name: &IfName, alias: &str) -> nsm_sdk_kernel::Result<()> {
        self.time("set_alias", self.inner.set_alias(name, alias))
            .await
    }
    async fn add_address(&self, name: &IfName, addr: IpNet) -> nsm_sdk_kernel::Result<()> {
        self.time("add_address", self.inner.add_address(name, addr))
            .await
    }
    async fn del_address(&self, name: &IfName, addr: IpNet) -> nsm_sdk_kernel::Result<()> {
        self.time("del_address", self.inner.del_address(name, addr))
            .await
    }
    async fn addresses(&self, name: &IfName) -> nsm_sdk_kernel::Result<Vec<IpNet>> {
        self.time("addresses", self.inner.addresses(name)).await
    }
    async fn add_route(&self, name: &IfName, route: &Route) -> nsm_sdk_kernel::Result<()> {
        self.time("add_route", self.inner.add_route(name, route))
            .await
    }
    async fn del_route(&self, name: &IfName, route: &Route) -> nsm_sdk_kernel::Result<()> {
        self.time("del_route", self.inner.del_route(name, route))
            .await
    }
    async fn routes(&self, name: &IfName) -> nsm_sdk_kernel::Result<Vec<Route>> {
        self.time("routes", self.inner.routes(name)).await
    }
    async fn add_neighbour(&self, name: &IfName, n: &Neighbour) -> nsm_sdk_kernel::Result<()> {
        self.time("add_neighbour", self.inner.add_neighbour(name, n))
            .await
    }
    async fn del_neighbour(&self, name: &IfName, ip: IpAddr) -> nsm_sdk_kernel::Result<()> {
        self.time("del_neighbour", self.inner.del_neighbour(name, ip))
            .await
    }
    async fn neighbours(&self, name: &IfName) -> nsm_sdk_kernel::Result<Vec<Neighbour>> {
        self.time("neighbours", self.inner.neighbours(name)).await
    }
    async fn add_rule(&self, rule: &Rule) -> nsm_sdk_kernel::Result<()> {
        self.time("add_rule", self.inner.add_rule(rule)).await
    }
    async fn del_rule(&self, rule: &Rule) -> nsm_sdk_kernel::Result<()> {
        self.time("del_rule", self.inner.del_rule(rule)).await
    }
    async fn rules(&self) -> nsm_sdk_kernel::Result<Vec<Rule>> {
        self.time("rules", self.inner.rules()).await
    }
    async fn tables_in_use(&self) -> nsm_sdk_kernel::Result<BTreeSet<u32>> {
        self.time("tables_in_use", self.inner.tables_in_use()).await
    }
}

/// Floor (a) taken apart: `kernel_side_up` is `RtNetlink::open` in both pods and
/// `veth_up`; here `veth_up` gets netlink handles that time each call, and `down` goes
/// through them too. Prints, per operation, the calls per sample and the p50/p99 of
/// their time summed per sample.
async fn anatomy(name: &str, direct: &Direct) -> Res<()> {
    let calls: Calls = Arc::default();
    let mut per_op: BTreeMap<String, Vec<Duration>> = BTreeMap::new();
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for i in 0..(WARMUP + ANATOMY) {
        let client = plan_from_context(&direct.ctx, PodSide::Client, CLIENT_IF)?
            .with_alias(veth_alias(PodSide::Client, &direct.key));
        let endpoint = plan_from_context(&direct.ctx, PodSide::Endpoint, &direct.nse_if)?
            .with_alias(veth_alias(PodSide::Endpoint, &direct.key));
        let t = Instant::now();
        let (c, e) = (
            RtNetlink::open(&direct.nsc).await?,
            RtNetlink::open(&direct.nse).await?,
        );
        let open = t.elapsed();
        let t = Instant::now();
        let created = veth_up(
            VethEnd {
                netns: &direct.nsc,
                netlink: Arc::new(Timed {
                    inner: c,
                    calls: calls.clone(),
                }),
                plan: client,
            },
            VethEnd {
                netns: &direct.nse,
                netlink: Arc::new(Timed {
                    inner: e,
                    calls: calls.clone(),
                }),
                plan: endpoint,
            },
        )
        .await?;
        let up = t.elapsed();
        let t = Instant::now();
        down(created).await?;
        let dn = t.elapsed();
        let sample = std::mem::take(&mut *calls.lock().unwrap_or_else(|p| p.into_inner()));
        if i < WARMUP {
            continue;
        }
        per_op
            .entry("= RtNetlink::open x2 (up)".into())
            .or_default()
            .push(open);
        per_op.entry("= veth_up (up)".into()).or_default().push(up);
        per_op.entry("= down (down)".into()).or_default().push(dn);
        for (op, v) in sample {
            per_op
                .entry(op.to_string())
                .or_default()
                .push(v.iter().sum());
            *counts.entry(op.to_string()).or_default() += v.len();
        }
    }
    for (op, v) in &per_op {
        let st = Stats::of(v);
        let calls = counts.get(op).map_or(1.0, |c| *c as f64 / ANATOMY as f64);
        eprintln!(
            "summary {name}: anatomy of floor a: {op:<28} {calls:>4.1} calls/sample, per sample p50 {:.3} ms, p99 {:.3} ms",
            ms(st.p50),
            ms(st.p99)
        );
    }
    Ok(())
}

fn run_one(rt_kind: &str) -> Res<()> {
    let rt: Runtime = runtime(rt_kind)?;
    let (nsc, nse) = (Ns::new(), Ns::new());
    eprintln!("pods: nsc {} nse {}", nsc.name, nse.name);
    let result = rt.block_on(measure(rt_kind, &nsc, &nse));
    // The meshes are gone (dropped inside `measure`); the runtime goes before the pods.
    drop(rt);
    result
}

fn main() {
    eprintln!("machine: {}", machine());
    if !common::can_run() {
        return;
    }
    let filter = std::env::var("NSM_BENCH_FILTER").unwrap_or_default();
    let mut failed = false;
    for rt_kind in ["multi_thread_2", "current_thread"] {
        if !rt_kind.contains(&filter) {
            continue;
        }
        if let Err(e) = run_one(rt_kind) {
            eprintln!("ERROR {rt_kind}: {e}");
            failed = true;
        }
    }
    if failed {
        std::process::exit(1);
    }
}
