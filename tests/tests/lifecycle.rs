//! Lifetimes: a client that stops refreshing is closed by the mesh, a dead endpoint
//! expires from the registry, a live one stays (docs/SCENARIOS.md 5.2 items 19 and 20).

use std::time::Duration;

use futures::StreamExt;
use nsm_proto::connection::Connection;
use nsm_proto::networkservice::NetworkServiceRequest;
use nsm_proto::registry::NetworkServiceEndpoint;
use nsm_sdk::registry::Query;
use nsm_sdk::sandbox::{EndpointHandle, EndpointSpec, Sandbox};
use nsm_sdk::{Chain, Cx};
use nsm_testkit::{client_without_refresh, eventually, request};

/// An NSE `nse` of `svc` on node 0 of `mesh`, an NSC `nsc` on node `nsc_node` and its
/// connection to the NSE.
async fn connected(mesh: &Sandbox, nsc_node: usize) -> (EndpointHandle, Chain, Connection) {
    let nse = mesh
        .node(0)
        .endpoint(EndpointSpec::new("nse", "svc"))
        .await
        .unwrap();
    let nsc = mesh.node(nsc_node).client("nsc");
    let conn = nsc
        .request(&mut Cx::client(), request("svc"))
        .await
        .unwrap();
    (nse, nsc, conn)
}

/// 5.2 item 19: the client's token lives 2 s and it never refreshes (a dead client):
/// the NSE must get a Close from the mesh's `timeout` before long. Our timeout closes at
/// the caller's expiry minus min(15 s, half the time left), so at about 1 s here, and
/// each hop closes what it built.
#[tokio::test]
async fn a_client_that_stops_refreshing_is_closed_by_the_mesh() {
    let mesh = Sandbox::builder().nodes(2).build().await.unwrap();
    let nse = mesh
        .node(0)
        .endpoint(EndpointSpec::new("nse", "svc"))
        .await
        .unwrap();
    // A client without `refresh`, signing with 2 s tokens.
    let dead = client_without_refresh(&mesh, 1, "dead-nsc", Duration::from_secs(2));
    let started = tokio::time::Instant::now();
    dead.request(&mut Cx::client(), request("svc"))
        .await
        .unwrap();
    assert_eq!(nse.counter.closes(), 0);
    eventually("the NSE is closed", Duration::from_secs(5), || {
        nse.counter.closes() == 1
    })
    .await;
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(2),
        "closed only after {took:?}, past the token's expiry"
    );
    // The client's path token expired: nothing else arrives later.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(nse.counter.closes(), 1);
}

/// A client that refreshes keeps its connection well past its token lifetime.
#[tokio::test]
async fn a_refreshing_client_keeps_its_connection_past_the_token_lifetime() {
    let mesh = Sandbox::builder()
        .nodes(1)
        .token_lifetime(Duration::from_secs(1))
        .build()
        .await
        .unwrap();
    let (nse, nsc, conn) = connected(&mesh, 0).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        nse.counter.closes(),
        0,
        "the mesh closed a client that refreshes"
    );
    assert!(
        nse.counter.requests() >= 4,
        "refreshes seen: {}",
        nse.counter.requests()
    );
    nsc.close(&mut Cx::client(), conn).await.unwrap();
    assert_eq!(nse.counter.closes(), 1);
}

/// 5.2 item 20: an NSE registered with a 2 s expiry that stops re-registering (it
/// died) is removed by the registry, watchers are told, and Find by name returns
/// nothing. A live NSE beside it stays.
#[tokio::test]
async fn a_dead_endpoint_expires_and_a_live_one_stays() {
    let mesh = Sandbox::builder()
        .nodes(1)
        .registry_expiry(Duration::from_secs(2))
        .build()
        .await
        .unwrap();
    let live = mesh
        .node(0)
        .endpoint(EndpointSpec::new("live", "svc"))
        .await
        .unwrap();
    let dead = mesh
        .node(0)
        .endpoint(EndpointSpec::new("dead", "svc"))
        .await
        .unwrap();
    let registry = mesh.registries();
    let mut watch = registry
        .nse
        .find(
            &mut Cx::client(),
            Query {
                template: NetworkServiceEndpoint {
                    name: "dead".into(),
                    ..Default::default()
                },
                watch: true,
            },
        )
        .await
        .unwrap();
    let first = watch.next().await.unwrap().unwrap();
    assert!(!first.deleted);
    drop(dead); // stops serving and stops re-registering, without unregistering
    let deleted = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let item = watch.next().await.expect("watch ended").unwrap();
            if item.deleted {
                return item;
            }
        }
    })
    .await
    .expect("the dead NSE did not expire");
    assert_eq!(deleted.resource.name, "dead");
    let by_name = |name: &str| NetworkServiceEndpoint {
        name: name.into(),
        ..Default::default()
    };
    assert!(registry
        .nse
        .list(&mut Cx::client(), by_name("dead"))
        .await
        .unwrap()
        .is_empty());
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        registry
            .nse
            .list(&mut Cx::client(), by_name("live"))
            .await
            .unwrap()
            .len(),
        1,
        "the live NSE expired although it re-registers"
    );
    drop(live);
}

/// 5.3 item 27: the registry restarts with an empty store. Refreshing the existing
/// connection succeeds, and once the endpoints and forwarders have re-registered (at
/// 2/3 of their expiry: about 2 s here) a brand-new client connects too.
#[tokio::test]
async fn the_mesh_heals_a_registry_restart() {
    let mesh = Sandbox::builder()
        .nodes(2)
        .registry_expiry(Duration::from_secs(3))
        .build()
        .await
        .unwrap();
    let (nse, nsc, conn) = connected(&mesh, 1).await;

    mesh.kill_registry();
    mesh.start_registry().await.unwrap();
    let refreshed = nsc
        .request(
            &mut Cx::client(),
            NetworkServiceRequest {
                connection: Some(conn),
                ..Default::default()
            },
        )
        .await
        .expect("refresh after the registry restart");
    assert_eq!(refreshed.network_service_endpoint_name, "nse");

    let fresh = mesh.node(1).client("nsc-2");
    let conn2 = fresh
        .request(&mut Cx::client(), request("svc"))
        .await
        .expect("a new client after the registry restart");
    assert_eq!(conn2.network_service_endpoint_name, "nse");
    fresh.close(&mut Cx::client(), conn2).await.unwrap();
    nsc.close(&mut Cx::client(), refreshed).await.unwrap();
    assert_eq!(nse.counter.closes(), 2);
}
