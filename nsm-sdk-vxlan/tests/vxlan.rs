//! VXLAN devices against the real kernel, as root: two "nodes" joined by a veth
//! underlay (192.0.2.1/24 and 192.0.2.2/24) and one pod on each, all namespaces of
//! this test (`ip netns add nsmt-<pid>-<n>`, deleted by a guard even on failure).
//! What the kernel holds is checked with `ip`, traffic with `ping` from inside a
//! pod. Without root (or `ip`/`ping`) the test prints a skip line and passes.

use nsm_sdk_kernel::{veth_alias, IfName, Mtu, Plan, PodSide, Route, RtNetlink};
use nsm_sdk_vxlan::{tunnel_mtu, vxlan_up, Error, Vni, VxlanSpec};
use nsm_testkit::{underlay, Ns};

macro_rules! require_root {
    () => {
        nsm_testkit::require_root!("VXLAN kernel tests")
    };
}

fn plan(side: PodSide, own: &str, peer: &str) -> Plan {
    Plan::new(IfName::new("nsm-vx").unwrap())
        .with_alias(veth_alias(side, "conn-1"))
        .with_address(format!("{own}/32").parse().unwrap())
        .with_route(Route::link(format!("{peer}/32").parse().unwrap()))
}

#[tokio::test]
async fn a_vxlan_device_in_each_pod_carries_pings_over_the_node_underlay() {
    require_root!();
    let [n1, n2] = underlay();
    let (p1, p2) = (Ns::new(), Ns::new());
    let node1 = RtNetlink::open(&n1.open()).await.unwrap();
    let node2 = RtNetlink::open(&n2.open()).await.unwrap();
    let (u1, u2) = ("192.0.2.1".parse().unwrap(), "192.0.2.2".parse().unwrap());
    let vni = Vni::new(5000).unwrap();
    let mtu = tunnel_mtu(1500, u1).unwrap();
    assert_eq!(mtu.get(), 1450);

    let client = vxlan_up(
        &node1,
        &p1.open(),
        &VxlanSpec::new(vni, u1, u2, mtu),
        plan(PodSide::Client, "172.16.70.1", "172.16.70.2"),
    )
    .await
    .unwrap();
    let endpoint = vxlan_up(
        &node2,
        &p2.open(),
        &VxlanSpec::new(vni, u2, u1, mtu),
        plan(PodSide::Endpoint, "172.16.70.2", "172.16.70.1"),
    )
    .await
    .unwrap();

    // The device lives in the pod, its socket in the node, as asked.
    for (p, local, remote, alias) in [
        (&p1, "192.0.2.1", "192.0.2.2", "nsm-client-conn-1"),
        (&p2, "192.0.2.2", "192.0.2.1", "nsm-endpoint-conn-1"),
    ] {
        assert_eq!(p.links(), ["lo", "nsm-vx"]);
        let d = p.ip(&["-d", "link", "show", "nsm-vx"]);
        for want in [
            "vxlan id 5000",
            &format!("remote {remote}"),
            &format!("local {local}"),
            "dstport 4789",
            "mtu 1450",
            "link-netns",
            &format!("alias {alias}"),
            ",UP",
        ] {
            assert!(d.contains(want), "{want:?} missing in {d}");
        }
    }
    assert_eq!(
        n1.links(),
        ["lo", "ul0"],
        "nothing of the tunnel in the node"
    );
    assert!(p1
        .ip(&["addr", "show", "nsm-vx"])
        .contains("172.16.70.1/32"));
    let routes = p1.ip(&["route", "show", "dev", "nsm-vx"]);
    assert!(
        routes
            .lines()
            .any(|r| r.starts_with("172.16.70.2 ") && r.contains("scope link")),
        "{routes}"
    );

    let (tx0, rx0) = n1.counters("ul0");
    assert!(
        p1.ping_with(&["172.16.70.2"]),
        "pod1 -> pod2 across the tunnel"
    );
    assert!(
        p2.ping_with(&["172.16.70.1"]),
        "pod2 -> pod1 across the tunnel"
    );
    let (tx1, rx1) = n1.counters("ul0");
    assert!(
        tx1 >= tx0 + 2 && rx1 >= rx0 + 2,
        "underlay tx {tx0}->{tx1}, rx {rx0}->{rx1}"
    );

    // The tunnel MTU exactly: 1450 - 28 = 1422 bytes of ICMP payload with DF.
    assert!(
        p1.ping_with(&["-M", "do", "-s", "1422", "172.16.70.2"]),
        "full-size DF ping"
    );
    assert!(
        !p1.ping_with(&["-M", "do", "-s", "1423", "172.16.70.2"]),
        "one byte more does not fit"
    );

    // A second device with the same VNI and port from the same node: the clash error,
    // and nothing left behind by the failed attempt.
    let p3 = Ns::new();
    let clash = vxlan_up(
        &node1,
        &p3.open(),
        &VxlanSpec::new(vni, u1, "192.0.2.3".parse().unwrap(), mtu),
        plan(PodSide::Client, "172.16.70.5", "172.16.70.6"),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(
            clash,
            Error::VniClash {
                vni: 5000,
                port: 4789,
                ..
            }
        ),
        "{clash:?}"
    );
    assert!(nsm_sdk::Error::from(clash).is_retryable());
    assert_eq!(p3.links(), ["lo"]);
    // Another port lifts the conflict (docs/KERNEL.md 3.2).
    let other_port = vxlan_up(
        &node1,
        &p3.open(),
        &VxlanSpec::new(vni, u1, "192.0.2.3".parse().unwrap(), mtu).with_port(4790),
        plan(PodSide::Client, "172.16.70.5", "172.16.70.6"),
    )
    .await
    .unwrap();
    other_port.down().await.unwrap();

    client.down().await.unwrap();
    endpoint.down().await.unwrap();
    for ns in [&p1, &p2, &p3] {
        assert_eq!(ns.links(), ["lo"]);
    }
    for ns in [&n1, &n2] {
        assert_eq!(ns.links(), ["lo", "ul0"]);
    }
    // The VNI is released in the node: the same VNI can be used again.
    let again = vxlan_up(
        &node1,
        &p1.open(),
        &VxlanSpec::new(vni, u1, u2, mtu),
        plan(PodSide::Client, "172.16.70.1", "172.16.70.2"),
    )
    .await
    .unwrap();
    again.down().await.unwrap();
    assert_eq!(p1.links(), ["lo"]);
}

#[tokio::test]
async fn a_device_half_made_by_a_forwarder_killed_before_its_alias_is_replaced() {
    require_root!();
    let [n1, _n2] = underlay();
    let p1 = Ns::new();
    // What a forwarder killed right after RTM_NEWLINK leaves: the device in the mesh's
    // group, no alias (here made by hand in the pod, with another VNI).
    let group = nsm_sdk_kernel::MESH_GROUP.to_string();
    p1.ip(&[
        "link", "add", "nsm-vx", "group", &group, "type", "vxlan", "id", "78", "dstport", "4789",
    ]);
    let node1 = RtNetlink::open(&n1.open()).await.unwrap();
    let link = vxlan_up(
        &node1,
        &p1.open(),
        &VxlanSpec::new(
            Vni::new(77).unwrap(),
            "192.0.2.1".parse().unwrap(),
            "192.0.2.2".parse().unwrap(),
            Mtu::new(1450).unwrap(),
        ),
        plan(PodSide::Client, "172.16.70.1", "172.16.70.2"),
    )
    .await
    .unwrap();
    let shown = p1.ip(&["-d", "link", "show", "dev", "nsm-vx"]);
    assert!(shown.contains("vxlan id 77"), "the new device: {shown}");
    assert!(
        shown.contains(&format!("group {group}")),
        "born in the mesh's group: {shown}"
    );
    link.down().await.unwrap();
    assert_eq!(p1.links(), ["lo"]);
}

#[tokio::test]
async fn a_name_taken_in_the_pod_is_link_exists_not_a_vni_clash() {
    require_root!();
    let [n1, _n2] = underlay();
    let p1 = Ns::new();
    p1.ip(&[
        "link", "add", "nsm-vx", "type", "veth", "peer", "name", "other",
    ]);
    let node1 = RtNetlink::open(&n1.open()).await.unwrap();
    let u1 = "192.0.2.1".parse().unwrap();
    let err = vxlan_up(
        &node1,
        &p1.open(),
        &VxlanSpec::new(
            Vni::new(77).unwrap(),
            u1,
            "192.0.2.2".parse().unwrap(),
            Mtu::new(1450).unwrap(),
        ),
        plan(PodSide::Client, "172.16.70.1", "172.16.70.2"),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, Error::Kernel(nsm_sdk_kernel::Error::LinkExists { .. })),
        "{err:?}"
    );
    assert_eq!(n1.links(), ["lo", "ul0"]);
}
