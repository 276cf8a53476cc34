//! Kernel2VXLAN2Kernel through two nodes' meshes, as root.
//!
//! Two "nodes" are namespaces joined by a veth underlay `ul0` (192.0.2.1/24 and
//! 192.0.2.2/24, MTU 1500). Each node has a manager and a forwarder whose [`Tunnel`]
//! is bound to the node's namespace (so its VXLAN devices' UDP sockets and VNIs live
//! there); a registry serves both. Everything runs in this test process, in a sandbox
//! served over unix sockets. Pods are namespaces too
//! (`ip netns add nsmt-<pid>-<n>`, deleted by a guard even when the test fails), named
//! `file:///run/netns/<name>`: endpoints with point-to-point IPAM and `kernel_endpoint`,
//! clients with `kernel_client`. What the kernel holds is read with `ip -j` (an
//! independent observer), traffic checked with `ping` from inside a pod. Without root
//! (or without `ip`/`ping`) each test prints a skip line and passes.

use std::sync::Arc;

use nsm_sdk::chains::client;
use nsm_sdk::proto::connection::Connection;
use nsm_sdk::proto::networkservice::NetworkServiceRequest;
use nsm_sdk::sandbox::{Counter, EndpointHandle, Sandbox};
use nsm_sdk::wire::{params, types};
use nsm_sdk::{Chain, Cx};
use nsm_sdk_vxlan::mechanism::{vxlan_forwarder_mechanisms, Tunnel};
use nsm_sdk_vxlan::{Vni, VniAllocator};
use nsm_testkit::bench::ip_of;
use nsm_testkit::kernel::{kernel_nsc, kernel_nse, kernel_sandbox};
use nsm_testkit::{names as path_names, refresh, underlay, Ns, UNDERLAY};

macro_rules! require_root {
    () => {
        nsm_testkit::require_root!("VXLAN mesh tests")
    };
}

/// `(vni, local, remote, port)` of the VXLAN device `dev` in `ns`.
fn vxlan(ns: &Ns, dev: &str) -> (u64, String, String, u64) {
    let l = ns.link(dev);
    assert_eq!(l["linkinfo"]["info_kind"], "vxlan", "{dev}: {l}");
    let d = &l["linkinfo"]["info_data"];
    (
        d["id"].as_u64().unwrap_or(0),
        d["local"].as_str().unwrap_or("").to_string(),
        d["remote"].as_str().unwrap_or("").to_string(),
        d["port"].as_u64().unwrap_or(0),
    )
}

/// What a connection could leave behind in a pod (`pod`) or a node.
fn everything(ns: &Ns, pod: bool) -> Vec<String> {
    if pod {
        ns.everything()
    } else {
        ns.everything_of_node()
    }
}

/// A sandbox of two nodes whose forwarders have a VXLAN+KERNEL data plane, each with
/// a [`Tunnel`] bound to its node's namespace, and the endpoints started in it.
struct Mesh {
    sandbox: Sandbox,
    tunnels: Vec<Tunnel>,
    endpoints: Vec<EndpointHandle>,
}

impl Mesh {
    /// The mesh over `nodes`, node `i`'s forwarder with `allocators[i]` (a fresh one
    /// when `None`).
    async fn start(nodes: &[Ns; 2], allocators: [Option<Arc<VniAllocator>>; 2]) -> Mesh {
        let mut tunnels = Vec::new();
        for (i, (node, allocator)) in nodes.iter().zip(allocators).enumerate() {
            let mut tunnel = Tunnel::builder(UNDERLAY[i].parse().unwrap()).netns(node.open());
            if let Some(a) = allocator {
                tunnel = tunnel.allocator(a);
            }
            let tunnel = tunnel.build().await.unwrap();
            assert_eq!(tunnel.mtu().get(), 1450, "the underlay's 1500 - 50");
            tunnels.push(tunnel);
        }
        let per_node = tunnels.clone();
        let sandbox = kernel_sandbox()
            .nodes(2)
            .forwarder_mechanisms(move |i| vxlan_forwarder_mechanisms(per_node[i].clone()))
            .build()
            .await
            .unwrap();
        Mesh {
            sandbox,
            tunnels,
            endpoints: Vec::new(),
        }
    }

    /// An endpoint `name` of `service` in `pod` on node `node` (0 or 1), with
    /// addresses from `prefix`, registered through that node's manager; it lives as
    /// long as the mesh. Its counter counts what reaches its application handlers.
    async fn add_nse(
        &mut self,
        node: usize,
        name: &str,
        service: &str,
        pod: &Ns,
        prefix: &str,
    ) -> Counter {
        let nse = self
            .sandbox
            .node(node)
            .endpoint(kernel_nse(name, service, pod, prefix))
            .await
            .unwrap();
        let counter = nse.counter.clone();
        self.endpoints.push(nse);
        counter
    }

    /// A client on node `node` whose interface `ifname` goes into `pod`, no retry.
    fn client(&self, node: usize, pod: &Ns, ifname: &str) -> Chain {
        client(kernel_nsc(self.sandbox.node(node), pod, Some(ifname)))
    }

    fn allocators_empty(&self) -> bool {
        self.tunnels.iter().all(|t| t.allocator().is_empty())
    }
}

fn request(service: &str) -> NetworkServiceRequest {
    nsm_testkit::request(service)
}

/// The client's and the endpoint's address (`a.b.c.d/32`) of a connection.
fn addrs(conn: &Connection) -> (String, String) {
    nsm_testkit::bench::addrs(conn).expect("the IPAM filled the IP context")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kernel2vxlan2kernel_pings_across_the_underlay_at_the_tunnel_mtu_and_leaves_nothing() {
    require_root!();
    let nodes = underlay();
    let (nsc, nse) = (Ns::new(), Ns::new());
    let baseline: Vec<Vec<String>> = [&nsc, &nse]
        .iter()
        .map(|n| everything(n, true))
        .chain(nodes.iter().map(|n| everything(n, false)))
        .collect();
    let mut mesh = Mesh::start(&nodes, [None, None]).await;
    let count = mesh
        .add_nse(1, "nse", "vx-svc", &nse, "172.16.60.0/24")
        .await;
    let chain = mesh.client(0, &nsc, "nsm-1");

    let conn = chain
        .request(&mut Cx::client(), request("vx-svc"))
        .await
        .unwrap();
    assert_eq!(
        path_names(&conn),
        [
            "nsc",
            "nsmgr-0",
            "forwarder-0-0",
            "nsmgr-1",
            "forwarder-1-0",
            "nse"
        ]
    );
    let m = conn.mechanism.as_ref().unwrap();
    assert_eq!(m.r#type, types::KERNEL);
    assert_eq!(m.parameters[params::NAME], "nsm-1");
    assert_eq!(conn.context.as_ref().unwrap().mtu, 1450);
    let (client_addr, endpoint_addr) = addrs(&conn);

    // A VXLAN device in each pod, one VNI, each node's socket towards the other.
    assert_eq!(nsc.links(), ["lo", "nsm-1"]);
    let nse_if = nse.mesh_link();
    let (vni, local, remote, port) = vxlan(&nsc, "nsm-1");
    assert_eq!(
        (local.as_str(), remote.as_str(), port),
        (UNDERLAY[0], UNDERLAY[1], 4789)
    );
    let (vni2, local2, remote2, port2) = vxlan(&nse, &nse_if);
    assert_eq!(
        (vni2, local2.as_str(), remote2.as_str(), port2),
        (vni, UNDERLAY[1], UNDERLAY[0], 4789)
    );
    assert!(
        vni != 0 && vni % 2 == 0,
        "192.0.2.1 <= 192.0.2.2 gives an even VNI: {vni}"
    );
    assert!(mesh.tunnels[1]
        .allocator()
        .is_taken(Vni::new(vni as u32).unwrap()));
    for (pod, dev, addr) in [
        (&nsc, "nsm-1", &client_addr),
        (&nse, nse_if.as_str(), &endpoint_addr),
    ] {
        assert_eq!(pod.addresses(dev), std::slice::from_ref(addr));
        assert_eq!(pod.link(dev)["mtu"], 1450, "{dev}: underlay 1500 - 50");
    }
    for n in &nodes {
        assert_eq!(
            n.links(),
            ["lo", "ul0"],
            "nothing of the tunnel in the node"
        );
    }

    // Pings cross the underlay.
    let (tx0, rx0) = nodes[0].counters("ul0");
    assert!(nsc.ping(ip_of(&endpoint_addr)).await, "client -> endpoint");
    assert!(nse.ping(ip_of(&client_addr)).await, "endpoint -> client");
    let (tx1, rx1) = nodes[0].counters("ul0");
    assert!(
        tx1 >= tx0 + 2 && rx1 >= rx0 + 2,
        "underlay of node 1: tx {tx0} -> {tx1}, rx {rx0} -> {rx1}"
    );
    // The tunnel MTU exactly: 1450 - 28 = 1422 bytes of ICMP payload with DF.
    assert!(
        nsc.ping_args(&["-W2", "-M", "do", "-s", "1422", ip_of(&endpoint_addr)])
            .await,
        "a DF ping of the full tunnel MTU"
    );
    assert!(
        !nsc.ping_args(&["-W2", "-M", "do", "-s", "1423", ip_of(&endpoint_addr)])
            .await,
        "one byte more does not fit"
    );

    // A refresh changes nothing.
    let before = (nsc.state(), nse.state());
    let again = chain
        .request(&mut Cx::client(), refresh(&conn))
        .await
        .unwrap();
    assert_eq!(addrs(&again), addrs(&conn));
    assert_eq!(
        (nsc.state(), nse.state()),
        before,
        "a refresh changes nothing"
    );
    assert_eq!(vxlan(&nsc, "nsm-1").0, vni, "the same VNI");
    assert!(nsc.ping(ip_of(&endpoint_addr)).await, "after the refresh");

    chain.close(&mut Cx::client(), again).await.unwrap();
    assert_eq!(count.closes(), 1);
    let after: Vec<Vec<String>> = [&nsc, &nse]
        .iter()
        .map(|n| everything(n, true))
        .chain(nodes.iter().map(|n| everything(n, false)))
        .collect();
    for (i, (a, b)) in after.iter().zip(&baseline).enumerate() {
        assert_eq!(a, b, "namespace {i} (nsc, nse, node 1, node 2) after Close");
    }
    assert!(mesh.allocators_empty(), "VNIs freed on both nodes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_pod_knows_the_other_device_permanently_so_the_tunnel_works_without_arp() {
    require_root!();
    let nodes = underlay();
    let (nsc, nse) = (Ns::new(), Ns::new());
    let mut mesh = Mesh::start(&nodes, [None, None]).await;
    mesh.add_nse(1, "nse", "vx-nd", &nse, "172.16.61.0/24")
        .await;
    let chain = mesh.client(0, &nsc, "nsm-1");
    let conn = chain
        .request(&mut Cx::client(), request("vx-nd"))
        .await
        .unwrap();
    let (client_addr, endpoint_addr) = addrs(&conn);
    let (client_ip, endpoint_ip) = (ip_of(&client_addr), ip_of(&endpoint_addr));
    let nse_if = nse.mesh_link();
    let (client_mac, endpoint_mac) = (nsc.lladdr("nsm-1"), nse.lladdr(&nse_if));
    // Each pod has the other device's real hardware address, told across the nodes.
    assert_eq!(
        nsc.neighbours("nsm-1"),
        [format!("{endpoint_ip} lladdr {endpoint_mac} PERMANENT")]
    );
    assert_eq!(
        nse.neighbours(&nse_if),
        [format!("{client_ip} lladdr {client_mac} PERMANENT")]
    );
    // With ARP dropped in both pods only those entries can carry a packet.
    nsc.drop_neighbour_discovery();
    nse.drop_neighbour_discovery();
    assert!(
        nsc.ping(endpoint_ip).await,
        "client -> endpoint without ARP"
    );
    assert!(nse.ping(client_ip).await, "endpoint -> client without ARP");
    // A refresh keeps them (the devices keep their hardware addresses).
    let again = chain
        .request(&mut Cx::client(), refresh(&conn))
        .await
        .unwrap();
    assert_eq!(nsc.lladdr("nsm-1"), client_mac);
    assert_eq!(
        nsc.neighbours("nsm-1"),
        [format!("{endpoint_ip} lladdr {endpoint_mac} PERMANENT")]
    );
    assert!(
        nsc.ping(endpoint_ip).await,
        "after the refresh, without ARP"
    );
    chain.close(&mut Cx::client(), again).await.unwrap();
    assert_eq!(nsc.links(), ["lo"]);
    assert!(mesh.allocators_empty(), "VNIs freed on both nodes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_in_both_directions_ping_with_distinct_vnis_and_close_cleanly() {
    require_root!();
    let nodes = underlay();
    let (nsc1, nsc2, nsc3) = (Ns::new(), Ns::new(), Ns::new());
    let (nse_a, nse_b, nse_c) = (Ns::new(), Ns::new(), Ns::new());
    let pods = [&nsc1, &nsc2, &nsc3, &nse_a, &nse_b, &nse_c];
    let baseline: Vec<Vec<String>> = pods.iter().map(|p| everything(p, true)).collect();
    let mut mesh = Mesh::start(&nodes, [None, None]).await;
    let counts = [
        mesh.add_nse(1, "nse-a", "svc-a", &nse_a, "172.16.61.0/24")
            .await,
        mesh.add_nse(1, "nse-b", "svc-b", &nse_b, "172.16.62.0/24")
            .await,
        mesh.add_nse(0, "nse-c", "svc-c", &nse_c, "172.16.63.0/24")
            .await,
    ];
    // Two clients on node 1 to the endpoints of node 2, one the other way.
    let clients = [
        (mesh.client(0, &nsc1, "nsm-1"), "svc-a", &nsc1, &nse_a),
        (mesh.client(0, &nsc2, "nsm-1"), "svc-b", &nsc2, &nse_b),
        (mesh.client(1, &nsc3, "nsm-1"), "svc-c", &nsc3, &nse_c),
    ];
    let conns: Vec<Connection> = futures::future::join_all(
        clients
            .iter()
            .map(|(c, svc, _, _)| async move { c.request(&mut Cx::client(), request(svc)).await }),
    )
    .await
    .into_iter()
    .collect::<Result<_, _>>()
    .unwrap();

    let mut vnis = Vec::new();
    for ((_, svc, nsc, nse), conn) in clients.iter().zip(&conns) {
        assert_eq!(path_names(conn).len(), 6, "{svc}: {:?}", path_names(conn));
        let (client_addr, endpoint_addr) = addrs(conn);
        let (vni, ..) = vxlan(nsc, "nsm-1");
        assert_eq!(vxlan(nse, &nse.mesh_link()).0, vni, "{svc}");
        assert_eq!(nsc.addresses("nsm-1"), [client_addr]);
        assert!(
            nsc.ping(ip_of(&endpoint_addr)).await,
            "{svc}: client -> endpoint"
        );
        vnis.push(vni);
    }
    // Node 2 picks even VNIs for 192.0.2.1 -> 192.0.2.2, node 1 an odd one for the
    // reverse direction.
    assert!(
        vnis[0] % 2 == 0 && vnis[1] % 2 == 0 && vnis[2] % 2 == 1,
        "{vnis:?}"
    );
    let distinct: std::collections::BTreeSet<_> = vnis.iter().collect();
    assert_eq!(distinct.len(), 3, "{vnis:?}");
    // Each node holds the VNIs it chose and records those its client side uses.
    for t in &mesh.tunnels {
        assert_eq!(t.allocator().len(), 3, "{t:?}");
    }

    futures::future::join_all(
        clients
            .iter()
            .zip(conns)
            .map(|((c, ..), conn)| async move { c.close(&mut Cx::client(), conn).await }),
    )
    .await
    .into_iter()
    .collect::<Result<Vec<()>, _>>()
    .unwrap();
    for c in &counts {
        assert_eq!(c.closes(), 1);
    }
    for (p, base) in pods.iter().zip(&baseline) {
        assert_eq!(&everything(p, true), base, "{} after Close", p.name);
    }
    assert!(mesh.allocators_empty());
}

/// Requests and closes connections until `clashed` is reserved in `allocator` (the
/// clash happened), checking that each one works and that its VNI is in `allowed`.
async fn until_clash(
    mesh: &Mesh,
    nsc: &Ns,
    nse: &Ns,
    allocator: &VniAllocator,
    clashed: u32,
    allowed: &[u64],
) -> usize {
    let chain = mesh.client(0, nsc, "nsm-1");
    for attempt in 1..=30 {
        let conn = chain
            .request(&mut Cx::client(), request("vx-svc"))
            .await
            .expect("a clash is not the user's error");
        let (vni, ..) = vxlan(nsc, "nsm-1");
        assert!(allowed.contains(&vni), "VNI {vni} not in {allowed:?}");
        assert_eq!(vxlan(nse, &nse.mesh_link()).0, vni);
        assert!(nsc.ping(ip_of(&addrs(&conn).1)).await, "VNI {vni}");
        chain.close(&mut Cx::client(), conn).await.unwrap();
        assert_eq!(nsc.links(), ["lo"]);
        if allocator.is_taken(Vni::new(clashed).unwrap()) {
            return attempt;
        }
    }
    panic!("the allocator never picked VNI {clashed} in 30 connections");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vni_clashes_on_either_node_are_resolved_without_an_error() {
    require_root!();
    let nodes = underlay();
    let (nsc, nse) = (Ns::new(), Ns::new());
    // Node 2 picks among the even VNIs 2, 4 and 6 only.
    let server_vnis = Arc::new(VniAllocator::with_max(7).unwrap());
    let mut mesh = Mesh::start(&nodes, [None, Some(server_vnis.clone())]).await;
    mesh.add_nse(1, "nse", "vx-svc", &nse, "172.16.64.0/24")
        .await;
    let squat = |node: &Ns, name: &str, vni: &str, local: &str| {
        node.ip(&[
            "link",
            "add",
            name,
            "type",
            "vxlan",
            "id",
            vni,
            "dstport",
            "4789",
            "local",
            local,
            "remote",
            "192.0.2.99",
        ]);
    };

    // VNI 2 is held on the endpoint's node by a device the mesh does not know: when
    // node 2 picks it, its forwarder moves on by itself.
    squat(&nodes[1], "squat2", "2", UNDERLAY[1]);
    let n = until_clash(&mesh, &nsc, &nse, &server_vnis, 2, &[4, 6]).await;
    eprintln!("clash on the endpoint's node after {n} connection(s)");
    assert_eq!(server_vnis.len(), 1, "only the reserved VNI 2 is left");

    // VNI 4 is held on the client's node: node 1 cannot make its device and asks
    // node 2 for another VNI, which can only be 6 now.
    squat(&nodes[0], "squat4", "4", UNDERLAY[0]);
    let n = until_clash(&mesh, &nsc, &nse, &server_vnis, 4, &[6]).await;
    eprintln!("clash on the client's node after {n} connection(s)");
    assert_eq!(server_vnis.len(), 2, "VNIs 2 and 4 reserved, 6 free again");
    assert!(mesh.tunnels[0].allocator().is_taken(Vni::new(4).unwrap()));
    assert_eq!(
        mesh.tunnels[0].allocator().len(),
        1,
        "only the reserved VNI 4"
    );
    assert_eq!(nse.links(), ["lo"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_left_for_the_same_connection_is_replaced_and_a_foreign_one_kept() {
    require_root!();
    let nodes = underlay();
    let (nsc, nse) = (Ns::new(), Ns::new());
    let mut mesh = Mesh::start(&nodes, [None, None]).await;
    mesh.add_nse(1, "nse", "vx-svc", &nse, "172.16.65.0/24")
        .await;
    let chain = mesh.client(0, &nsc, "nsm-1");
    let with_id = |id: &str| {
        let mut r = request("vx-svc");
        r.connection.as_mut().unwrap().id = id.into();
        r
    };
    // What a dead forwarder left for connection "left-over": its client end.
    nsc.ip(&[
        "link", "add", "nsm-1", "type", "veth", "peer", "name", "old-peer",
    ]);
    nsc.ip(&["link", "set", "nsm-1", "alias", "nsm-client-left-over"]);
    let conn = chain
        .request(&mut Cx::client(), with_id("left-over"))
        .await
        .unwrap();
    assert_eq!(
        nsc.links(),
        ["lo", "nsm-1"],
        "the old end and its peer are gone"
    );
    assert!(vxlan(&nsc, "nsm-1").0 > 0);
    assert!(nsc.ping(ip_of(&addrs(&conn).1)).await);
    chain.close(&mut Cx::client(), conn).await.unwrap();

    // A link of anything else is left alone, and the request fails without leftovers.
    nsc.ip(&[
        "link", "add", "nsm-1", "type", "veth", "peer", "name", "theirs",
    ]);
    nsc.ip(&["link", "set", "nsm-1", "alias", "not-nsm"]);
    let err = chain
        .request(&mut Cx::client(), with_id("another"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
    assert!(err.to_string().contains("not-nsm"), "{err}");
    assert_eq!(nsc.links(), ["lo", "nsm-1", "theirs"]);
    assert_eq!(nse.links(), ["lo"], "the endpoint's side was closed again");
    assert!(mesh.allocators_empty());
}
