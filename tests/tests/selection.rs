//! Service function chains and selection by labels (docs/SCENARIOS.md 5.1: 8, 9, 10;
//! 5.2: 14, 15, 16).

use std::collections::HashMap;

use futures::StreamExt;
use nsm_proto::registry::{Destination, Match, Metadata, NetworkService};
use nsm_sdk::registry::Query;
use nsm_sdk::sandbox::{EndpointHandle, EndpointSpec, Sandbox};
use nsm_sdk::Cx;
use nsm_testkit::{labels, names, refresh, request_labelled as request};

fn route(src: &[(&str, &str)], dst: &[(&str, &str)], fallthrough: bool) -> Match {
    Match {
        source_selector: labels(src),
        routes: vec![Destination {
            destination_selector: labels(dst),
            weight: 0,
        }],
        fallthrough,
        metadata: None,
    }
}

/// A linear service: a request labelled `step=i-1` goes to the NSE labelled `step=i`.
fn linear_service(name: &str, n: usize) -> NetworkService {
    NetworkService {
        name: name.into(),
        payload: "IP".into(),
        matches: (0..n)
            .map(|i| {
                let prev = if i == 0 {
                    "start".to_string()
                } else {
                    (i - 1).to_string()
                };
                route(&[("step", &prev)], &[("step", &i.to_string())], false)
            })
            .collect(),
        ..Default::default()
    }
}

/// Starts `n` NSEs for `ns`, NSE `i` on node `node_of(i)` labelled `step=i`; all but the
/// last pass the connection on relabelled `step=i`.
async fn sfc(
    mesh: &Sandbox,
    ns: &str,
    n: usize,
    node_of: impl Fn(usize) -> usize,
) -> Vec<EndpointHandle> {
    let mut nses = Vec::new();
    for i in 0..n {
        let node = mesh.node(node_of(i));
        let spec = EndpointSpec::new(format!("nse-{i}"), ns).label("step", i.to_string());
        let spec = if i + 1 < n {
            node.passthrough_spec(spec, labels(&[("step", &i.to_string())]))
        } else {
            spec
        };
        nses.push(node.endpoint(spec).await.unwrap());
    }
    nses
}

async fn run_chain(mesh: &Sandbox, client_node: usize, n: usize, per_hop: usize) {
    let nses = sfc(mesh, "sfc", n, |i| if per_hop == 6 { i } else { 0 }).await;
    let nsc = mesh.node(client_node).client("nsc");
    let mut conn = nsc
        .request(&mut Cx::client(), request("sfc", &[("step", "start")]))
        .await
        .unwrap();
    let path = names(&conn);
    assert_eq!(path.len(), per_hop * (n - 1) + 4, "{path:?}");
    for i in 0..n {
        // NSE i sits after its manager and forwarder: 3 hops after the previous NSE's
        // client (local) or 5 (remote).
        let at = if i == 0 { 3 } else { 3 + per_hop * i };
        assert_eq!(path[at], format!("nse-{i}"), "{path:?}");
    }
    for _ in 0..5 {
        conn = nsc
            .request(&mut Cx::client(), refresh(&conn))
            .await
            .unwrap();
        assert_eq!(names(&conn), path);
    }
    nsc.close(&mut Cx::client(), conn).await.unwrap();
    for nse in &nses {
        assert_eq!(nse.counter.closes(), 1, "{} got no close", nse.name);
        assert_eq!(nse.counter.unique_requests(), 1);
        assert_eq!(nse.counter.requests(), 6);
    }
}

/// 5.1 item 9: a 7-NSE chain on one node; path `4·(n−1)+4`, names at `4(i+1)−1`.
#[tokio::test]
async fn passthrough_chain_of_seven_local_endpoints() {
    let mesh = Sandbox::builder().nodes(1).build().await.unwrap();
    mesh.register_service(linear_service("sfc", 7))
        .await
        .unwrap();
    run_chain(&mesh, 0, 7, 4).await;
}

/// 5.1 item 8: a 7-NSE chain, one NSE per node; path `6·(n−1)+4`.
#[tokio::test]
async fn passthrough_chain_of_seven_remote_endpoints() {
    let mesh = Sandbox::builder().nodes(7).build().await.unwrap();
    mesh.register_service(linear_service("sfc", 7))
        .await
        .unwrap();
    run_chain(&mesh, 0, 7, 6).await;
}

/// 5.1 item 10: the last match has `fallthrough` and an extra match; with NSE `step=0`
/// missing, selection falls through to `step=1`. Path `4·(n−2)+4`; 6 closes.
#[tokio::test]
async fn same_source_selector_falls_through_to_the_next_match() {
    let n = 7;
    let mesh = Sandbox::builder().nodes(1).build().await.unwrap();
    let mut ns = NetworkService {
        name: "sfc".into(),
        payload: "IP".into(),
        ..Default::default()
    };
    // From the start, try step=0 first and fall through to step=1.
    ns.matches
        .push(route(&[("step", "start")], &[("step", "0")], true));
    ns.matches
        .push(route(&[("step", "start")], &[("step", "1")], false));
    for i in 2..n {
        ns.matches.push(route(
            &[("step", &(i - 1).to_string())],
            &[("step", &i.to_string())],
            false,
        ));
    }
    mesh.register_service(ns).await.unwrap();
    let node = mesh.node(0);
    let mut nses = Vec::new();
    for i in 1..n {
        let spec = EndpointSpec::new(format!("nse-{i}"), "sfc").label("step", i.to_string());
        let spec = if i + 1 < n {
            node.passthrough_spec(spec, labels(&[("step", &i.to_string())]))
        } else {
            spec
        };
        nses.push(node.endpoint(spec).await.unwrap());
    }
    let nsc = node.client("nsc");
    let mut conn = nsc
        .request(&mut Cx::client(), request("sfc", &[("step", "start")]))
        .await
        .unwrap();
    let path = names(&conn);
    assert_eq!(path.len(), 4 * (n - 2) + 4, "{path:?}");
    assert_eq!(path[3], "nse-1");
    conn = nsc
        .request(&mut Cx::client(), refresh(&conn))
        .await
        .unwrap();
    assert_eq!(names(&conn), path);
    nsc.close(&mut Cx::client(), conn).await.unwrap();
    let closes: usize = nses.iter().map(|e| e.counter.closes()).sum();
    assert_eq!(closes, 6);
}

/// 5.2 item 14: a destination selector `nodeName: {{.nodeName}}` is templated from the
/// request's labels.
#[tokio::test]
async fn destination_selectors_are_templated_from_request_labels() {
    let mesh = Sandbox::builder().nodes(2).build().await.unwrap();
    mesh.register_service(NetworkService {
        name: "svc".into(),
        payload: "IP".into(),
        matches: vec![route(&[], &[("nodeName", "{{.nodeName}}")], false)],
        ..Default::default()
    })
    .await
    .unwrap();
    let on0 = mesh
        .node(0)
        .endpoint(EndpointSpec::new("nse-node-0", "svc").label("nodeName", "node-0"))
        .await
        .unwrap();
    let on1 = mesh
        .node(1)
        .endpoint(EndpointSpec::new("nse-node-1", "svc").label("nodeName", "node-1"))
        .await
        .unwrap();
    for (node, want) in [(0, "nse-node-0"), (1, "nse-node-1")] {
        let nsc = mesh.node(node).client("nsc");
        let conn = nsc
            .request(
                &mut Cx::client(),
                request("svc", &[("nodeName", &format!("node-{node}"))]),
            )
            .await
            .unwrap();
        assert_eq!(conn.network_service_endpoint_name, want);
        assert_eq!(
            names(&conn).len(),
            4,
            "the local endpoint was chosen, so the path is local"
        );
        nsc.close(&mut Cx::client(), conn).await.unwrap();
    }
    assert_eq!((on0.counter.closes(), on1.counter.closes()), (1, 1));
}

fn p2mp_service(p2mp: bool) -> NetworkService {
    NetworkService {
        name: "svc".into(),
        payload: "IP".into(),
        matches: vec![Match {
            source_selector: HashMap::new(),
            routes: vec![Destination {
                destination_selector: HashMap::new(),
                weight: 0,
            }],
            fallthrough: false,
            metadata: Some(Metadata {
                labels: if p2mp {
                    labels(&[("p2mp", "true")])
                } else {
                    HashMap::new()
                },
            }),
        }],
        ..Default::default()
    }
}

async fn point_to_multipoint(nodes: usize) {
    let mesh = Sandbox::builder()
        .nodes(nodes)
        .forwarders_per_node(0)
        .build()
        .await
        .unwrap();
    for n in 0..nodes {
        let node = mesh.node(n);
        node.add_forwarder(&format!("p2mp-{n}"), labels(&[("p2mp", "true")]))
            .await
            .unwrap();
        node.add_forwarder(&format!("p2p-{n}"), labels(&[("p2p", "true")]))
            .await
            .unwrap();
        node.add_forwarder(&format!("special-{n}"), labels(&[("special", "true")]))
            .await
            .unwrap();
    }
    mesh.register_service(p2mp_service(true)).await.unwrap();
    let _nse = mesh
        .node(0)
        .endpoint(EndpointSpec::new("nse", "svc"))
        .await
        .unwrap();
    let client_node = nodes - 1;
    let nsc = mesh.node(client_node).client("nsc");
    let conn = nsc
        .request(&mut Cx::client(), request("svc", &[]))
        .await
        .unwrap();
    let path = names(&conn);
    assert_eq!(path[2], format!("p2mp-{client_node}"));
    if nodes > 1 {
        assert_eq!(path[4], "p2mp-0");
    }
    nsc.close(&mut Cx::client(), conn).await.unwrap();

    let changed = mesh.register_service(p2mp_service(false)).await.unwrap();
    // The managers learn the change through their registry watch (at once in memory,
    // a watch round trip later on etcd): the selection is checked once both know it.
    for n in [0, client_node] {
        service_known(&mesh, n, &changed).await;
    }
    let conn = nsc
        .request(&mut Cx::client(), request("svc", &[]))
        .await
        .unwrap();
    let path = names(&conn);
    assert_eq!(path[2], format!("p2p-{client_node}"));
    if nodes > 1 {
        assert_eq!(path[4], "p2p-0");
    }
    nsc.close(&mut Cx::client(), conn).await.unwrap();
}

/// Waits until node `n`'s manager answers a Find of `ns` with `ns` as it is now.
async fn service_known(mesh: &Sandbox, n: usize, ns: &NetworkService) {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let query = Query {
            template: NetworkService {
                name: ns.name.clone(),
                ..Default::default()
            },
            watch: false,
        };
        let mut found = mesh
            .node(n)
            .registries()
            .ns
            .find(&mut Cx::client(), query)
            .await
            .unwrap();
        if let Some(Ok(f)) = found.next().await {
            if f.resource == *ns {
                return;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "node {n}'s manager never saw {ns:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// 5.2 item 15: metadata labels `p2mp=true` select the p2mp forwarder; with empty
/// metadata the default `p2p` forwarder is used.
#[tokio::test]
async fn point_to_multipoint_forwarder_is_selected_by_metadata_labels() {
    point_to_multipoint(1).await;
}

/// 5.2 item 16: the same on two nodes (segments 2 and 4).
#[tokio::test]
async fn remote_point_to_multipoint_forwarders_are_selected_on_both_nodes() {
    point_to_multipoint(2).await;
}
