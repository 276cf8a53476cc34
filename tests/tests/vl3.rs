//! vL3 scenarios through a secure sandbox mesh (docs/SCENARIOS.md 5.8: 48, 49, 50, 51,
//! 54 without their DNS parts), the prefix server's restart recovery, and heal when a
//! vL3 endpoint dies. docs/VL3.md describes the vL3.

use std::time::Duration;

use ipnet::IpNet;
use nsm_proto::connection::Connection;
use nsm_proto::connectioncontext::IpContext;
use nsm_sdk::chains::client;
use nsm_sdk::handlers::{heal, HealOptions};
use nsm_sdk::ipam::{PrefixServer, Vl3Prefixes};
use nsm_sdk::sandbox::{EndpointHandle, EndpointSpec, Sandbox, Vl3Spec};
use nsm_sdk::Cx;
use nsm_testkit::{eventually, refresh, request};

const SERVICE: &str = "vl3";

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

fn networks() -> Vec<IpNet> {
    vec![net("172.16.0.0/16"), net("fd10::/64")]
}

fn prefix_server() -> PrefixServer {
    PrefixServer::builder(net("172.16.0.0/16"), 24)
        .network(net("fd10::/64"), 120)
        .build()
        .unwrap()
}

fn ipc(conn: &Connection) -> IpContext {
    conn.context
        .as_ref()
        .and_then(|c| c.ip_context.clone())
        .unwrap_or_default()
}

fn addrs(list: &[String]) -> Vec<IpNet> {
    list.iter().map(|s| net(s)).collect()
}

fn routes(ipc: &IpContext) -> Vec<IpNet> {
    ipc.src_routes.iter().map(|r| net(&r.prefix)).collect()
}

/// The client's addresses lie in `prefixes` (one per family) and it routes to both
/// networks.
fn assert_vl3_client(conn: &Connection, prefixes: &[IpNet]) {
    let ipc = ipc(conn);
    let src = addrs(&ipc.src_ip_addrs);
    assert_eq!(src.len(), 2, "{ipc:?}");
    for a in &src {
        assert!(
            prefixes.iter().any(|p| p.contains(a)),
            "{a} not in {prefixes:?}"
        );
    }
    for n in networks() {
        assert!(routes(&ipc).contains(&n), "no route to {n}: {ipc:?}");
    }
}

async fn vl3_endpoint(mesh: &Sandbox, node: usize, name: &str) -> EndpointHandle {
    mesh.node(node)
        .endpoint(EndpointSpec::new(name, SERVICE).vl3(Vl3Spec::new(networks())))
        .await
        .unwrap()
}

async fn prefixes_of(nse: &EndpointHandle) -> Vec<IpNet> {
    let p = nse.vl3_prefixes().unwrap().clone();
    eventually("both prefixes known", Duration::from_secs(5), || {
        p.get().len() == 2
    })
    .await;
    p.get()
}

/// 48: ten NSCs one after another get distinct vL3 addresses from the endpoint's
/// prefixes (held from the prefix server), keep them on refresh, and free them on Close.
#[tokio::test]
async fn s48_ten_clients_in_sequence_get_vl3_addresses() {
    let mesh = Sandbox::builder().build().await.unwrap();
    mesh.start_prefix_server(prefix_server()).await.unwrap();
    let nse = vl3_endpoint(&mesh, 0, "vl3-nse").await;
    let prefixes = prefixes_of(&nse).await;
    let mut conns = Vec::new();
    let mut seen = Vec::new();
    for i in 0..10 {
        let nsc = mesh.node(0).client(&format!("nsc-{i}"));
        let conn = nsc
            .request(&mut Cx::client(), request(SERVICE))
            .await
            .unwrap();
        assert_vl3_client(&conn, &prefixes);
        let again = nsc
            .request(&mut Cx::client(), refresh(&conn))
            .await
            .unwrap();
        assert_eq!(ipc(&again).src_ip_addrs, ipc(&conn).src_ip_addrs);
        for a in addrs(&ipc(&conn).src_ip_addrs) {
            assert!(!seen.contains(&a), "{a} handed out twice");
            seen.push(a);
        }
        conns.push((nsc, again));
    }
    for (nsc, conn) in conns {
        nsc.close(&mut Cx::client(), conn).await.unwrap();
    }
    assert_eq!(nse.counter.closes(), 10);
}

/// 50: the endpoint learns its prefix 200 ms after the Request started: the Request
/// waits and succeeds with an address from it.
#[tokio::test]
async fn s50_a_prefix_known_late_still_serves_the_request() {
    let mesh = Sandbox::builder().build().await.unwrap();
    let prefixes = Vl3Prefixes::new();
    let _nse = mesh
        .node(0)
        .endpoint(
            EndpointSpec::new("vl3-nse", SERVICE)
                .vl3(Vl3Spec::new(networks()).prefixes(prefixes.clone())),
        )
        .await
        .unwrap();
    let later = prefixes.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        later.set(vec![net("172.16.4.0/24"), net("fd10::400/120")]);
    });
    let nsc = mesh.node(0).client("nsc");
    let started = tokio::time::Instant::now();
    let conn = nsc
        .request(&mut Cx::client(), request(SERVICE))
        .await
        .unwrap();
    assert!(started.elapsed() >= Duration::from_millis(150));
    assert_vl3_client(&conn, &[net("172.16.4.0/24"), net("fd10::400/120")]);
    nsc.close(&mut Cx::client(), conn).await.unwrap();
}

/// 51: a client named like the endpoint connects to it.
#[tokio::test]
async fn s51_a_client_named_like_the_endpoint_connects_to_it() {
    let mesh = Sandbox::builder().build().await.unwrap();
    mesh.start_prefix_server(prefix_server()).await.unwrap();
    let nse = vl3_endpoint(&mesh, 0, "vl3-nse").await;
    let prefixes = prefixes_of(&nse).await;
    let nsc = mesh.node(0).client("vl3-nse");
    let conn = nsc
        .request(&mut Cx::client(), request(SERVICE))
        .await
        .unwrap();
    assert_eq!(conn.network_service_endpoint_name, "vl3-nse");
    assert_vl3_client(&conn, &prefixes);
    nsc.close(&mut Cx::client(), conn).await.unwrap();
    assert_eq!(nse.counter.closes(), 1);
}

/// 54 (strict vL3 IPAM): after the endpoint's prefix is reset, the refresh replaces the
/// now invalid addresses with ones from the new prefix; later refreshes keep them.
#[tokio::test]
async fn s54_strict_after_a_prefix_reset_refreshes_get_the_new_prefix() {
    let mesh = Sandbox::builder().build().await.unwrap();
    let prefixes = Vl3Prefixes::fixed(vec![net("172.16.1.0/24")]);
    let _nse = mesh
        .node(0)
        .endpoint(
            EndpointSpec::new("vl3-nse", SERVICE)
                .vl3(Vl3Spec::new(vec![net("172.16.0.0/16")]).prefixes(prefixes.clone())),
        )
        .await
        .unwrap();
    let nsc = mesh.node(0).client("nsc");
    let conn = nsc
        .request(&mut Cx::client(), request(SERVICE))
        .await
        .unwrap();
    assert_eq!(ipc(&conn).src_ip_addrs, ["172.16.1.2/32"]);
    prefixes.set(vec![net("172.16.2.0/24")]);
    let moved = nsc
        .request(&mut Cx::client(), refresh(&conn))
        .await
        .unwrap();
    let ipc2 = ipc(&moved);
    assert_eq!(ipc2.src_ip_addrs, ["172.16.2.2/32"]);
    assert_eq!(ipc2.dst_ip_addrs, ["172.16.2.1/32"]);
    assert!(
        !format!("{ipc2:?}").contains("172.16.1."),
        "nothing of the old prefix is left: {ipc2:?}"
    );
    let stable = nsc
        .request(&mut Cx::client(), refresh(&moved))
        .await
        .unwrap();
    assert_eq!(ipc(&stable), ipc2);
    nsc.close(&mut Cx::client(), stable).await.unwrap();
}

/// 49 without DNS: two vL3 endpoints on two nodes link to each other (one link, made
/// by the endpoint whose name sorts first, announcing its prefixes; the other answers
/// with a route to its own). The link goes when the peer is unregistered.
#[tokio::test]
async fn s49_vl3_endpoints_link_to_each_other() {
    let mesh = Sandbox::builder().nodes(2).build().await.unwrap();
    mesh.start_prefix_server(prefix_server()).await.unwrap();
    let a = vl3_endpoint(&mesh, 0, "vl3-a").await;
    let b = vl3_endpoint(&mesh, 1, "vl3-b").await;
    let (pa, pb) = (prefixes_of(&a).await, prefixes_of(&b).await);
    assert!(pa.iter().all(|p| !pb.contains(p)), "{pa:?} {pb:?}");
    let mesh_a = a.vl3_mesh().unwrap().clone();
    eventually("a links to b", Duration::from_secs(10), || {
        mesh_a.links() == ["vl3-b"]
    })
    .await;
    assert!(
        b.vl3_mesh().unwrap().links().is_empty(),
        "one link per pair"
    );
    // b saw one request from a: a's prefixes announced, b's own routed back.
    let link = b.counter.last().unwrap();
    assert_eq!(link.network_service_endpoint_name, "vl3-b");
    let ipc = ipc(&link);
    let announced: Vec<IpNet> = ipc.dst_routes.iter().map(|r| net(&r.prefix)).collect();
    for p in &pa {
        assert!(announced.contains(p), "{p} not announced: {ipc:?}");
    }
    assert_eq!(b.counter.unique_requests(), 1);
    // A client of b reaches a's clients through b: it routes to the whole network.
    let nsc = mesh.node(1).client("nsc");
    let mut req = request(SERVICE);
    req.connection
        .as_mut()
        .unwrap()
        .network_service_endpoint_name = "vl3-b".into();
    let conn = nsc.request(&mut Cx::client(), req).await.unwrap();
    assert_vl3_client(&conn, &pb);
    nsc.close(&mut Cx::client(), conn).await.unwrap();
    // b leaves: a closes its link.
    b.close_vl3_links().await;
    b.unregister().await.unwrap();
    eventually("a's link to b closed", Duration::from_secs(10), || {
        mesh_a.links().is_empty()
    })
    .await;
    eventually("b saw the link's Close", Duration::from_secs(5), || {
        b.counter.closes() >= 1
    })
    .await;
}

/// The prefix server restarts on its state file: the endpoints re-claim their prefixes
/// (their clients keep their addresses) and a newcomer gets another one.
#[tokio::test]
async fn the_prefix_server_restarts_and_endpoints_reclaim_their_prefixes() {
    let dir = std::env::temp_dir().join(format!("nsm-vl3-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let state = dir.join("prefixes");
    let _ = std::fs::remove_file(&state);
    let build = || {
        PrefixServer::builder(net("172.16.0.0/16"), 24)
            .network(net("fd10::/64"), 120)
            .state_file(&state)
            .build()
            .unwrap()
    };
    let mesh = Sandbox::builder().build().await.unwrap();
    mesh.start_prefix_server(build()).await.unwrap();
    let a = vl3_endpoint(&mesh, 0, "vl3-a").await;
    let pa = prefixes_of(&a).await;
    let nsc = mesh.node(0).client("nsc");
    let conn = nsc
        .request(&mut Cx::client(), request(SERVICE))
        .await
        .unwrap();

    mesh.kill_prefix_server();
    let restarted = build();
    assert_eq!(
        restarted.reserved().len(),
        2,
        "the state file lists a's prefixes"
    );
    mesh.start_prefix_server(restarted.clone()).await.unwrap();
    let b = vl3_endpoint(&mesh, 0, "vl3-b").await;
    let pb = prefixes_of(&b).await;
    assert!(pa.iter().all(|p| !pb.contains(p)), "{pa:?} {pb:?}");
    eventually("a re-claimed its prefixes", Duration::from_secs(10), || {
        restarted.reserved().is_empty()
    })
    .await;
    assert_eq!(a.vl3_prefixes().unwrap().get(), pa);
    assert_eq!(restarted.held().len(), 4);
    let again = nsc
        .request(&mut Cx::client(), refresh(&conn))
        .await
        .unwrap();
    assert_eq!(ipc(&again).src_ip_addrs, ipc(&conn).src_ip_addrs);
    nsc.close(&mut Cx::client(), again).await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// Heal: the vL3 endpoint of a client dies; the client moves to the other one and gets
/// addresses from its prefix; nothing of the dead endpoint's prefix is left.
#[tokio::test]
async fn a_client_of_a_dead_vl3_endpoint_moves_to_another() {
    let mesh = Sandbox::builder().nodes(2).build().await.unwrap();
    mesh.start_prefix_server(prefix_server()).await.unwrap();
    let a = vl3_endpoint(&mesh, 0, "vl3-a").await;
    let b = vl3_endpoint(&mesh, 1, "vl3-b").await;
    let (pa, pb) = (prefixes_of(&a).await, prefixes_of(&b).await);
    let nsc = client(
        mesh.node(0)
            .client_options("nsc")
            .handler(heal(HealOptions::new(mesh.channels()))),
    );
    let mut req = request(SERVICE);
    req.connection
        .as_mut()
        .unwrap()
        .network_service_endpoint_name = "vl3-a".into();
    let conn = nsc.request(&mut Cx::client(), req).await.unwrap();
    assert_vl3_client(&conn, &pa);
    a.kill();
    a.unregister().await.unwrap();
    let b_counter = b.counter.clone();
    eventually(
        "the client healed to vl3-b",
        Duration::from_secs(10),
        || {
            b_counter.last().is_some_and(|c| {
                c.path
                    .as_ref()
                    .is_some_and(|p| p.path_segments.first().is_some_and(|s| s.name == "nsc"))
            })
        },
    )
    .await;
    let healed = nsc
        .request(&mut Cx::client(), refresh(&conn))
        .await
        .unwrap();
    assert_eq!(healed.network_service_endpoint_name, "vl3-b");
    assert_vl3_client(&healed, &pb);
    let now = ipc(&healed);
    let left: Vec<IpNet> = addrs(&now.src_ip_addrs)
        .into_iter()
        .chain(addrs(&now.dst_ip_addrs))
        .chain(now.src_routes.iter().map(|r| net(&r.prefix)))
        .chain(now.dst_routes.iter().map(|r| net(&r.prefix)))
        .filter(|a| pa.iter().any(|p| p.contains(a)))
        .collect();
    assert!(
        left.is_empty(),
        "left of the dead endpoint's prefixes: {left:?}"
    );
    nsc.close(&mut Cx::client(), healed).await.unwrap();
}
