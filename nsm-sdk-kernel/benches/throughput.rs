//! TCP throughput through an NSM-made Kernel2Kernel connection against a veth pair made
//! by hand.
//!
//! The mesh of `tests/mesh.rs` (all in this process, unix sockets, two workers) makes
//! one KERNEL connection between pods `nsc` and `nse` (namespaces made by the bench,
//! `nsmt-<pid>-<n>`, deleted by a guard even on failure). A second pair of namespaces
//! gets a veth pair made by hand — `ip link add <c> netns A mtu M type veth peer name
//! <e> netns B mtu M`, then `ip addr add`, `ip route add <peer> dev <if> scope global
//! proto static` — with the same interface names, MTU, addresses and routes as the
//! NSM one (checked: the bench compares both pods' data-plane shape and stops if they
//! differ).
//!
//! Each run is `iperf3 -c <endpoint> -t 5 -P 1` (TCP, one stream) in the client pod
//! against `iperf3 -s -1` in the endpoint pod (`ip netns exec`); the figure is the
//! receiver's bit rate. NSM and hand-made alternate, 3 runs each (NSM first;
//! `NSM_BENCH_RUNS=n` for more). Target: NSM >= 95 % of hand-made.
//!
//! Needs root, `ip`, `ping` and `iperf3` (`apt-get install -y iperf3`).
//!
//! Run (root): `cargo bench -p nsm-sdk-kernel --bench throughput`

mod common;

use common::{request, Kind, Mesh, CLIENT_IF};
use nsm_testkit::bench::{
    address_by_hand, addrs, cx, ip_of, same_shape, throughput_ab, throughput_main, Res, Side,
};
use nsm_testkit::Ns;

/// Runs of each kind; `NSM_BENCH_RUNS` overrides it.
const RUNS: usize = 3;
const SECONDS: u32 = 5;

fn measure(rt: &tokio::runtime::Runtime) -> Res<()> {
    let (nsc, nse) = (Ns::new(), Ns::new());
    let (hand_c, hand_e) = (Ns::new(), Ns::new());
    eprintln!(
        "pods: NSM {} -> {}, by hand {} -> {}",
        nsc.name, nse.name, hand_c.name, hand_e.name
    );

    let mesh = rt.block_on(Mesh::start(Kind::Kernel {
        nsc: &nsc,
        nse: &nse,
        timers: None,
    }))?;
    let result = (|| -> Res<()> {
        let conn = rt.block_on(mesh.client.request(&mut cx(), request()))?;
        let (client_addr, endpoint_addr) = addrs(&conn)?;
        let mtu = conn.context.as_ref().map_or(0, |c| c.mtu).to_string();
        let nse_if = nse.mesh_link();
        eprintln!(
            "NSM connection: {CLIENT_IF} {client_addr} -> {nse_if} {endpoint_addr}, MTU {mtu}"
        );

        // The same by hand.
        common::must(
            "ip",
            &[
                "link",
                "add",
                "name",
                CLIENT_IF,
                "netns",
                &hand_c.name,
                "mtu",
                &mtu,
                "type",
                "veth",
                "peer",
                "name",
                &nse_if,
                "netns",
                &hand_e.name,
                "mtu",
                &mtu,
            ],
        )?;
        address_by_hand([
            (&hand_c, CLIENT_IF, &client_addr, &endpoint_addr),
            (&hand_e, &nse_if, &endpoint_addr, &client_addr),
        ]);
        same_shape(
            [(&nsc, &hand_c, CLIENT_IF), (&nse, &hand_e, &nse_if)],
            common::shape,
        )?;
        let peer = ip_of(&endpoint_addr);
        if !nsc.ping_with(&[peer]) || !hand_c.ping_with(&[peer]) {
            return Err("a ping from the client pod fails".into());
        }

        throughput_ab(
            Side::new("NSM Kernel2Kernel", &nse, &nsc),
            Side::new("veth by hand", &hand_e, &hand_c),
            peer,
            RUNS,
            SECONDS,
        )?;
        rt.block_on(mesh.client.close(&mut cx(), conn))?;
        if nsc.links() != ["lo"] {
            return Err("the client pod is not clean after Close".into());
        }
        Ok(())
    })();
    let guard = rt.enter();
    drop(mesh);
    drop(guard);
    result
}

fn main() {
    throughput_main("kernel benches", measure);
}
