//! The kernel data plane against the real kernel, as root.
//!
//! Each test makes its own namespaces (`ip netns add nsmt-<pid>-<n>`), removed by a
//! guard even when the test fails, and uses only documentation/private addresses
//! inside them. What the kernel holds is checked with `ip` (an independent observer),
//! traffic with `ping` from inside a namespace. Without root (or without `ip`/`ping`)
//! each test prints a skip line and passes.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::Arc;

use nsm_testkit::lab::run;
use nsm_testkit::Ns;

use nsm_proto::connectioncontext::{
    ConnectionContext, IpContext, PolicyRoute, Route as ProtoRoute,
};
use std::time::{Duration, Instant};

use nsm_proto::connection::Connection;
use nsm_sdk_kernel::liveness::allow_ping;
use nsm_sdk_kernel::{
    down, kernel_side_up, ping, ping_liveness, plan_from_context, undo, veth_alias, veth_up, Error,
    IfName, NetNs, Netlink, PingOptions, Plan, PodSide, Route, RtNetlink, VethEnd,
};

macro_rules! require_root {
    () => {
        nsm_testkit::require_root!("kernel tests")
    };
}

fn route(prefix: &str) -> ProtoRoute {
    ProtoRoute {
        prefix: prefix.into(),
        next_hop: String::new(),
    }
}

/// What a point-to-point IPAM hands out: dual stack, MTU 1450.
fn context(client: &str, endpoint: &str, client6: &str, endpoint6: &str) -> ConnectionContext {
    ConnectionContext {
        ip_context: Some(IpContext {
            src_ip_addrs: vec![format!("{client}/32"), format!("{client6}/128")],
            dst_ip_addrs: vec![format!("{endpoint}/32"), format!("{endpoint6}/128")],
            src_routes: vec![route(&format!("{endpoint}/32")), route("192.0.2.0/24")],
            dst_routes: vec![route(&format!("{client}/32"))],
            ..Default::default()
        }),
        mtu: 1450,
        ..Default::default()
    }
}

fn default_context() -> ConnectionContext {
    context("172.16.1.2", "172.16.1.1", "2001:db8:1::2", "2001:db8:1::1")
}

fn plans(ctx: &ConnectionContext) -> (Plan, Plan) {
    (
        plan_from_context(ctx, PodSide::Client, "nsm-1").unwrap(),
        plan_from_context(ctx, PodSide::Endpoint, "nsm-1").unwrap(),
    )
}

#[tokio::test]
async fn a_veth_born_in_both_pods_carries_pings_between_the_context_addresses() {
    require_root!();
    let (a, b) = (Ns::new(), Ns::new());
    let (client, endpoint) = plans(&default_context());
    let created = kernel_side_up(&a.open(), &b.open(), client, endpoint)
        .await
        .unwrap();

    for ns in [&a, &b] {
        assert_eq!(ns.links(), ["lo", "nsm-1"], "born under its final name");
        let link = ns.ip(&["-d", "link", "show", "nsm-1"]);
        assert!(link.contains("mtu 1450") && link.contains("veth"), "{link}");
        assert!(link.contains(",UP"), "{link}");
    }
    assert_eq!(a.addresses("nsm-1"), ["172.16.1.2/32", "2001:db8:1::2/128"]);
    assert_eq!(b.addresses("nsm-1"), ["172.16.1.1/32", "2001:db8:1::1/128"]);
    let routes = a.routes("nsm-1");
    assert!(
        routes.iter().any(|r| r.starts_with("172.16.1.1 ")),
        "{routes:?}"
    );
    assert!(
        routes
            .iter()
            .any(|r| r.starts_with("192.0.2.0/24 via 172.16.1.1") && r.contains("onlink")),
        "{routes:?}"
    );
    assert!(
        routes.iter().any(|r| r.starts_with("2001:db8:1::1 ")),
        "{routes:?}"
    );

    assert!(a.ping_with(&["172.16.1.1"]), "client -> endpoint");
    assert!(b.ping_with(&["172.16.1.2"]), "endpoint -> client");
    assert!(
        a.ping_with(&["-6", "2001:db8:1::1"]),
        "client -> endpoint, IPv6"
    );
    assert!(
        a.ping_with(&["-M", "do", "-s", "1422", "172.16.1.1"]),
        "a full 1450-byte packet with DF"
    );
    assert!(
        !a.ping_with(&["-M", "do", "-s", "1423", "172.16.1.1"]),
        "one byte more does not fit the MTU"
    );

    down(created).await.unwrap();
    assert_eq!(a.links(), ["lo"]);
    assert_eq!(b.links(), ["lo"]);
}

#[tokio::test]
async fn the_kernel_filters_an_address_dump_by_link_and_the_fallback_gives_the_same() {
    require_root!();
    // A namespace with many links and addresses, as a busy pod or forwarder has.
    let ns = Ns::new();
    const LINKS: usize = 150;
    let mut batch = String::new();
    for i in 0..LINKS {
        batch.push_str(&format!(
            "link add v{i}a type veth peer name v{i}b\naddress add 10.{}.{}.1/32 dev v{i}a\naddress add fd00::{i:x}/128 dev v{i}a nodad\n",
            i / 200,
            i % 200
        ));
    }
    let file = std::env::temp_dir().join(format!("{}-batch", ns.name));
    std::fs::write(&file, batch).unwrap();
    let (ok, out) = run("ip", &["-n", &ns.name, "-batch", file.to_str().unwrap()]);
    let _ = std::fs::remove_file(&file);
    assert!(ok, "ip -batch: {out}");
    let nl = RtNetlink::open(&ns.open()).await.unwrap();
    assert!(nl.kernel_filters_dumps(), "strict checking on this kernel");
    let name = IfName::new("v7a").unwrap();
    let want: Vec<ipnet::IpNet> = vec![
        "10.0.7.1/32".parse().unwrap(),
        "fd00::7/128".parse().unwrap(),
    ];
    /// The mean time of one dump of `name`'s addresses, each checked against `want`.
    async fn time(nl: &RtNetlink, name: &IfName, want: &[ipnet::IpNet]) -> Duration {
        const DUMPS: u32 = 200;
        let started = Instant::now();
        for _ in 0..DUMPS {
            let mut got = nl.addresses(name).await.unwrap();
            got.sort();
            assert_eq!(got, want);
        }
        started.elapsed() / DUMPS
    }
    let filtered = time(&nl, &name, &want).await;
    assert!(
        nl.kernel_filters_dumps(),
        "the kernel took the filtered dumps"
    );
    nl.filter_dumps_here();
    let here = time(&nl, &name, &want).await;
    // The effect (the same answer from a dump of 2 addresses instead of the
    // namespace's): shown, not asserted.
    eprintln!(
        "address dump of one link among {LINKS}: kernel-filtered {filtered:?}, filtered here {here:?}"
    );
}

#[tokio::test]
async fn an_on_demand_handle_opens_a_socket_for_its_work_and_lets_it_go() {
    require_root!();
    let a = Ns::new();
    let nl = nsm_sdk_kernel::OnDemandNetlink::new(a.open());
    assert!(!nl.is_open(), "nothing open before the first operation");
    let names: Vec<String> = nl
        .links()
        .await
        .unwrap()
        .into_iter()
        .map(|l| l.name)
        .collect();
    assert_eq!(names, ["lo"]);
    assert!(nl.is_open());
    nl.release();
    assert!(!nl.is_open(), "released");
    // The next operation opens a new socket in the same namespace.
    assert_eq!(nl.links().await.unwrap().len(), 1);
    assert!(nl.is_open());
}

#[tokio::test]
async fn undo_removes_addresses_and_routes_and_down_removes_the_pair() {
    require_root!();
    let (a, b) = (Ns::new(), Ns::new());
    let (client, endpoint) = plans(&default_context());
    let created = kernel_side_up(&a.open(), &b.open(), client.clone(), endpoint)
        .await
        .unwrap();
    assert!(!a.routes("nsm-1").is_empty());

    let nl = RtNetlink::open(&a.open()).await.unwrap();
    undo(&client, &nl).await.unwrap();
    assert!(
        a.addresses("nsm-1").is_empty(),
        "{:?}",
        a.addresses("nsm-1")
    );
    assert!(a.routes("nsm-1").is_empty(), "{:?}", a.routes("nsm-1"));
    assert_eq!(a.links(), ["lo", "nsm-1"], "undo leaves the link");
    assert!(
        !b.addresses("nsm-1").is_empty(),
        "the other side is untouched"
    );

    down(created).await.unwrap();
    assert_eq!(a.links(), ["lo"]);
    assert_eq!(b.links(), ["lo"]);
}

#[tokio::test]
async fn each_pod_knows_the_other_end_permanently_so_the_pair_works_without_arp_even_after_a_refresh_moves_it(
) {
    require_root!();
    let (a, b) = (Ns::new(), Ns::new());
    let (client, endpoint) = plans(&default_context());
    let mut created = kernel_side_up(&a.open(), &b.open(), client, endpoint)
        .await
        .unwrap();
    let (mac_a, mac_b) = (a.lladdr("nsm-1"), b.lladdr("nsm-1"));
    assert_eq!(
        a.neighbours("nsm-1"),
        [
            format!("172.16.1.1 lladdr {mac_b} PERMANENT"),
            format!("2001:db8:1::1 lladdr {mac_b} PERMANENT"),
        ]
    );
    assert_eq!(
        b.neighbours("nsm-1"),
        [
            format!("172.16.1.2 lladdr {mac_a} PERMANENT"),
            format!("2001:db8:1::2 lladdr {mac_a} PERMANENT"),
        ]
    );
    // With ARP and neighbour solicitations dropped only those entries can carry a
    // packet.
    a.drop_neighbour_discovery();
    b.drop_neighbour_discovery();
    assert!(
        a.ping_with(&["172.16.1.1"]),
        "client -> endpoint without ARP"
    );
    assert!(
        b.ping_with(&["-6", "2001:db8:1::2"]),
        "endpoint -> client, IPv6"
    );

    // A refresh moves both ends to new addresses: the links keep the hardware
    // addresses of their birth (which the new first addresses would not give), and
    // the entries follow the addresses, naming those.
    let moved = context("172.16.9.2", "172.16.9.1", "2001:db8:9::2", "2001:db8:9::1");
    let (client, endpoint) = plans(&moved);
    assert_ne!(client.mac(), created.plan(PodSide::Client).mac());
    created.refresh(PodSide::Client, client).await.unwrap();
    created.refresh(PodSide::Endpoint, endpoint).await.unwrap();
    assert_eq!(
        (a.lladdr("nsm-1"), b.lladdr("nsm-1")),
        (mac_a.clone(), mac_b.clone())
    );
    assert_eq!(
        a.neighbours("nsm-1"),
        [
            format!("172.16.9.1 lladdr {mac_b} PERMANENT"),
            format!("2001:db8:9::1 lladdr {mac_b} PERMANENT"),
        ]
    );
    assert_eq!(
        b.neighbours("nsm-1"),
        [
            format!("172.16.9.2 lladdr {mac_a} PERMANENT"),
            format!("2001:db8:9::2 lladdr {mac_a} PERMANENT"),
        ]
    );
    assert!(
        a.ping_with(&["172.16.9.1"]),
        "after the refresh, without ARP"
    );
    assert!(
        a.ping_with(&["-6", "2001:db8:9::1"]),
        "after the refresh, IPv6"
    );
    down(created).await.unwrap();
    assert_eq!(
        (a.links(), b.links()),
        (vec!["lo".to_string()], vec!["lo".to_string()])
    );
}

#[tokio::test]
async fn a_refresh_with_the_same_plan_changes_nothing_and_new_addresses_replace_the_old() {
    require_root!();
    let (a, b) = (Ns::new(), Ns::new());
    let (client, endpoint) = plans(&default_context());
    let mut created = kernel_side_up(&a.open(), &b.open(), client.clone(), endpoint.clone())
        .await
        .unwrap();
    let link_before = a.ip(&["link", "show", "nsm-1"]);
    let (addrs, routes) = (a.addresses("nsm-1"), a.routes("nsm-1"));

    // Watch the namespace: an unchanged refresh must not send a single change.
    let mut monitor = tokio::process::Command::new("ip")
        .args(["-n", &a.name, "monitor", "address", "route", "link"])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    created.refresh(PodSide::Client, client).await.unwrap();
    created.refresh(PodSide::Endpoint, endpoint).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    monitor.start_kill().unwrap();
    let events = monitor.wait_with_output().await.unwrap();
    assert!(
        events.stdout.is_empty(),
        "an unchanged refresh changed the kernel: {}",
        String::from_utf8_lossy(&events.stdout)
    );
    assert_eq!(a.ip(&["link", "show", "nsm-1"]), link_before);
    assert_eq!((a.addresses("nsm-1"), a.routes("nsm-1")), (addrs, routes));

    let ctx = context("172.16.1.6", "172.16.1.5", "2001:db8:1::6", "2001:db8:1::5");
    let (client, endpoint) = plans(&ctx);
    created.refresh(PodSide::Client, client).await.unwrap();
    created.refresh(PodSide::Endpoint, endpoint).await.unwrap();
    assert_eq!(a.addresses("nsm-1"), ["172.16.1.6/32", "2001:db8:1::6/128"]);
    assert_eq!(b.addresses("nsm-1"), ["172.16.1.5/32", "2001:db8:1::5/128"]);
    let routes = a.routes("nsm-1");
    assert!(
        routes
            .iter()
            .all(|r| !r.contains("172.16.1.1") && !r.contains("2001:db8:1::1 ")),
        "old routes are gone: {routes:?}"
    );
    assert!(
        routes
            .iter()
            .any(|r| r.starts_with("192.0.2.0/24 via 172.16.1.5")),
        "{routes:?}"
    );
    assert!(a.ping_with(&["172.16.1.5"]));
    assert!(a.ping_with(&["-6", "2001:db8:1::5"]));
    assert!(
        !a.ping_with(&["172.16.1.1"]),
        "the old endpoint address is gone"
    );

    down(created).await.unwrap();
    assert_eq!(
        (a.links(), b.links()),
        (vec!["lo".into()], vec!["lo".into()])
    );
}

#[tokio::test]
async fn a_refresh_that_changes_only_the_client_address_keeps_the_client_routes() {
    require_root!();
    let (a, b) = (Ns::new(), Ns::new());
    let (client, endpoint) = plans(&default_context());
    let mut created = kernel_side_up(&a.open(), &b.open(), client, endpoint)
        .await
        .unwrap();
    let routes = a.routes("nsm-1");
    // Removing a link's last IPv4 address makes the kernel flush every IPv4 route
    // through it; the new address must be in place before the old one goes.
    let ctx = context("172.16.1.6", "172.16.1.1", "2001:db8:1::6", "2001:db8:1::1");
    let (client, endpoint) = plans(&ctx);
    created.refresh(PodSide::Client, client).await.unwrap();
    created.refresh(PodSide::Endpoint, endpoint).await.unwrap();
    assert_eq!(a.addresses("nsm-1"), ["172.16.1.6/32", "2001:db8:1::6/128"]);
    assert_eq!(a.routes("nsm-1"), routes, "unchanged routes survive");
    assert!(a.ping_with(&["172.16.1.1"]));
    assert!(b.ping_with(&["172.16.1.6"]));
    down(created).await.unwrap();
}

#[tokio::test]
async fn a_namespace_received_as_an_o_path_fd_works_once_reopened() {
    require_root!();
    let (a, b) = (Ns::new(), Ns::new());
    // What grpcfd hands over: O_PATH descriptors, which setns and IFLA_NET_NS_FD refuse.
    let o_path = |ns: &Ns| -> OwnedFd {
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::fcntl::OFlag::O_PATH.bits())
            .open(format!("/run/netns/{}", ns.name))
            .unwrap()
            .into()
    };
    let fd_a = o_path(&a);
    let by_proc = NetNs::from_url(&format!(
        "file:///proc/{}/fd/{}",
        std::process::id(),
        fd_a.as_raw_fd()
    ))
    .unwrap();
    let by_fd = NetNs::from_fd(o_path(&b)).unwrap();
    let (client, endpoint) = plans(&default_context());
    let created = kernel_side_up(&by_proc, &by_fd, client, endpoint)
        .await
        .unwrap();
    assert!(a.ping_with(&["172.16.1.1"]));
    down(created).await.unwrap();
    assert_eq!(
        (a.links(), b.links()),
        (vec!["lo".into()], vec!["lo".into()])
    );
}

#[tokio::test]
async fn a_name_over_15_bytes_is_invalid_argument_and_nothing_is_created() {
    require_root!();
    let (a, b) = (Ns::new(), Ns::new());
    let err =
        plan_from_context(&default_context(), PodSide::Client, "nsm-sixteen-byte").unwrap_err();
    assert!(matches!(err, Error::InvalidInterfaceName { .. }), "{err:?}");
    assert!(matches!(
        nsm_sdk::Error::from(err),
        nsm_sdk::Error::InvalidArgument(_)
    ));
    // The kernel agrees: it refuses a 16-byte name too, so the check loses nothing.
    assert!(
        !run(
            "ip",
            &[
                "-n",
                &a.name,
                "link",
                "add",
                "nsm-sixteen-byte",
                "type",
                "veth"
            ]
        )
        .0
    );
    assert_eq!(
        (a.links(), b.links()),
        (vec!["lo".into()], vec!["lo".into()])
    );
}

#[tokio::test]
async fn a_name_already_taken_is_a_clear_error_and_leaves_both_namespaces_as_they_were() {
    require_root!();
    let (a, b) = (Ns::new(), Ns::new());
    assert!(
        run(
            "ip",
            &["-n", &b.name, "link", "add", "nsm-1", "type", "veth", "peer", "name", "other"]
        )
        .0
    );
    let (client, endpoint) = plans(&default_context());
    let err = kernel_side_up(&a.open(), &b.open(), client.clone(), endpoint.clone())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::LinkExists { name, netns, .. } if name == "nsm-1" && netns.contains(&b.name)),
        "{err:?}"
    );
    assert!(err.to_string().contains("already exists"), "{err}");
    assert!(matches!(
        nsm_sdk::Error::from(err),
        nsm_sdk::Error::InvalidArgument(_)
    ));
    assert_eq!(a.links(), ["lo"]);
    assert_eq!(b.links(), ["lo", "nsm-1", "other"]);

    // The same clash found by the kernel itself (as in a race after the check).
    let nl = RtNetlink::open(&a.open()).await.unwrap();
    let name = IfName::new("nsm-1").unwrap();
    let err = nl
        .create_veth_pair(&name, &a.open(), &name, &b.open(), None)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::LinkExists { .. }), "{err:?}");
    assert_eq!(a.links(), ["lo"]);
    assert_eq!(b.links(), ["lo", "nsm-1", "other"]);
}

#[tokio::test]
async fn a_namespace_that_does_not_exist_is_not_found() {
    require_root!();
    let gone = Ns::new();
    let name = gone.name.clone();
    drop(gone);
    let err = NetNs::from_url(&format!("file:///run/netns/{name}")).unwrap_err();
    assert!(matches!(err, Error::NetnsNotFound { .. }), "{err:?}");
    assert!(matches!(
        nsm_sdk::Error::from(err),
        nsm_sdk::Error::NotFound(_)
    ));
    let err = NetNs::from_url("file:///proc/2147483647/ns/net").unwrap_err();
    assert!(matches!(err, Error::NetnsNotFound { .. }), "{err:?}");
}

#[tokio::test]
async fn a_malformed_address_is_invalid_argument_before_the_kernel_is_touched() {
    require_root!();
    let (a, b) = (Ns::new(), Ns::new());
    let mut ctx = default_context();
    ctx.ip_context.as_mut().unwrap().dst_ip_addrs = vec!["172.16.1.300/32".into()];
    let err = plan_from_context(&ctx, PodSide::Endpoint, "nsm-1").unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("ip_context.dst_ip_addrs") && text.contains("172.16.1.300/32"),
        "{text}"
    );
    assert!(matches!(
        nsm_sdk::Error::from(err),
        nsm_sdk::Error::InvalidArgument(_)
    ));
    assert_eq!(
        (a.links(), b.links()),
        (vec!["lo".into()], vec!["lo".into()])
    );
}

#[tokio::test]
async fn an_mtu_out_of_range_is_invalid_argument_and_nothing_is_created() {
    require_root!();
    let (a, b) = (Ns::new(), Ns::new());
    for mtu in [67, 65536] {
        let mut ctx = default_context();
        ctx.mtu = mtu;
        let err = plan_from_context(&ctx, PodSide::Client, "nsm-1").unwrap_err();
        assert!(matches!(err, Error::InvalidMtu { .. }), "{err:?}");
        assert!(matches!(
            nsm_sdk::Error::from(err),
            nsm_sdk::Error::InvalidArgument(_)
        ));
    }
    // 1000 is a valid IPv4 MTU but the plan has IPv6 addresses.
    let mut ctx = default_context();
    ctx.mtu = 1000;
    assert!(matches!(
        plan_from_context(&ctx, PodSide::Client, "nsm-1").unwrap_err(),
        Error::InvalidMtu { mtu: 1000, .. }
    ));
    assert_eq!(
        (a.links(), b.links()),
        (vec!["lo".into()], vec!["lo".into()])
    );
}

#[tokio::test]
async fn a_route_the_kernel_refuses_rolls_everything_back() {
    require_root!();
    let (a, b) = (Ns::new(), Ns::new());
    let (client, endpoint) = plans(&default_context());
    // A gateway that is the client's own address: the kernel refuses it (EINVAL,
    // "Nexthop has invalid gateway") after the pair exists and the client end has
    // its address.
    let client = client.with_route(Route::universe(
        "198.51.100.0/24".parse().unwrap(),
        Some("172.16.1.2".parse().unwrap()),
    ));
    let (ns_a, ns_b) = (a.open(), b.open());
    let nl_a = Arc::new(RtNetlink::open(&ns_a).await.unwrap());
    let nl_b = Arc::new(RtNetlink::open(&ns_b).await.unwrap());
    let err = veth_up(
        VethEnd {
            netns: &ns_a,
            netlink: nl_a.clone(),
            plan: client,
        },
        VethEnd {
            netns: &ns_b,
            netlink: nl_b,
            plan: endpoint,
        },
    )
    .await
    .unwrap_err();
    assert_eq!(err.errno(), Some(22), "{err:?}");
    assert!(matches!(
        nsm_sdk::Error::from(err),
        nsm_sdk::Error::Internal(_)
    ));
    assert_eq!(a.links(), ["lo"]);
    assert_eq!(b.links(), ["lo"]);
    let links = nl_a.links().await.unwrap();
    assert_eq!(links.len(), 1, "{links:?}");
}

/// The plans of connection `id`, each end marked with its alias as the forwarder does.
fn owned_plans(ctx: &ConnectionContext, id: &str) -> (Plan, Plan) {
    let (client, endpoint) = plans(ctx);
    (
        client.with_alias(veth_alias(PodSide::Client, id)),
        endpoint.with_alias(veth_alias(PodSide::Endpoint, id)),
    )
}

/// What the tests of this file read of a namespace beyond what the kit reads.
trait NsExt {
    fn routes(&self, dev: &str) -> Vec<String>;
    fn index_and_alias(&self, dev: &str) -> (u64, String);
    fn sysctl(&self, key: &str) -> String;
}

impl NsExt for Ns {
    /// Routes through `dev`, IPv4 then IPv6, without the kernel's own.
    fn routes(&self, dev: &str) -> Vec<String> {
        let mut v = Vec::new();
        for fam in ["-4", "-6"] {
            let out = self.ip(&[fam, "route", "show", "dev", dev]);
            v.extend(
                out.lines()
                    .filter(|l| !l.contains("proto kernel"))
                    .map(|l| l.trim().to_string()),
            );
        }
        v
    }

    /// `ifindex` and `ifalias` of `dev`, as `ip -j` shows them.
    fn index_and_alias(&self, dev: &str) -> (u64, String) {
        let out = self.ip(&["-j", "link", "show", "dev", dev]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        (
            v[0]["ifindex"].as_u64().unwrap_or(0),
            v[0]["ifalias"].as_str().unwrap_or("").to_string(),
        )
    }

    fn sysctl(&self, key: &str) -> String {
        let (ok, out) = run("ip", &["netns", "exec", &self.name, "sysctl", "-n", key]);
        assert!(ok, "{out}");
        out.split_whitespace().collect::<Vec<_>>().join(" ")
    }
}

#[tokio::test]
async fn a_pair_left_by_a_dead_forwarder_is_replaced_and_a_foreign_link_is_not() {
    require_root!();
    let (a, b) = (Ns::new(), Ns::new());
    let (client, endpoint) = owned_plans(&default_context(), "conn-1");
    let first = kernel_side_up(&a.open(), &b.open(), client.clone(), endpoint.clone())
        .await
        .unwrap();
    let (old_a, alias_a) = a.index_and_alias("nsm-1");
    let (old_b, alias_b) = b.index_and_alias("nsm-1");
    assert_eq!(alias_a, "nsm-client-conn-1", "set through IFLA_IFALIAS");
    assert_eq!(alias_b, "nsm-endpoint-conn-1");

    // The forwarder dies: its state goes, the pair stays and still carries traffic.
    drop(first);
    assert!(a.ping_with(&["172.16.1.1"]));
    let again = kernel_side_up(&a.open(), &b.open(), client.clone(), endpoint.clone())
        .await
        .unwrap();
    let (new_a, alias_a) = a.index_and_alias("nsm-1");
    let (new_b, _) = b.index_and_alias("nsm-1");
    assert!(new_a != old_a && new_b != old_b, "a new pair");
    assert_eq!(alias_a, "nsm-client-conn-1");
    assert_eq!(
        (a.links(), b.links()),
        (
            vec!["lo".into(), "nsm-1".into()],
            vec!["lo".into(), "nsm-1".into()]
        )
    );
    assert!(a.ping_with(&["172.16.1.1"]), "the new pair works");

    // Another connection wants the same name: the link is not its leftover.
    let (other_client, other_endpoint) = owned_plans(&default_context(), "conn-2");
    let err = kernel_side_up(&a.open(), &b.open(), other_client, other_endpoint)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::LinkExists { alias: Some(h), .. } if h == "nsm-client-conn-1"),
        "{err:?}"
    );
    assert_eq!(a.index_and_alias("nsm-1").0, new_a, "left alone");
    down(again).await.unwrap();

    // A link the mesh did not make (no alias) holds the name.
    assert!(
        run(
            "ip",
            &["-n", &a.name, "link", "add", "nsm-1", "type", "veth", "peer", "name", "other"]
        )
        .0
    );
    let err = kernel_side_up(&a.open(), &b.open(), client, endpoint)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("not made by the mesh"), "{err}");
    assert!(matches!(
        nsm_sdk::Error::from(err),
        nsm_sdk::Error::InvalidArgument(_)
    ));
    assert_eq!(a.links(), ["lo", "nsm-1", "other"]);
    assert_eq!(b.links(), ["lo"]);
}

#[tokio::test]
async fn a_pair_half_made_by_a_forwarder_killed_before_its_alias_is_replaced() {
    require_root!();
    let (a, b) = (Ns::new(), Ns::new());
    // What a forwarder killed right after RTM_NEWLINK leaves: the pair, no aliases.
    let (na, nb) = (a.open(), b.open());
    let nl = RtNetlink::open(&na).await.unwrap();
    let name = IfName::new("nsm-1").unwrap();
    nl.create_veth_pair(&name, &na, &name, &nb, None)
        .await
        .unwrap();
    let shown: serde_json::Value =
        serde_json::from_str(&a.ip(&["-j", "-d", "link", "show", "dev", "nsm-1"])).unwrap();
    assert_eq!(
        shown[0]["group"].as_str(),
        Some("5133133"),
        "born in MESH_GROUP: {shown}"
    );
    assert_eq!(a.index_and_alias("nsm-1").1, "", "no alias yet");
    let (old_a, _) = a.index_and_alias("nsm-1");

    let (client, endpoint) = owned_plans(&default_context(), "conn-1");
    let created = kernel_side_up(&na, &nb, client, endpoint).await.unwrap();
    let (new_a, alias_a) = a.index_and_alias("nsm-1");
    assert_ne!(new_a, old_a, "a new pair");
    assert_eq!(alias_a, "nsm-client-conn-1");
    assert_eq!(
        (a.links(), b.links()),
        (
            vec!["lo".into(), "nsm-1".into()],
            vec!["lo".into(), "nsm-1".into()]
        )
    );
    assert!(a.ping_with(&["172.16.1.1"]), "the new pair works");
    down(created).await.unwrap();
    assert_eq!(
        (a.links(), b.links()),
        (vec!["lo".to_string()], vec!["lo".to_string()])
    );
}

fn to(endpoint: &str) -> Connection {
    Connection {
        id: "c".into(),
        context: Some(ConnectionContext {
            ip_context: Some(IpContext {
                dst_ip_addrs: vec![format!("{endpoint}/32")],
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[tokio::test]
async fn the_ping_liveness_check_is_true_across_a_working_pair_and_false_once_it_is_gone() {
    require_root!();
    let (a, b) = (Ns::new(), Ns::new());
    let created = kernel_side_up(
        &a.open(),
        &b.open(),
        plans(&default_context()).0,
        plans(&default_context()).1,
    )
    .await
    .unwrap();
    let check = ping_liveness(PingOptions::new().netns(a.open()));
    let conn = to("172.16.1.1");

    // A fresh namespace lets no group open ICMP datagram sockets: a raw socket pings.
    assert_eq!(a.sysctl("net.ipv4.ping_group_range"), "1 0");
    assert!(check(&conn).await, "raw socket");
    // As the forwarder leaves it: a datagram socket pings.
    allow_ping(&a.open()).await.unwrap();
    assert_eq!(a.sysctl("net.ipv4.ping_group_range"), "0 2147483647");
    assert!(check(&conn).await, "datagram socket");
    assert!(
        ping(
            Some(&a.open()),
            "2001:db8:1::1".parse().unwrap(),
            Duration::from_millis(400)
        )
        .await
        .unwrap(),
        "IPv6"
    );

    // An address routed through the pair that nobody answers (and one with no route
    // at all): no reply within the timeout.
    assert!(!check(&to("172.16.1.99")).await, "no route");
    let started = Instant::now();
    assert!(!check(&to("192.0.2.99")).await);
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(2),
        "{took:?}"
    );

    // The client's end is deleted behind the forwarder's back: no route, dead at once.
    assert!(run("ip", &["-n", &a.name, "link", "del", "nsm-1"]).0);
    let started = Instant::now();
    assert!(!check(&conn).await);
    assert!(
        started.elapsed() < Duration::from_millis(300),
        "{:?}",
        started.elapsed()
    );
    down(created).await.unwrap();
}

fn policy(from: &str, proto: &str, dport: &str, routes: Vec<ProtoRoute>) -> PolicyRoute {
    PolicyRoute {
        from: from.into(),
        proto: proto.into(),
        dst_port: dport.into(),
        src_port: String::new(),
        routes,
    }
}

/// The default context plus `from 172.16.1.2/32 ipproto tcp dport <dport>` routing
/// 198.51.100.0/24 through the endpoint, and an IPv6 policy without routes.
fn policy_context(dport: &str) -> ConnectionContext {
    let mut ctx = default_context();
    ctx.ip_context.as_mut().unwrap().policies = vec![
        policy(
            "172.16.1.2/32",
            "tcp",
            dport,
            vec![ProtoRoute {
                prefix: "198.51.100.0/24".into(),
                next_hop: "172.16.1.1".into(),
            }],
        ),
        policy("2001:db8:1::2/128", "udp", "5353", vec![]),
    ];
    ctx
}

/// The policy-routing reads of a namespace.
trait PolicyNs {
    fn json_or_none(&self, args: &[&str]) -> Vec<serde_json::Value>;
    fn rules(&self) -> Vec<serde_json::Value>;
    fn table_routes(&self, table: &str) -> Vec<serde_json::Value>;
    fn route_get(&self, dst: &str, dport: &str) -> (bool, String);
    fn policy_table_routes(&self) -> Vec<String>;
}

impl PolicyNs for Ns {
    /// `ip -j` output as a list; a table that does not exist (yet) is empty.
    fn json_or_none(&self, args: &[&str]) -> Vec<serde_json::Value> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        let (ok, out) = run("ip", &full);
        if !ok && out.contains("table does not exist") {
            return Vec::new();
        }
        assert!(ok, "ip {full:?}: {out}");
        if out.trim().is_empty() {
            return Vec::new();
        }
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v.as_array().cloned().unwrap_or_default()
    }

    /// The IPv4 then IPv6 rules as `ip -j rule` lists them, without the kernel's own
    /// (`local`, `main`, `default`).
    fn rules(&self) -> Vec<serde_json::Value> {
        let mut v = self.json_or_none(&["-4", "-j", "rule"]);
        v.extend(self.json_or_none(&["-6", "-j", "rule"]));
        v.retain(|r| !matches!(r["table"].as_str(), Some("local" | "main" | "default")));
        v
    }

    /// The routes of `table`, IPv4 then IPv6, as `ip -j route` lists them.
    fn table_routes(&self, table: &str) -> Vec<serde_json::Value> {
        let mut v = self.json_or_none(&["-4", "-j", "route", "show", "table", table]);
        v.extend(self.json_or_none(&["-6", "-j", "route", "show", "table", table]));
        v
    }

    /// Which table the kernel picks for a TCP packet from the client to `dst` port
    /// `dport` (`ip route get`), or the error.
    fn route_get(&self, dst: &str, dport: &str) -> (bool, String) {
        run(
            "ip",
            &[
                "-n",
                &self.name,
                "route",
                "get",
                dst,
                "from",
                "172.16.1.2",
                "ipproto",
                "tcp",
                "dport",
                dport,
            ],
        )
    }

    /// Routes of every table but `local` through `dev` that are not in `main`.
    fn policy_table_routes(&self) -> Vec<String> {
        let mut v = Vec::new();
        for fam in ["-4", "-6"] {
            let out = self.ip(&[fam, "route", "show", "table", "all"]);
            v.extend(
                out.lines()
                    .filter(|l| l.contains(" table ") && !l.contains("table local"))
                    .map(|l| l.trim().to_string()),
            );
        }
        v
    }
}

#[tokio::test]
async fn a_policy_route_gets_a_rule_and_a_table_in_the_client_pod_and_close_removes_both() {
    require_root!();
    let (a, b) = (Ns::new(), Ns::new());
    let (client, endpoint) = plans(&policy_context("8080"));
    let mut created = kernel_side_up(&a.open(), &b.open(), client, endpoint)
        .await
        .unwrap();

    let rules = a.rules();
    assert_eq!(rules.len(), 2, "{rules:?}");
    let v4 = &rules[0];
    assert_eq!(v4["src"], "172.16.1.2", "{v4}");
    assert_eq!(v4["ipproto"], "tcp", "{v4}");
    assert_eq!(v4["dport"], 8080, "{v4}");
    assert_eq!(v4["table"], "100", "the lowest free table from 100: {v4}");
    let v6 = &rules[1];
    assert_eq!(v6["src"], "2001:db8:1::2", "{v6}");
    assert_eq!(v6["ipproto"], "udp", "{v6}");
    assert_eq!(v6["table"], "101", "{v6}");
    assert!(b.rules().is_empty(), "the endpoint's pod gets no rule");

    let t100 = a.table_routes("100");
    assert_eq!(t100.len(), 1, "{t100:?}");
    assert_eq!(t100[0]["dst"], "198.51.100.0/24");
    assert_eq!(t100[0]["gateway"], "172.16.1.1");
    assert_eq!(t100[0]["dev"], "nsm-1");
    assert!(
        t100[0]["flags"].to_string().contains("onlink"),
        "{}",
        t100[0]
    );
    let t101 = a.table_routes("101");
    assert_eq!(t101.len(), 1, "{t101:?}");
    assert_eq!(t101[0]["dst"], "default", "no routes: a default route");
    assert_eq!(t101[0]["dev"], "nsm-1");

    // The rule really steers (its action is "to table"): TCP to port 8080 finds the
    // route in table 100, other ports find no route at all.
    let (ok, out) = a.route_get("198.51.100.7", "8080");
    assert!(
        ok && out.contains("via 172.16.1.1") && out.contains("table 100"),
        "{out}"
    );
    let (ok, out) = a.route_get("198.51.100.7", "9090");
    assert!(!ok, "{out}");

    // A refresh with the same policies: not a single change in the namespace.
    let mut monitor = tokio::process::Command::new("ip")
        .args(["-n", &a.name, "monitor", "rule", "route", "address", "link"])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (client, _) = plans(&policy_context("8080"));
    created.refresh(PodSide::Client, client).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    monitor.start_kill().unwrap();
    let events = monitor.wait_with_output().await.unwrap();
    assert!(
        events.stdout.is_empty(),
        "an unchanged refresh changed the kernel: {}",
        String::from_utf8_lossy(&events.stdout)
    );
    let tables: Vec<_> = created
        .plan(PodSide::Client)
        .policies()
        .iter()
        .map(|p| p.table())
        .collect();
    assert_eq!(tables, [Some(100), Some(101)]);
    assert_eq!(a.rules(), rules);

    // Close removes what was added, rules included.
    down(created).await.unwrap();
    assert!(a.rules().is_empty(), "{:?}", a.rules());
    assert!(a.table_routes("100").is_empty() && a.table_routes("101").is_empty());
    assert!(
        a.policy_table_routes().is_empty(),
        "{:?}",
        a.policy_table_routes()
    );
    assert_eq!(
        (a.links(), b.links()),
        (vec!["lo".into()], vec!["lo".into()])
    );
}

#[tokio::test]
async fn a_changed_policy_replaces_the_old_rule_and_empties_its_table() {
    require_root!();
    let (a, b) = (Ns::new(), Ns::new());
    let (client, endpoint) = plans(&policy_context("8080"));
    let mut created = kernel_side_up(&a.open(), &b.open(), client, endpoint)
        .await
        .unwrap();
    let (client, _) = plans(&policy_context("9090"));
    created.refresh(PodSide::Client, client).await.unwrap();

    let rules = a.rules();
    assert_eq!(rules.len(), 2, "{rules:?}");
    assert_eq!(rules[0]["dport"], 9090, "{rules:?}");
    assert_eq!(rules[0]["table"], "102", "a table of its own: {rules:?}");
    assert_eq!(
        rules[1]["table"], "101",
        "the unchanged policy keeps its table"
    );
    assert!(
        a.table_routes("100").is_empty(),
        "{:?}",
        a.table_routes("100")
    );
    assert_eq!(a.table_routes("102").len(), 1);
    assert!(a.route_get("198.51.100.7", "9090").1.contains("table 102"));
    assert!(!a.route_get("198.51.100.7", "8080").0);

    down(created).await.unwrap();
    assert!(a.rules().is_empty(), "{:?}", a.rules());
    assert!(a.policy_table_routes().is_empty());
}

#[tokio::test]
async fn a_forwarder_that_replaces_a_dead_one_takes_over_its_rules_without_duplicates() {
    require_root!();
    let (a, b) = (Ns::new(), Ns::new());
    let (client, endpoint) = owned_plans(&policy_context("8080"), "conn-1");
    let first = kernel_side_up(&a.open(), &b.open(), client.clone(), endpoint.clone())
        .await
        .unwrap();
    let rules = a.rules();
    // The forwarder dies: the pair and its rules stay.
    drop(first);
    let again = kernel_side_up(&a.open(), &b.open(), client, endpoint)
        .await
        .unwrap();
    assert_eq!(
        a.rules(),
        rules,
        "the same rules, each once, in the same tables"
    );
    assert_eq!(a.table_routes("100").len(), 1, "on the new link");
    assert!(a.route_get("198.51.100.7", "8080").0);
    down(again).await.unwrap();
    assert!(a.rules().is_empty(), "{:?}", a.rules());
}

#[tokio::test]
async fn a_bad_policy_port_or_protocol_is_invalid_argument_and_nothing_is_left() {
    require_root!();
    let (a, b) = (Ns::new(), Ns::new());
    for (proto, dport, field) in [
        ("tcp", "65535", "ip_context.policies.dst_port"),
        ("tcp", "0-80", "ip_context.policies.dst_port"),
        ("tcp", "http", "ip_context.policies.dst_port"),
        ("tcpx", "8080", "ip_context.policies.proto"),
        ("300", "8080", "ip_context.policies.proto"),
    ] {
        let mut ctx = default_context();
        ctx.ip_context.as_mut().unwrap().policies =
            vec![policy("172.16.1.2/32", proto, dport, vec![])];
        let err = plan_from_context(&ctx, PodSide::Client, "nsm-1").unwrap_err();
        assert!(err.to_string().starts_with(field), "{proto} {dport}: {err}");
        assert!(matches!(
            nsm_sdk::Error::from(err),
            nsm_sdk::Error::InvalidArgument(_)
        ));
    }
    // The kernel agrees: it refuses port 65535 and port 0 in a rule.
    for dport in ["65535", "0-80"] {
        let (ok, out) = run(
            "ip",
            &[
                "-n",
                &a.name,
                "rule",
                "add",
                "from",
                "172.16.1.2",
                "ipproto",
                "tcp",
                "dport",
                dport,
                "lookup",
                "100",
            ],
        );
        assert!(!ok, "{dport}: {out}");
    }
    assert!(a.rules().is_empty() && b.rules().is_empty());
    assert!(a.policy_table_routes().is_empty());
    assert_eq!(
        (a.links(), b.links()),
        (vec!["lo".into()], vec!["lo".into()])
    );
}
