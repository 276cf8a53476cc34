//! TCP throughput through an NSM-made Kernel2VXLAN2Kernel connection against a VXLAN
//! link made by hand over the same underlay.
//!
//! The two-node mesh of `tests/mesh.rs` (all in this process, unix sockets, two
//! workers) makes one remote connection between pod `nsc` on node 1 and pod `nse` on
//! node 2 (namespaces made by the bench, `nsmt-<pid>-<n>`, deleted by a guard even on
//! failure). A second pair of pods gets a VXLAN link made by hand over the same
//! underlay — on each node `ip link add <name> mtu M type vxlan id V local <own>
//! remote <peer> dstport 4789`, moved into its pod (the socket stays in the node), then
//! `ip addr add`, `ip link set up`, `ip route add <peer> dev <if> scope global proto
//! static` — with the same names, MTU, addresses and routes as the NSM one and another
//! VNI (checked: the bench compares both pods' data-plane shape, VNI aside, and stops if
//! they differ).
//!
//! Each run is `iperf3 -c <endpoint> -t 5 -P 1` (TCP, one stream) in the client pod
//! against `iperf3 -s -1` in the endpoint pod (`ip netns exec`); the figure is the
//! receiver's bit rate. NSM and hand-made alternate, 3 runs each (NSM first;
//! `NSM_BENCH_RUNS=n` for more). Target: NSM >= 95 % of hand-made.
//!
//! Needs root, `ip`, `ping` and `iperf3`.
//!
//! Run (root): `cargo bench -p nsm-sdk-vxlan --bench remote_throughput`

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{
    addrs, cx, ip_of, loadavg, machine, request, run, underlay, Kind, Mesh, Ns, Res, CLIENT_IF,
    UNDERLAY,
};
use serde_json::Value;

const RUNS: usize = 3;
const SECONDS: u32 = 5;
const PORT: &str = "5201";

/// An iperf3 server that is killed (and reaped) when dropped.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One iperf3 run from `client` to `addr` in `server`; the receiver's Gbit/s.
fn iperf(server: &Ns, client: &Ns, addr: &str) -> Res<f64> {
    let mut srv = Server(
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &server.name,
                "iperf3",
                "-s",
                "-1",
                "-p",
                PORT,
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    let mut listening = false;
    for _ in 0..100 {
        let (_, out) = run(
            "ip",
            &[
                "netns",
                "exec",
                &server.name,
                "ss",
                "-Htln",
                "sport",
                "=",
                ":5201",
            ],
        );
        if !out.trim().is_empty() {
            listening = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    if !listening {
        return Err(format!("iperf3 -s in {} does not listen", server.name).into());
    }
    let secs = SECONDS.to_string();
    let o = Command::new("ip")
        .args([
            "netns",
            "exec",
            &client.name,
            "iperf3",
            "-c",
            addr,
            "-p",
            PORT,
            "-t",
            &secs,
            "-P",
            "1",
            "-J",
        ])
        .output()?;
    let (ok, out) = (o.status.success(), String::from_utf8_lossy(&o.stdout));
    let json: Value = serde_json::from_str(&out)
        .map_err(|e| format!("iperf3 -c {addr} (ok={ok}): {e}: {out}"))?;
    if let Some(err) = json["error"].as_str() {
        return Err(format!("iperf3 -c {addr}: {err}").into());
    }
    let bps = json["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .ok_or_else(|| format!("iperf3 -c {addr}: no end.sum_received: {out}"))?;
    let retrans = json["end"]["sum_sent"]["retransmits"].as_u64().unwrap_or(0);
    eprintln!("    retransmits {retrans}");
    let _ = srv.0.wait();
    Ok(bps / 1e9)
}

/// What the data plane of `dev` looks like, without what names or numbers a device
/// (ifindex, MAC, VNI, IPv6 link-local): MTU, flags, qdisc, queues, the VXLAN
/// parameters, addresses and main-table IPv4 routes.
fn shape(ns: &Ns, dev: &str) -> Res<Vec<String>> {
    let mut v = Vec::new();
    for l in ns.json(&["-d", "link", "show", "dev", dev])? {
        v.push(format!(
            "mtu {} qlen {} flags {} qdisc {} queues {}/{} gso {}/{}",
            l["mtu"],
            l["txqlen"],
            l["flags"],
            l["qdisc"],
            l["num_tx_queues"],
            l["num_rx_queues"],
            l["gso_max_size"],
            l["gso_max_segs"]
        ));
        let mut info = l["linkinfo"]["info_data"].clone();
        if let Some(o) = info.as_object_mut() {
            o.remove("id");
        }
        v.push(format!("{} {info}", l["linkinfo"]["info_kind"]));
    }
    for l in ns.json(&["addr", "show", "dev", dev])? {
        for a in l["addr_info"].as_array().into_iter().flatten() {
            if a["scope"] == "global" {
                v.push(format!("addr {}/{}", a["local"], a["prefixlen"]));
            }
        }
    }
    for r in ns.json(&["-4", "route", "show"])? {
        v.push(format!(
            "route {} scope {} gw {} proto {}",
            r["dst"], r["scope"], r["gateway"], r["protocol"]
        ));
    }
    v.sort();
    Ok(v)
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s.get(s.len() / 2).copied().unwrap_or(0.0)
}

fn measure(rt: &tokio::runtime::Runtime) -> Res<()> {
    let nodes = underlay()?;
    let (nsc, nse) = (Ns::new()?, Ns::new()?);
    let (hand_c, hand_e) = (Ns::new()?, Ns::new()?);
    let mesh = rt.block_on(Mesh::start(
        &nodes,
        Kind::Vxlan {
            nsc: &nsc,
            nse: &nse,
        },
    ))?;
    let result = (|| -> Res<()> {
        let conn = rt.block_on(mesh.client.request(&mut cx(), request()))?;
        let (client_addr, endpoint_addr) = addrs(&conn)?;
        let mtu = conn.context.as_ref().map_or(0, |c| c.mtu).to_string();
        let nse_if = nse.mesh_link()?;
        let (_, _, vni) = nsc.kind(CLIENT_IF)?;
        eprintln!(
            "NSM connection: {CLIENT_IF} {client_addr} -> {nse_if} {endpoint_addr}, MTU {mtu}, VNI {vni}"
        );

        // The same by hand, with another VNI on the same underlay and port.
        let hand_vni = (if vni == 2 { 4 } else { 2 }).to_string();
        for (i, (node, pod, dev)) in [
            (&nodes[0], &hand_c, CLIENT_IF),
            (&nodes[1], &hand_e, nse_if.as_str()),
        ]
        .into_iter()
        .enumerate()
        {
            node.ip(&[
                "link",
                "add",
                dev,
                "mtu",
                &mtu,
                "type",
                "vxlan",
                "id",
                &hand_vni,
                "local",
                UNDERLAY[i],
                "remote",
                UNDERLAY[1 - i],
                "dstport",
                "4789",
            ])?;
            node.ip(&["link", "set", dev, "netns", &pod.name])?;
        }
        for (ns, dev, own, peer) in [
            (&hand_c, CLIENT_IF, &client_addr, &endpoint_addr),
            (&hand_e, nse_if.as_str(), &endpoint_addr, &client_addr),
        ] {
            ns.ip(&["addr", "add", own, "dev", dev])?;
            ns.ip(&["link", "set", dev, "up"])?;
            ns.ip(&[
                "route", "add", peer, "dev", dev, "scope", "global", "proto", "static",
            ])?;
        }
        for (nsm, hand, dev) in [(&nsc, &hand_c, CLIENT_IF), (&nse, &hand_e, nse_if.as_str())] {
            let (a, b) = (shape(nsm, dev)?, shape(hand, dev)?);
            eprintln!("shape {dev}: NSM {a:?}");
            if a != b {
                return Err(format!("{dev}: NSM {a:?} but by hand {b:?}").into());
            }
        }
        let peer = ip_of(&endpoint_addr);
        if !nsc.ping(peer) || !hand_c.ping(peer) {
            return Err("a ping from a client pod fails".into());
        }

        eprintln!("loadavg before: {}", loadavg());
        let runs = std::env::var("NSM_BENCH_RUNS")
            .ok()
            .and_then(|r| r.parse().ok())
            .unwrap_or(RUNS);
        let (mut nsm, mut hand) = (Vec::new(), Vec::new());
        for i in 0..runs {
            let g = iperf(&nse, &nsc, peer)?;
            eprintln!(
                "run {} NSM:     {g:.2} Gbit/s (loadavg {})",
                i + 1,
                loadavg()
            );
            nsm.push(g);
            let g = iperf(&hand_e, &hand_c, peer)?;
            eprintln!(
                "run {} by hand: {g:.2} Gbit/s (loadavg {})",
                i + 1,
                loadavg()
            );
            hand.push(g);
        }
        let (m_nsm, m_hand) = (mean(&nsm), mean(&hand));
        let ratio = m_nsm / m_hand;
        eprintln!(
            "summary throughput: NSM Kernel2VXLAN2Kernel {nsm:.2?} Gbit/s, mean {m_nsm:.2}, median {:.2}",
            median(&nsm)
        );
        eprintln!(
            "summary throughput: VXLAN by hand           {hand:.2?} Gbit/s, mean {m_hand:.2}, median {:.2}",
            median(&hand)
        );
        eprintln!(
            "summary throughput: ratio of means {:.1} %, of medians {:.1} %; target >= 95 %: {}",
            ratio * 100.0,
            median(&nsm) / median(&hand) * 100.0,
            if ratio >= 0.95 { "met" } else { "NOT met" }
        );
        rt.block_on(mesh.client.close(&mut cx(), conn))?;
        if nsc.links()? != ["lo"] || nse.links()? != ["lo"] {
            return Err("a pod is not clean after Close".into());
        }
        Ok(())
    })();
    let guard = rt.enter();
    drop(mesh);
    drop(guard);
    result
}

fn main() {
    eprintln!("machine: {}", machine());
    if !common::can_run() {
        return;
    }
    if !run("iperf3", &["--version"]).0 {
        eprintln!("skipped: iperf3 is not installed (apt-get install -y iperf3)");
        return;
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ERROR: {e}");
            std::process::exit(1);
        }
    };
    let result = measure(&rt);
    drop(rt);
    if let Err(e) = result {
        eprintln!("ERROR: {e}");
        std::process::exit(1);
    }
}
