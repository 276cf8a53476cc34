//! Basic usecases through a sandbox mesh (docs/SCENARIOS.md 5.1: 5, 7, 2, 1, 4, 6).

use std::time::Duration;

use nsm_proto::connection::Connection;
use nsm_sdk::sandbox::{EndpointSpec, Sandbox};
use nsm_sdk::Cx;
use nsm_testkit::{names, refresh, request};

/// On a mesh of `nodes` nodes, `spec`'s NSE on node 0 and an NSC on the last node:
/// a request takes `path`; a refresh takes the same path with the same id and reaches
/// the NSE (requests 2 of one connection); the Close reaches it; it unregisters.
/// Returns the first connection.
async fn request_refresh_close(nodes: usize, spec: EndpointSpec, path: &[&str]) -> Connection {
    let mesh = Sandbox::builder().nodes(nodes).build().await.unwrap();
    let nse = mesh.node(0).endpoint(spec).await.unwrap();
    let nsc = mesh.node(nodes - 1).client("nsc");
    let conn = nsc
        .request(&mut Cx::client(), request("icmp"))
        .await
        .unwrap();
    assert_eq!(names(&conn), path);
    assert_eq!(conn.network_service_endpoint_name, nse.name);
    assert_eq!(nse.counter.requests(), 1);

    let again = nsc
        .request(&mut Cx::client(), refresh(&conn))
        .await
        .unwrap();
    assert_eq!(names(&again), names(&conn));
    assert_eq!(again.id, conn.id);
    assert_eq!(nse.counter.requests(), 2);
    assert_eq!(nse.counter.unique_requests(), 1);

    nsc.close(&mut Cx::client(), again).await.unwrap();
    assert_eq!(nse.counter.closes(), 1);
    nse.unregister().await.unwrap();
    conn
}

/// 5.1 item 7: local request (4 segments, an address from the NSE's IPAM), refresh,
/// Close, unregister.
#[tokio::test]
async fn local_usecase_has_four_segments_refreshes_and_closes() {
    let spec = EndpointSpec::new("nse-1", "icmp").ipam("172.16.0.0/24".parse().unwrap());
    let path = ["nsc", "nsmgr-0", "forwarder-0-0", "nse-1"];
    let conn = request_refresh_close(1, spec, &path).await;
    let ip = conn.context.as_ref().unwrap().ip_context.as_ref().unwrap();
    assert_eq!(ip.src_ip_addrs.len(), 1, "{ip:?}");
}

/// 5.1 item 5: remote request (6 segments), refresh (same NSE, requests = 2), Close.
#[tokio::test]
async fn remote_usecase_has_six_segments_refreshes_and_closes() {
    let path = [
        "nsc",
        "nsmgr-1",
        "forwarder-1-0",
        "nsmgr-0",
        "forwarder-0-0",
        "nse-remote",
    ];
    request_refresh_close(2, EndpointSpec::new("nse-remote", "icmp"), &path).await;
}

/// A re-request with the returned connection refreshes the same path: every hop keeps
/// its id.
#[tokio::test]
async fn a_re_request_with_the_returned_connection_keeps_every_hop_id() {
    let mesh = Sandbox::builder().nodes(2).build().await.unwrap();
    let _nse = mesh
        .node(0)
        .endpoint(EndpointSpec::new("nse", "svc"))
        .await
        .unwrap();
    let nsc = mesh.node(1).client("nsc");
    let conn = nsc
        .request(&mut Cx::client(), request("svc"))
        .await
        .unwrap();
    let again = nsc
        .request(&mut Cx::client(), refresh(&conn))
        .await
        .unwrap();
    let ids = |c: &Connection| -> Vec<String> {
        c.path
            .as_ref()
            .unwrap()
            .path_segments
            .iter()
            .map(|s| s.id.clone())
            .collect()
    };
    assert_eq!(ids(&conn), ids(&again));
    assert_eq!(again.path.as_ref().unwrap().index, 0);
}

/// 5.1 item 2: the NSE is registered but its server starts 1 s later; retry succeeds.
#[tokio::test]
async fn an_endpoint_registered_before_it_serves_is_reached_by_retry() {
    let mesh = Sandbox::builder().nodes(1).build().await.unwrap();
    let nse = mesh
        .node(0)
        .endpoint(EndpointSpec::new("late", "svc").serve(false))
        .await
        .unwrap();
    let starter = async {
        tokio::time::sleep(Duration::from_secs(1)).await;
        nse.serve().await.unwrap();
    };
    let nsc = mesh.node(0).client("nsc");
    let mut cx = Cx::client();
    let (conn, ()) = tokio::join!(nsc.request(&mut cx, request("svc")), starter);
    let conn = conn.unwrap();
    assert_eq!(names(&conn).len(), 4);
    nsc.close(&mut Cx::client(), conn).await.unwrap();
    assert_eq!(nse.counter.closes(), 1);
}

/// 5.1 item 1: the NSE appears on node 0 100 ms after the client on node 1 starts.
#[tokio::test]
async fn an_endpoint_appearing_after_the_client_starts_is_found_by_retry() {
    let mesh = Sandbox::builder().nodes(2).build().await.unwrap();
    mesh.node(0).ensure_service("svc").await.unwrap();
    let nsc = mesh.node(1).client("nsc");
    let later = async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        mesh.node(0)
            .endpoint(EndpointSpec::new("nse", "svc"))
            .await
            .unwrap()
    };
    let mut cx = Cx::client();
    let (conn, nse) = tokio::join!(nsc.request(&mut cx, request("svc")), later);
    let conn = conn.unwrap();
    assert_eq!(names(&conn).len(), 6);
    let conn = nsc
        .request(&mut Cx::client(), refresh(&conn))
        .await
        .unwrap();
    assert_eq!(names(&conn).len(), 6);
    assert_eq!(nse.counter.requests(), 2);
    nsc.close(&mut Cx::client(), conn).await.unwrap();
    assert_eq!(nse.counter.closes(), 1);
}

/// 5.1 item 4: three always-failing remote NSEs plus a good one registered 0.5 s later.
#[tokio::test]
async fn busy_endpoints_fail_over_to_the_good_one() {
    let mesh = Sandbox::builder().nodes(2).build().await.unwrap();
    let mut busy = Vec::new();
    for i in 0..3 {
        let nse = mesh
            .node(0)
            .endpoint(EndpointSpec::new(format!("busy-{i}"), "svc"))
            .await
            .unwrap();
        nse.inject.fail_requests(true);
        busy.push(nse);
    }
    let nsc = mesh.node(1).client("nsc");
    let later = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        mesh.node(0)
            .endpoint(EndpointSpec::new("good", "svc"))
            .await
            .unwrap()
    };
    let mut cx = Cx::client();
    let (conn, good) = tokio::join!(nsc.request(&mut cx, request("svc")), later);
    let conn = conn.unwrap();
    assert_eq!(conn.network_service_endpoint_name, "good");
    let conn = nsc
        .request(&mut Cx::client(), refresh(&conn))
        .await
        .unwrap();
    assert_eq!(good.counter.requests(), 2);
    nsc.close(&mut Cx::client(), conn).await.unwrap();
    assert_eq!(good.counter.closes(), 1);
    assert!(busy.iter().all(|b| b.counter.requests() >= 1));
}

/// 5.1 item 6: the NSE is killed; a refresh fails within 1 s (no hang); Close is best
/// effort; unregistering the dead NSE through a registry client works.
#[tokio::test]
async fn a_refresh_to_a_dead_endpoint_fails_within_a_second() {
    let mesh = Sandbox::builder().nodes(1).build().await.unwrap();
    let nse = mesh
        .node(0)
        .endpoint(EndpointSpec::new("nse", "svc"))
        .await
        .unwrap();
    let nsc = nsm_sdk::chains::client(mesh.node(0).client_options("nsc").retry(None));
    let conn = nsc
        .request(&mut Cx::client(), request("svc"))
        .await
        .unwrap();
    nse.kill();
    let started = tokio::time::Instant::now();
    let res = nsc
        .request(
            &mut Cx::client().with_timeout(Duration::from_secs(5)),
            refresh(&conn),
        )
        .await;
    assert!(res.is_err(), "refresh to a dead NSE succeeded");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "refresh took {:?}",
        started.elapsed()
    );
    let _ = nsc.close(&mut Cx::client(), conn).await;
    nse.unregister().await.unwrap();
    let left = mesh
        .registries()
        .nse
        .list(
            &mut Cx::client(),
            nsm_proto::registry::NetworkServiceEndpoint {
                name: "nse".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert!(left.is_empty());
}
