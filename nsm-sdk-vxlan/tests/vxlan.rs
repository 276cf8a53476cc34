//! VXLAN devices against the real kernel, as root: two "nodes" joined by a veth
//! underlay (192.0.2.1/24 and 192.0.2.2/24) and one pod on each, all namespaces of
//! this test (`ip netns add nsmv-<pid>-<n>`, deleted by a guard even on failure).
//! What the kernel holds is checked with `ip`, traffic with `ping` from inside a
//! pod. Without root (or `ip`/`ping`) the test prints a skip line and passes.

use std::os::unix::fs::MetadataExt;
use std::sync::atomic::{AtomicU32, Ordering};

use nsm_sdk_kernel::{veth_alias, IfName, Mtu, NetNs, Plan, PodSide, Route, RtNetlink};
use nsm_sdk_vxlan::{tunnel_mtu, vxlan_up, Error, Vni, VxlanSpec};

static NEXT: AtomicU32 = AtomicU32::new(0);

struct Ns {
    name: String,
}

impl Ns {
    fn new() -> Ns {
        let name = format!(
            "nsmv-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let _ = run("ip", &["netns", "del", &name]);
        let out = run("ip", &["netns", "add", &name]);
        assert!(out.0, "ip netns add {name}: {}", out.1);
        self_ip(&name, &["link", "set", "lo", "up"]);
        Ns { name }
    }

    fn open(&self) -> NetNs {
        NetNs::named(&self.name).unwrap()
    }

    fn ip(&self, args: &[&str]) -> String {
        self_ip(&self.name, args)
    }

    fn links(&self) -> Vec<String> {
        let out = self.ip(&["-o", "link", "show"]);
        let mut v: Vec<String> = out
            .lines()
            // Link lines start with the index; `ip` may also print a warning (on
            // stderr, merged here) such as "Peer netns reference is invalid." when a
            // namespace another test used is gone.
            .filter(|l| l.starts_with(|c: char| c.is_ascii_digit()))
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap_or(n).to_string())
            .collect();
        v.sort();
        v
    }

    fn ping(&self, args: &[&str]) -> bool {
        let mut full = vec!["netns", "exec", &self.name, "ping", "-c1", "-W1"];
        full.extend_from_slice(args);
        run("ip", &full).0
    }

    /// (tx packets, rx packets) of `dev`.
    fn counters(&self, dev: &str) -> (u64, u64) {
        let out = self.ip(&["-j", "-s", "link", "show", dev]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        let stats = &v[0]["stats64"];
        (
            stats["tx"]["packets"].as_u64().unwrap(),
            stats["rx"]["packets"].as_u64().unwrap(),
        )
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = run("ip", &["netns", "del", &self.name]);
    }
}

fn self_ip(ns: &str, args: &[&str]) -> String {
    let mut full = vec!["-n", ns];
    full.extend_from_slice(args);
    let (ok, out) = run("ip", &full);
    assert!(ok, "ip {full:?}: {out}");
    out
}

fn run(cmd: &str, args: &[&str]) -> (bool, String) {
    match std::process::Command::new(cmd).args(args).output() {
        Ok(o) => (
            o.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
        ),
        Err(e) => (false, e.to_string()),
    }
}

fn can_run() -> bool {
    let root = std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0);
    let tools = run("ip", &["-V"]).0 && run("ping", &["-V"]).0;
    if !root || !tools {
        eprintln!("skipped: kernel tests need root, ip and ping (root={root}, tools={tools})");
    }
    root && tools
}

/// Two nodes joined by a veth underlay `ul0` with MTU 1500.
fn underlay() -> (Ns, Ns) {
    let (n1, n2) = (Ns::new(), Ns::new());
    n1.ip(&[
        "link", "add", "ul0", "type", "veth", "peer", "name", "ul0", "netns", &n2.name,
    ]);
    for (n, addr) in [(&n1, "192.0.2.1/24"), (&n2, "192.0.2.2/24")] {
        n.ip(&["addr", "add", addr, "dev", "ul0"]);
        n.ip(&["link", "set", "ul0", "mtu", "1500", "up"]);
    }
    (n1, n2)
}

fn plan(side: PodSide, own: &str, peer: &str) -> Plan {
    Plan::new(IfName::new("nsm-vx").unwrap())
        .with_alias(veth_alias(side, "conn-1"))
        .with_address(format!("{own}/32").parse().unwrap())
        .with_route(Route::link(format!("{peer}/32").parse().unwrap()))
}

#[tokio::test]
async fn a_vxlan_device_in_each_pod_carries_pings_over_the_node_underlay() {
    if !can_run() {
        return;
    }
    let (n1, n2) = underlay();
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
    assert!(p1.ping(&["172.16.70.2"]), "pod1 -> pod2 across the tunnel");
    assert!(p2.ping(&["172.16.70.1"]), "pod2 -> pod1 across the tunnel");
    let (tx1, rx1) = n1.counters("ul0");
    assert!(
        tx1 >= tx0 + 2 && rx1 >= rx0 + 2,
        "underlay tx {tx0}->{tx1}, rx {rx0}->{rx1}"
    );

    // The tunnel MTU exactly: 1450 - 28 = 1422 bytes of ICMP payload with DF.
    assert!(
        p1.ping(&["-M", "do", "-s", "1422", "172.16.70.2"]),
        "full-size DF ping"
    );
    assert!(
        !p1.ping(&["-M", "do", "-s", "1423", "172.16.70.2"]),
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
    // Another port lifts the conflict (KERNEL.md 3.2).
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
async fn a_name_taken_in_the_pod_is_link_exists_not_a_vni_clash() {
    if !can_run() {
        return;
    }
    let (n1, _n2) = underlay();
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
