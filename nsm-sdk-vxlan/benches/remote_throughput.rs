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

use common::{request, Kind, Mesh, CLIENT_IF};
use nsm_testkit::bench::{
    address_by_hand, addrs, cx, ip_of, same_shape, throughput_ab, throughput_main, Res, Side,
};
use nsm_testkit::{underlay, Ns, UNDERLAY};

const RUNS: usize = 3;
const SECONDS: u32 = 5;

fn measure(rt: &tokio::runtime::Runtime) -> Res<()> {
    let nodes = underlay();
    let (nsc, nse) = (Ns::new(), Ns::new());
    let (hand_c, hand_e) = (Ns::new(), Ns::new());
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
        let nse_if = nse.mesh_link();
        let (_, _, vni) = common::kind(&nsc, CLIENT_IF);
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
            ]);
            node.ip(&["link", "set", dev, "netns", &pod.name]);
        }
        address_by_hand([
            (&hand_c, CLIENT_IF, &client_addr, &endpoint_addr),
            (&hand_e, &nse_if, &endpoint_addr, &client_addr),
        ]);
        same_shape(
            [(&nsc, &hand_c, CLIENT_IF), (&nse, &hand_e, &nse_if)],
            common::shape,
        )?;
        let peer = ip_of(&endpoint_addr);
        if !nsc.ping_with(&["-W2", peer]) || !hand_c.ping_with(&["-W2", peer]) {
            return Err("a ping from a client pod fails".into());
        }

        throughput_ab(
            Side::new("NSM Kernel2VXLAN2Kernel", &nse, &nsc),
            Side::new("VXLAN by hand", &hand_e, &hand_c),
            peer,
            RUNS,
            SECONDS,
        )?;
        rt.block_on(mesh.client.close(&mut cx(), conn))?;
        if nsc.links() != ["lo"] || nse.links() != ["lo"] {
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
    throughput_main("VXLAN benches", measure);
}
