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

fn main() {
    nsm_testkit::bench::throughput_main("vL3 benches", |rt| {
        nsm_tests::vl3_bench::run(rt, nsm_tests::vl3_bench::Sizes::from_env()).map(|_| ())
    });
}
