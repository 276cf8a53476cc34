//! The two forwarders of a remote connection in one chain, without root: fwd1 (KERNEL
//! server, kernel + VXLAN client) calls fwd2 (VXLAN server, kernel + VXLAN client)
//! through a hop that starts a fresh call context as gRPC does, and fwd2 calls a fake
//! endpoint. Each node's devices are [`FakeDevices`]; the pods are this process's own
//! namespace, which the fakes never touch.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use nsm_sdk::handlers::{begin, connect, mechanism_translation, mechanisms, update_path};
use nsm_sdk::proto::connection::{Connection, Mechanism};
use nsm_sdk::proto::connectioncontext::{ConnectionContext, IpContext, PolicyRoute};
use nsm_sdk::proto::networkservice::NetworkServiceRequest;
use nsm_sdk::wire::{cls, params, types};
use nsm_sdk::{async_trait, Chain, Cx, Handler, Next, Result};
use nsm_sdk_kernel::mechanism::{
    kernel_forwarder_client, kernel_forwarder_server, kernel_mechanism,
};
use nsm_sdk_kernel::Mtu;
use tonic::Code;

use super::fake::FakeDevices;
use super::*;
use crate::vni::{Vni, VniAllocator};

const HERE: &str = "file:///proc/self/ns/net";
const N1: &str = "192.0.2.1";
const N2: &str = "192.0.2.2";

struct Node {
    tunnel: Tunnel,
    devices: FakeDevices,
}

impl Node {
    fn new(ip: &str, mtu: u32) -> Node {
        let devices = FakeDevices::default();
        let tunnel = Tunnel::with_devices(
            ip.parse().unwrap(),
            Mtu::new(mtu).unwrap(),
            Arc::new(VniAllocator::new()),
            Arc::new(devices.clone()),
        );
        Node { tunnel, devices }
    }
    fn alloc(&self) -> &VniAllocator {
        self.tunnel.allocator()
    }
}

/// Calls the chain with a fresh server context: nothing of the caller's `Cx::ext`
/// crosses, as over gRPC.
struct Hop(Chain);

#[async_trait]
impl Handler for Hop {
    async fn request(
        &self,
        _cx: &mut Cx,
        req: NetworkServiceRequest,
        _next: Next,
    ) -> Result<Connection> {
        self.0.request(&mut Cx::server(), req).await
    }
    async fn close(&self, _cx: &mut Cx, conn: Connection, _next: Next) -> Result<()> {
        self.0.close(&mut Cx::server(), conn).await
    }
}

/// An endpoint that answers KERNEL with its interface name (unless `nameless`) and a
/// point-to-point context, recording the preferences it was offered.
#[derive(Clone, Default)]
struct FakeNse {
    nameless: bool,
    policies: Vec<PolicyRoute>,
    prefs: Arc<Mutex<Vec<Vec<Mechanism>>>>,
    closes: Arc<AtomicUsize>,
}

#[async_trait]
impl Handler for FakeNse {
    async fn request(
        &self,
        _cx: &mut Cx,
        req: NetworkServiceRequest,
        _next: Next,
    ) -> Result<Connection> {
        self.prefs
            .lock()
            .unwrap()
            .push(req.mechanism_preferences.clone());
        let mut conn = req.connection.unwrap_or_default();
        let mut m = conn.mechanism.take().unwrap_or_else(kernel_mechanism);
        if !self.nameless {
            m.parameters.insert(params::NAME.into(), "nse-1".into());
        }
        m.parameters.insert(params::INODE_URL.into(), HERE.into());
        conn.mechanism = Some(m);
        let ctx = conn.context.get_or_insert_with(ConnectionContext::default);
        ctx.ip_context = Some(IpContext {
            src_ip_addrs: vec!["172.16.1.1/32".into()],
            dst_ip_addrs: vec!["172.16.1.2/32".into()],
            policies: self.policies.clone(),
            ..Default::default()
        });
        Ok(conn)
    }
    async fn close(&self, _cx: &mut Cx, _conn: Connection, _next: Next) -> Result<()> {
        self.closes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// fwd2: VXLAN from another node's forwarder to a local endpoint.
fn endpoint_node(n: &Node, nse: impl Handler) -> Chain {
    Chain::builder()
        .push(update_path("fwd2"))
        .push(begin())
        .push(mechanisms().with(types::VXLAN, vxlan_forwarder_server(n.tunnel.clone())))
        .push(connect(
            Chain::builder()
                .push(begin())
                .push(mechanism_translation())
                .push(kernel_forwarder_client())
                .push(vxlan_forwarder_client(n.tunnel.clone()))
                .push(nse)
                .build(),
        ))
        .build()
}

/// fwd1: KERNEL from a local client, on to `next_hop`.
fn client_node(n: &Node, next_hop: impl Handler) -> Chain {
    Chain::builder()
        .push(update_path("fwd1"))
        .push(begin())
        .push(mechanisms().with(types::KERNEL, kernel_forwarder_server()))
        .push(connect(
            Chain::builder()
                .push(begin())
                .push(mechanism_translation())
                .push(kernel_forwarder_client())
                .push(vxlan_forwarder_client(n.tunnel.clone()))
                .push(next_hop)
                .build(),
        ))
        .build()
}

fn remote(n1: &Node, n2: &Node, nse: &FakeNse) -> Chain {
    client_node(n1, Hop(endpoint_node(n2, nse.clone())))
}

fn nsc_request() -> NetworkServiceRequest {
    let mut m = kernel_mechanism();
    m.parameters.insert(params::NAME.into(), "nsm-1".into());
    m.parameters.insert(params::INODE_URL.into(), HERE.into());
    NetworkServiceRequest {
        connection: Some(Connection {
            id: "c".into(),
            network_service: "svc".into(),
            ..Default::default()
        }),
        mechanism_preferences: vec![m],
    }
}

fn refresh(conn: &Connection) -> NetworkServiceRequest {
    NetworkServiceRequest {
        connection: Some(conn.clone()),
        mechanism_preferences: vec![],
    }
}

/// The id fwd2 gave the connection (its allocator key).
fn fwd2_id(conn: &Connection) -> String {
    let p = conn.path.as_ref().unwrap();
    let seg = p.path_segments.iter().find(|s| s.name == "fwd2").unwrap();
    seg.id.clone()
}

#[tokio::test]
async fn a_remote_connection_gets_a_device_in_each_pod_with_one_vni_and_the_smaller_mtu() {
    let (n1, n2) = (Node::new(N1, 1450), Node::new(N2, 1430));
    let nse = FakeNse::default();
    let chain = remote(&n1, &n2, &nse);
    let conn = chain
        .request(&mut Cx::server(), nsc_request())
        .await
        .unwrap();
    assert_eq!(conn.mechanism.as_ref().unwrap().r#type, types::KERNEL);
    assert_eq!(conn.context.as_ref().unwrap().mtu, 1430, "the smaller MTU");

    // The endpoint was offered KERNEL only.
    let offered = nse.prefs.lock().unwrap()[0].clone();
    assert_eq!(offered, [kernel_mechanism()]);

    let (s1, p1) = n1.devices.only();
    let (s2, p2) = n2.devices.only();
    assert_eq!(s1.vni, s2.vni);
    assert_eq!(
        s1.vni.parity(),
        crate::Parity::Even,
        "192.0.2.1 <= 192.0.2.2"
    );
    assert_eq!(
        (s1.local.to_string(), s1.remote.to_string()),
        (N1.into(), N2.into())
    );
    assert_eq!(
        (s2.local.to_string(), s2.remote.to_string()),
        (N2.into(), N1.into())
    );
    assert_eq!((s1.mtu.get(), s2.mtu.get(), s1.port), (1430, 1430, 4789));
    assert_eq!(p1.ifname().as_str(), "nsm-1");
    assert_eq!(p1.alias(), Some("nsm-client-c"));
    assert_eq!(p1.mtu().map(Mtu::get), Some(1430));
    assert_eq!(p1.addresses()[0].to_string(), "172.16.1.1/32");
    assert_eq!(p2.ifname().as_str(), "nse-1");
    assert_eq!(p2.alias(), Some("nsm-endpoint-c"));
    assert_eq!(p2.addresses()[0].to_string(), "172.16.1.2/32");
    assert_eq!(n2.alloc().get(&fwd2_id(&conn)), Some(s2.vni));
    assert!(n1.alloc().is_taken(s1.vni), "fwd1 recorded the VNI");

    // A refresh keeps the VNI and refreshes both devices in place.
    let again = chain
        .request(&mut Cx::server(), refresh(&conn))
        .await
        .unwrap();
    assert_eq!(n1.devices.only().0, s1);
    assert_eq!(n2.devices.only().0, s2);
    for d in [&n1.devices, &n2.devices] {
        let s = d.state();
        assert_eq!((s.ups, s.refreshes, s.downs), (1, 1, 0));
    }

    chain.close(&mut Cx::server(), again).await.unwrap();
    assert_eq!(nse.closes.load(Ordering::SeqCst), 1);
    for n in [&n1, &n2] {
        assert!(n.devices.state().live.is_empty());
        assert_eq!(n.devices.state().downs, 1);
        assert!(n.alloc().is_empty(), "VNIs freed");
    }
}

#[tokio::test]
async fn each_pod_gets_permanent_neighbours_on_the_hardware_address_the_other_node_said() {
    let Clashed {
        n1,
        n2,
        chain,
        conn,
        ..
    } = connect_after_clashes(0, 0).await;
    let (_, p1) = n1.devices.only();
    let (_, p2) = n2.devices.only();
    // The client's device: the connection's address, said before it existed.
    let client = client_mac("c");
    assert_eq!(p1.mac(), Some(client));
    assert_eq!(client[0], 0x06, "locally administered unicast");
    assert_eq!(
        client,
        client_mac("c"),
        "the same connection, the same address"
    );
    assert_ne!(client, client_mac("d"));
    // The endpoint's device: its plan's, from its first address.
    let endpoint = nsm_sdk_kernel::stable_mac("172.16.1.2".parse().unwrap());
    assert_eq!(p2.mac(), Some(endpoint));
    let entry = |ip: &str, mac| nsm_sdk_kernel::Neighbour {
        ip: ip.parse().unwrap(),
        mac,
    };
    assert_eq!(p1.neighbours(), [entry("172.16.1.2", endpoint)]);
    assert_eq!(p2.neighbours(), [entry("172.16.1.1", client)]);

    // A refresh keeps them.
    let again = chain
        .request(&mut Cx::server(), refresh(&conn))
        .await
        .unwrap();
    assert_eq!(n1.devices.only().1.neighbours(), p1.neighbours());
    assert_eq!(n2.devices.only().1.neighbours(), p2.neighbours());
    chain.close(&mut Cx::server(), again).await.unwrap();
}

#[tokio::test]
async fn without_the_hardware_addresses_of_this_sdk_the_pods_learn_their_neighbours() {
    // fwd2 of another implementation: it answers without DST_MAC.
    struct Strip(Chain);
    #[async_trait]
    impl Handler for Strip {
        async fn request(
            &self,
            _cx: &mut Cx,
            mut req: NetworkServiceRequest,
            _next: Next,
        ) -> Result<Connection> {
            let said = req
                .mechanism_preferences
                .iter_mut()
                .filter_map(|m| m.parameters.remove(SRC_MAC))
                .count();
            assert_eq!(said, 1, "fwd1 said its MAC in its VXLAN offer");
            let mut out = self.0.request(&mut Cx::server(), req).await?;
            if let Some(m) = out.mechanism.as_mut() {
                assert!(m.parameters.remove(DST_MAC).is_some(), "fwd2 said its MAC");
            }
            Ok(out)
        }
        async fn close(&self, _cx: &mut Cx, conn: Connection, _next: Next) -> Result<()> {
            self.0.close(&mut Cx::server(), conn).await
        }
    }
    let (n1, n2) = (Node::new(N1, 1450), Node::new(N2, 1450));
    let nse = FakeNse::default();
    let chain = client_node(&n1, Strip(endpoint_node(&n2, nse.clone())));
    let conn = chain
        .request(&mut Cx::server(), nsc_request())
        .await
        .unwrap();
    assert!(n1.devices.only().1.neighbours().is_empty());
    assert!(n2.devices.only().1.neighbours().is_empty());
    chain.close(&mut Cx::server(), conn).await.unwrap();
}

/// A remote connection made while the client's node refuses its next `clashes1` VNIs
/// and the endpoint's node its next `clashes2`.
struct Clashed {
    n1: Node,
    n2: Node,
    nse: FakeNse,
    chain: Chain,
    conn: Connection,
    /// The device in the client's pod.
    s1: crate::VxlanSpec,
    /// The device in the endpoint's pod.
    s2: crate::VxlanSpec,
}

async fn connect_after_clashes(clashes1: usize, clashes2: usize) -> Clashed {
    let (n1, n2) = (Node::new(N1, 1450), Node::new(N2, 1450));
    n1.devices.clash_next(clashes1);
    n2.devices.clash_next(clashes2);
    let nse = FakeNse::default();
    let chain = remote(&n1, &n2, &nse);
    let conn = chain
        .request(&mut Cx::server(), nsc_request())
        .await
        .unwrap();
    let (s1, _) = n1.devices.only();
    let (s2, _) = n2.devices.only();
    Clashed {
        n1,
        n2,
        nse,
        chain,
        conn,
        s1,
        s2,
    }
}

#[tokio::test]
async fn a_clash_in_the_clients_pod_makes_the_server_pick_another_vni() {
    let Clashed {
        n1,
        n2,
        nse,
        chain,
        conn,
        s1,
        s2,
    } = connect_after_clashes(1, 0).await;
    assert_eq!(s1.vni, s2.vni);
    // The first VNI is reserved on both nodes, the connection holds the second.
    assert_eq!(n2.alloc().len(), 2);
    assert_eq!(n2.alloc().get(&fwd2_id(&conn)), Some(s2.vni));
    assert_eq!(n1.alloc().len(), 2);
    let (ups, downs) = {
        let s = n2.devices.state();
        (s.ups, s.downs)
    };
    assert_eq!((ups, downs), (2, 1), "the endpoint's device was remade");
    assert_eq!(nse.closes.load(Ordering::SeqCst), 0);

    chain.close(&mut Cx::server(), conn).await.unwrap();
    assert_eq!(n2.alloc().len(), 1, "only the reserved VNI stays");
    assert_eq!(n1.alloc().len(), 1, "only the reserved VNI stays");
    assert!(n1.devices.state().live.is_empty() && n2.devices.state().live.is_empty());
}

#[tokio::test]
async fn clashes_beyond_the_retries_fail_unavailable_and_leave_nothing() {
    let (n1, n2) = (Node::new(N1, 1450), Node::new(N2, 1450));
    n1.devices.clash_next(CLIENT_CLASH_RETRIES + 1);
    let nse = FakeNse::default();
    let err = remote(&n1, &n2, &nse)
        .request(&mut Cx::server(), nsc_request())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err}");
    assert!(err.to_string().contains("VNI"), "{err}");
    assert_eq!(
        nse.closes.load(Ordering::SeqCst),
        1,
        "the endpoint is closed"
    );
    assert!(n1.devices.state().live.is_empty() && n2.devices.state().live.is_empty());
    // What stays are the VNIs reserved after each clash; no connection holds one.
    assert_eq!(n2.alloc().len(), CLIENT_CLASH_RETRIES);
    assert_eq!(n1.alloc().len(), CLIENT_CLASH_RETRIES + 1);
}

#[tokio::test]
async fn a_clash_in_the_endpoints_pod_is_resolved_there_and_the_answer_carries_the_new_vni() {
    let Clashed {
        n2,
        chain,
        conn,
        s1,
        s2,
        ..
    } = connect_after_clashes(0, 2).await;
    assert_eq!(s1.vni, s2.vni, "the client's node got the final VNI");
    assert_eq!(n2.alloc().get(&fwd2_id(&conn)), Some(s2.vni));
    assert_eq!(n2.alloc().len(), 3, "two reserved, one held");
    assert_eq!(s2.vni.parity(), crate::Parity::Even);
    chain.close(&mut Cx::server(), conn).await.unwrap();
    assert_eq!(n2.alloc().len(), 2);
}

#[tokio::test]
async fn a_failure_after_the_endpoint_answered_closes_it_and_frees_the_vni() {
    let (n1, n2) = (Node::new(N1, 1450), Node::new(N2, 1450));
    let nse = FakeNse {
        nameless: true,
        ..Default::default()
    };
    let err = remote(&n1, &n2, &nse)
        .request(&mut Cx::server(), nsc_request())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Internal, "{err}");
    assert!(err.to_string().contains("interface name"), "{err}");
    assert_eq!(nse.closes.load(Ordering::SeqCst), 1);
    for n in [&n1, &n2] {
        assert!(n.devices.state().live.is_empty());
        assert!(n.alloc().is_empty());
    }
}

#[tokio::test]
async fn a_failure_in_the_clients_pod_closes_the_remote_side_and_frees_both_vnis() {
    let (n1, n2) = (Node::new(N1, 1450), Node::new(N2, 1450));
    // A policy route the client's end cannot have (an unknown protocol): the endpoint's
    // device exists by then, the client's cannot be planned.
    let nse = FakeNse {
        policies: vec![PolicyRoute {
            proto: "tcpx".into(),
            ..Default::default()
        }],
        ..Default::default()
    };
    let err = remote(&n1, &n2, &nse)
        .request(&mut Cx::server(), nsc_request())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    assert_eq!(nse.closes.load(Ordering::SeqCst), 1);
    for n in [&n1, &n2] {
        assert!(n.devices.state().live.is_empty());
        assert!(n.alloc().is_empty());
    }
}

fn vxlan(pairs: &[(&str, &str)]) -> Mechanism {
    let mut m = vxlan_mechanism();
    for (k, v) in pairs {
        m.parameters.insert(k.to_string(), v.to_string());
    }
    m
}

fn remote_request(id: &str, m: Mechanism) -> NetworkServiceRequest {
    NetworkServiceRequest {
        connection: Some(Connection {
            id: id.into(),
            network_service: "svc".into(),
            ..Default::default()
        }),
        mechanism_preferences: vec![m],
    }
}

#[tokio::test]
async fn a_bad_vxlan_offer_is_refused_naming_the_parameter_before_anything_is_allocated() {
    let n2 = Node::new(N2, 1450);
    let nse = FakeNse::default();
    let chain = endpoint_node(&n2, nse.clone());
    let ok = [(params::SRC_IP, N1), (params::SRC_PORT, "4789")];
    let with = |extra: &[(&'static str, &'static str)]| {
        let mut v: Vec<(&str, &str)> = ok
            .iter()
            .filter(|(k, _)| !extra.iter().any(|(e, _)| e == k))
            .copied()
            .collect();
        v.extend(extra.iter().filter(|(_, val)| !val.is_empty()));
        vxlan(&v)
    };
    for (m, named) in [
        (with(&[(params::SRC_IP, "")]), params::SRC_IP),
        (with(&[(params::SRC_IP, "192.0.2")]), params::SRC_IP),
        (with(&[(params::SRC_IP, "2001:db8::1")]), params::SRC_IP),
        (with(&[(params::SRC_PORT, "")]), params::SRC_PORT),
        (with(&[(params::SRC_PORT, "0")]), params::SRC_PORT),
        (with(&[(params::SRC_PORT, "4790")]), params::SRC_PORT),
        (with(&[(params::MTU, "big")]), params::MTU),
        (with(&[(params::MTU, "70000")]), params::MTU),
        (with(&[(params::VNI, "0")]), params::VNI),
        (with(&[(params::VNI, "16777216")]), params::VNI),
        (with(&[(ORIG_SRC_IP, "x")]), ORIG_SRC_IP),
        (with(&[(SRC_MAC, "06:01:02")]), SRC_MAC),
    ] {
        let err = chain
            .request(&mut Cx::server(), remote_request("r", m.clone()))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{m:?}: {err}");
        assert!(err.to_string().contains(named), "{named}: {err}");
    }
    assert!(
        nse.prefs.lock().unwrap().is_empty(),
        "the endpoint was called"
    );
    assert!(n2.alloc().is_empty());
    assert!(n2.devices.state().live.is_empty());
}

#[tokio::test]
async fn a_carried_vni_is_kept_when_free_and_replaced_when_taken_or_of_the_wrong_parity() {
    let n2 = Node::new(N2, 1450);
    let chain = endpoint_node(&n2, FakeNse::default());
    let offer = |vni: &'static str| {
        vxlan(&[
            (params::SRC_IP, N1),
            (params::SRC_PORT, "4789"),
            (params::VNI, vni),
        ])
    };
    let vni_of = |c: &Connection| {
        Vni::parse(&c.mechanism.as_ref().unwrap().parameters[params::VNI]).unwrap()
    };
    // A forwarder that restarted: the connection keeps its VNI.
    let a = chain
        .request(&mut Cx::server(), remote_request("a", offer("1000")))
        .await
        .unwrap();
    assert_eq!(vni_of(&a).get(), 1000);
    assert_eq!(n2.alloc().get("a").map(Vni::get), Some(1000));
    // Another connection carrying it gets another even one.
    let b = chain
        .request(&mut Cx::server(), remote_request("b", offer("1000")))
        .await
        .unwrap();
    assert_ne!(vni_of(&b).get(), 1000);
    assert_eq!(vni_of(&b).parity(), crate::Parity::Even);
    // An odd VNI does not fit 192.0.2.1 -> 192.0.2.2.
    let c = chain
        .request(&mut Cx::server(), remote_request("c", offer("1001")))
        .await
        .unwrap();
    assert_eq!(vni_of(&c).parity(), crate::Parity::Even);
    // The answer names this node's end of the tunnel.
    let m = a.mechanism.as_ref().unwrap();
    assert_eq!(m.parameters[params::DST_IP], N2);
    assert_eq!(m.parameters[params::DST_PORT], "4789");
    assert_eq!(m.parameters[params::MTU], "1450");
    assert_eq!(m.cls, cls::REMOTE);
    let vnis: std::collections::BTreeSet<u32> = n2.devices.state().live.keys().copied().collect();
    assert_eq!(vnis.len(), 3);
    for conn in [a, b, c] {
        chain.close(&mut Cx::server(), conn).await.unwrap();
    }
    assert!(n2.alloc().is_empty());
    assert!(n2.devices.state().live.is_empty());
}

#[tokio::test]
async fn the_offer_carries_this_nodes_tunnel_and_a_kernel_answer_is_left_to_the_kernel_handler() {
    let n1 = Node::new(N1, 1450);
    let nse = FakeNse::default();
    // No kernel client here: what the VXLAN client does alone.
    let chain = Chain::builder()
        .push(begin())
        .push(mechanisms().with(types::KERNEL, kernel_forwarder_server()))
        .push(connect(
            Chain::builder()
                .push(begin())
                .push(mechanism_translation())
                .push(vxlan_forwarder_client(n1.tunnel.clone()))
                .push(nse.clone())
                .build(),
        ))
        .build();
    let mut req = nsc_request();
    req.mechanism_preferences[0]
        .parameters
        .insert(params::MTU.into(), "1400".into());
    chain.request(&mut Cx::server(), req).await.unwrap();
    let offered = nse.prefs.lock().unwrap()[0].clone();
    let mac = nsm_sdk_kernel::fmt_mac(&client_mac("c"));
    assert_eq!(
        offered,
        [vxlan(&[
            (params::SRC_IP, N1),
            (params::SRC_PORT, "4789"),
            (params::MTU, "1400"),
            (SRC_MAC, &mac),
        ])]
    );
    assert!(n1.devices.state().live.is_empty());
    assert!(n1.alloc().is_empty());
}

#[test]
fn without_a_tunnel_the_forwarder_serves_kernel_and_noop() {
    let (server, client) = forwarder_mechanisms(None);
    assert_eq!(server.supported(), ["KERNEL", "NOOP"]);
    assert_eq!(client.len(), 2);
}

#[tokio::test]
async fn with_a_tunnel_the_forwarder_also_serves_vxlan() {
    // Opening the node's netlink socket needs the rights a forwarder has.
    let tunnel = match Tunnel::builder("192.0.2.1".parse().unwrap())
        .underlay_mtu(1500)
        .build()
        .await
    {
        Ok(t) => t,
        Err(e) => {
            eprintln!("skipped: cannot open a netlink socket here: {e}");
            return;
        }
    };
    assert_eq!(tunnel.mtu().get(), 1450);
    let (server, client) = forwarder_mechanisms(Some(tunnel));
    assert_eq!(server.supported(), ["KERNEL", "NOOP", "VXLAN"]);
    assert_eq!(client.len(), 3);
}
