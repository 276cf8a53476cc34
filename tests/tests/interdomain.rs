//! Interdomain scenarios (docs/SCENARIOS.md 5.9: 55 to 61) through an in-process
//! multi-domain mesh (`nsm_sdk::sandbox::Interdomain`): each cluster its own sandbox and
//! trust domain (security on, bundles federated), a registry proxy and an nsmgr-proxy
//! per cluster, floating registries, and a real DNS server (dnsmasq) serving the SRV
//! records the domains find each other by. Skipped (passing, with a line saying so)
//! where dnsmasq is not installed.

use nsm_proto::connection::Connection;
use std::time::{Duration, Instant};

use nsm_proto::networkservice::NetworkServiceRequest;
use nsm_proto::registry::{NetworkService, NetworkServiceEndpoint};
use nsm_sdk::chains::client;
use nsm_sdk::handlers::{connect, heal, passthrough, HealOptions};
use nsm_sdk::registry::RegistryChain;
use nsm_sdk::sandbox::{EndpointSpec, Interdomain, InterdomainBuilder, Sandbox};
use nsm_sdk::transport::grpc_registry;
use nsm_sdk::{async_trait, Cx, Handler, Next, Result};
use nsm_testkit::dnsmasq::{dnsmasq, free_addr, DnsServer};
use nsm_testkit::{eventually, names, refresh, request, Answers};

/// A started mesh and the DNS server it finds its domains on.
struct Mesh {
    mesh: Interdomain,
    dns: DnsServer,
}

impl std::ops::Deref for Mesh {
    type Target = Interdomain;
    fn deref(&self) -> &Interdomain {
        &self.mesh
    }
}

/// Builds `builder`'s domains and starts dnsmasq with their records; `None` (the test
/// skips) without dnsmasq.
async fn start(builder: InterdomainBuilder) -> Option<Mesh> {
    let program = dnsmasq("the interdomain scenarios")?;
    let addr = free_addr();
    let mesh = builder.dns_server(addr).build().await.unwrap();
    let dns = DnsServer::start(&program, addr, &mesh.dns_records(), &mesh.domain_names()).unwrap();
    Some(Mesh { mesh, dns })
}

/// `cluster1` and `cluster2` (one node each), with `floating.domain` when asked.
async fn two_clusters(floating: bool) -> Option<Mesh> {
    let mut b = Interdomain::builder()
        .cluster("cluster1", 1)
        .cluster("cluster2", 1);
    if floating {
        b = b.floating("floating.domain");
    }
    start(b).await
}

/// Fails any request whose network service names a domain: the endpoint must never
/// see `@`.
#[derive(Clone, Default)]
struct NoDomainSeen;

#[async_trait]
impl Handler for NoDomainSeen {
    async fn request(
        &self,
        cx: &mut Cx,
        req: NetworkServiceRequest,
        next: Next,
    ) -> Result<Connection> {
        let conn = req.connection.clone().unwrap_or_default();
        if conn.network_service.contains('@') || conn.network_service_endpoint_name.contains('@') {
            return Err(nsm_sdk::Error::invalid(format!(
                "the endpoint saw {} / {}",
                conn.network_service, conn.network_service_endpoint_name
            )));
        }
        next.request(cx, req).await
    }
}

fn path_of(c1: &str, c2: &str, nse: &str) -> Vec<String> {
    [
        "nsc",
        "nsmgr-0",
        "forwarder-0-0",
        &format!("nsmgr-proxy-{c1}"),
        &format!("nsmgr-proxy-{c2}"),
        "nsmgr-0",
        "forwarder-0-0",
        nse,
    ]
    .map(String::from)
    .to_vec()
}

/// Requests `service` from cluster1's node 0, refreshes (same 8 segments, same
/// endpoint), closes; returns the connection.
async fn request_refresh_close(
    mesh: &Mesh,
    service: &str,
    path: &[String],
    nse: &nsm_sdk::sandbox::EndpointHandle,
) -> Connection {
    let nsc = mesh.domain("cluster1").node(0).client("nsc");
    let (before_req, before_close) = (nse.counter.requests(), nse.counter.closes());
    let conn = nsc
        .request(&mut Cx::client(), request(service))
        .await
        .unwrap();
    assert_eq!(names(&conn), path);
    assert_eq!(conn.network_service, service, "the caller keeps its names");
    let again = nsc
        .request(&mut Cx::client(), refresh(&conn))
        .await
        .unwrap();
    assert_eq!(names(&again), path);
    assert_eq!(again.id, conn.id);
    assert_eq!(nse.counter.requests(), before_req + 2);
    assert_eq!(nse.counter.unique_requests(), 1);
    nsc.close(&mut Cx::client(), again).await.unwrap();
    assert_eq!(
        nse.counter.closes(),
        before_close + 1,
        "the Close crossed the border"
    );
    conn
}

/// 5.9 item 55: `ns@cluster2` from cluster1: 8 segments (nsc, nsmgr1, fwd1, proxy1,
/// proxy2, nsmgr2, fwd2, nse); the NSE never sees `@`; refresh keeps 8; the Close
/// reaches the NSE.
#[tokio::test]
async fn interdomain_usecase_has_eight_segments_and_the_endpoint_sees_no_domain() {
    let Some(mesh) = two_clusters(false).await else {
        return;
    };
    let nse = mesh
        .domain("cluster2")
        .node(0)
        .endpoint(EndpointSpec::new("final-endpoint", "my-service").handler(NoDomainSeen))
        .await
        .unwrap();
    request_refresh_close(
        &mesh,
        "my-service@cluster2",
        &path_of("cluster1", "cluster2", "final-endpoint"),
        &nse,
    )
    .await;
}

/// cluster2's endpoint `final-endpoint@floating.domain` serving `service` is
/// registered in the floating registry (its names there without the domain: `services`
/// lists the floating registry's services after); `my-service@floating.domain` from
/// cluster1 reaches it: 8 segments, refresh, Close.
async fn floating_usecase(service: &str) -> Option<Vec<String>> {
    let mesh = two_clusters(true).await?;
    let nse = mesh
        .domain("cluster2")
        .node(0)
        .endpoint(EndpointSpec::new("final-endpoint@floating.domain", service))
        .await
        .unwrap();
    // cluster2's manager finds it (through the floating registry) by its full name.
    let found = mesh
        .domain("cluster2")
        .node(0)
        .registries()
        .nse
        .list(&mut Cx::client(), by_name("final-endpoint@floating.domain"))
        .await
        .unwrap();
    assert_eq!(found.len(), 1);
    let floating = mesh.domain("floating.domain").registries();
    let nses = floating
        .nse
        .list(&mut Cx::client(), by_name("final-endpoint"))
        .await
        .unwrap();
    assert_eq!(nses[0].network_service_names, ["my-service"]);
    request_refresh_close(
        &mesh,
        "my-service@floating.domain",
        &path_of("cluster1", "cluster2", "final-endpoint@floating.domain"),
        &nse,
    )
    .await;
    let services = floating
        .ns
        .list(&mut Cx::client(), NetworkService::default())
        .await
        .unwrap();
    Some(services.into_iter().map(|s| s.name).collect())
}

/// 58: `my-service@floating.domain` is found through the floating registry, where
/// cluster2 registered its endpoint as `final-endpoint@floating.domain` serving
/// `my-service` (a service of cluster2).
#[tokio::test]
async fn floating_usecase_reaches_the_endpoint_through_the_floating_registry() {
    if let Some(services) = floating_usecase("my-service").await {
        assert!(services.is_empty(), "{services:?}");
    }
}

/// 59: the same with the endpoint registered directly under floating names:
/// `final-endpoint@floating.domain` serving `my-service@floating.domain` (the service
/// is registered in the floating registry, as `my-service`).
#[tokio::test]
async fn floating_usecase_with_a_floating_service_name_registration() {
    if let Some(services) = floating_usecase("my-service@floating.domain").await {
        assert_eq!(services, ["my-service"]);
    }
}

fn by_name(name: &str) -> NetworkServiceEndpoint {
    NetworkServiceEndpoint {
        name: name.into(),
        ..Default::default()
    }
}

/// 56: one endpoint registered in cluster2 (`final-endpoint`) and one moved to the
/// floating domain (`final-endpoint@floating.domain`), both serving `my-service`. Each
/// is only in its own registry, and `my-service@cluster2` and
/// `my-service@floating.domain` each reach the right one (segment 7).
#[tokio::test]
async fn an_endpoint_moved_to_the_floating_domain_is_found_only_there() {
    let Some(mesh) = two_clusters(true).await else {
        return;
    };
    let node = mesh.domain("cluster2").node(0);
    let local = node
        .endpoint(EndpointSpec::new("final-endpoint", "my-service"))
        .await
        .unwrap();
    let moved = node
        .endpoint(EndpointSpec::new(
            "final-endpoint@floating.domain",
            "my-service",
        ))
        .await
        .unwrap();
    let count = |d: &str| {
        let regs = mesh.domain(d).registries();
        async move {
            regs.nse
                .list(&mut Cx::client(), by_name("final-endpoint"))
                .await
                .unwrap()
                .len()
        }
    };
    assert_eq!(count("cluster2").await, 1);
    assert_eq!(count("cluster1").await, 0);
    assert_eq!(count("floating.domain").await, 1);
    request_refresh_close(
        &mesh,
        "my-service@cluster2",
        &path_of("cluster1", "cluster2", "final-endpoint"),
        &local,
    )
    .await;
    request_refresh_close(
        &mesh,
        "my-service@floating.domain",
        &path_of("cluster1", "cluster2", "final-endpoint@floating.domain"),
        &moved,
    )
    .await;
    assert_eq!(
        local.counter.requests(),
        2,
        "the floating requests went elsewhere"
    );
}

/// 57: one NSC reaches two network services of cluster2 (two nodes there), 8 segments
/// each, with refresh.
#[tokio::test]
async fn one_client_reaches_two_services_of_another_domain() {
    let Some(mesh) = start(
        Interdomain::builder()
            .cluster("cluster1", 1)
            .cluster("cluster2", 2),
    )
    .await
    else {
        return;
    };
    let c2 = mesh.domain("cluster2");
    let nse1 = c2
        .node(0)
        .endpoint(EndpointSpec::new("final-endpoint-1", "my-service-1"))
        .await
        .unwrap();
    let nse2 = c2
        .node(1)
        .endpoint(EndpointSpec::new("final-endpoint-2", "my-service-2"))
        .await
        .unwrap();
    let nsc = mesh.domain("cluster1").node(0).client("nsc");
    let mut conns = Vec::new();
    for (service, nse) in [
        ("my-service-1", "final-endpoint-1"),
        ("my-service-2", "final-endpoint-2"),
    ] {
        let conn = nsc
            .request(&mut Cx::client(), request(&format!("{service}@cluster2")))
            .await
            .unwrap();
        assert_eq!(names(&conn).len(), 8);
        assert_eq!(names(&conn)[7], nse);
        let again = nsc
            .request(&mut Cx::client(), refresh(&conn))
            .await
            .unwrap();
        assert_eq!(names(&again), names(&conn));
        conns.push(again);
    }
    assert_eq!(
        names(&conns[1])[5],
        "nsmgr-1",
        "the second endpoint is on node 1"
    );
    for conn in conns {
        nsc.close(&mut Cx::client(), conn).await.unwrap();
    }
    assert_eq!((nse1.counter.requests(), nse1.counter.closes()), (2, 1));
    assert_eq!((nse2.counter.requests(), nse2.counter.closes()), (2, 1));
}

/// 60: four domains: two floating network services, one served from cluster2 and one
/// from cluster3, both reached from cluster1.
#[tokio::test]
async fn floating_services_of_two_clusters_are_reached_from_a_third() {
    let Some(mesh) = start(
        Interdomain::builder()
            .cluster("cluster1", 1)
            .cluster("cluster2", 1)
            .cluster("cluster3", 1)
            .floating("floating.domain"),
    )
    .await
    else {
        return;
    };
    let nse2 = mesh
        .domain("cluster2")
        .node(0)
        .endpoint(EndpointSpec::new(
            "final-endpoint-2@floating.domain",
            "my-service-2@floating.domain",
        ))
        .await
        .unwrap();
    let nse3 = mesh
        .domain("cluster3")
        .node(0)
        .endpoint(EndpointSpec::new(
            "final-endpoint-3@floating.domain",
            "my-service-3@floating.domain",
        ))
        .await
        .unwrap();
    request_refresh_close(
        &mesh,
        "my-service-2@floating.domain",
        &path_of("cluster1", "cluster2", "final-endpoint-2@floating.domain"),
        &nse2,
    )
    .await;
    request_refresh_close(
        &mesh,
        "my-service-3@floating.domain",
        &path_of("cluster1", "cluster3", "final-endpoint-3@floating.domain"),
        &nse3,
    )
    .await;
}

/// Requests `service` from cluster1 once (no retry): the error must come within
/// `within`, with `code`, its message containing `says`.
async fn fails_fast(mesh: &Mesh, service: &str, code: tonic::Code, says: &str, within: Duration) {
    let nsc = client(
        mesh.domain("cluster1")
            .node(0)
            .client_options("nsc")
            .retry(None),
    );
    let started = Instant::now();
    let err = nsc
        .request(&mut Cx::client(), request(service))
        .await
        .unwrap_err();
    assert_eq!(err.code(), code, "{err}");
    assert!(err.to_string().contains(says), "{err}");
    assert!(started.elapsed() < within, "{:?}", started.elapsed());
}

/// A domain DNS has no record for: the client gets NotFound naming the record, fast.
#[tokio::test]
async fn a_domain_without_dns_records_is_not_found_quickly() {
    let Some(mesh) = two_clusters(false).await else {
        return;
    };
    // `cluster2` is a domain the server answers for, so an unknown name under it is
    // NXDOMAIN at once.
    fails_fast(
        &mesh,
        "svc@nowhere.cluster2",
        tonic::Code::NotFound,
        "registry.nsm-system.nowhere.cluster2",
        Duration::from_secs(3),
    )
    .await;
}

/// The DNS server is down: the client gets Unavailable within the lookup bounds, not a
/// hang.
#[tokio::test]
async fn a_dns_server_down_is_unavailable_quickly() {
    let Some(mut mesh) = start(
        Interdomain::builder()
            .cluster("cluster1", 1)
            .cluster("cluster2", 1)
            .dns_timeout(Duration::from_millis(500)),
    )
    .await
    else {
        return;
    };
    mesh.dns.stop();
    fails_fast(
        &mesh,
        "svc@cluster2",
        tonic::Code::Unavailable,
        "DNS",
        Duration::from_secs(4),
    )
    .await;
}

/// 61: five clusters; the endpoint of cluster i passes each connection through to the
/// service of cluster i-1 (`svc-{i-1}@cluster{i-1}`). From cluster 5 the path has
/// `8·(n−1)+4` segments, each endpoint at its place; refreshes keep it; the Close
/// reaches all five endpoints.
#[tokio::test]
async fn a_passthrough_chain_crosses_five_domains() {
    const N: usize = 5;
    let mut builder = Interdomain::builder();
    for i in 1..=N {
        builder = builder.cluster(format!("cluster{i}"), 1);
    }
    let Some(mesh) = start(builder).await else {
        return;
    };
    let mut nses = Vec::new();
    for i in 1..=N {
        let node = mesh.domain(&format!("cluster{i}")).node(0);
        let name = format!("nse-{i}");
        let mut spec = EndpointSpec::new(&name, format!("svc-{i}"));
        if i > 1 {
            let downstream = client(node.client_options(&format!("{name}-client")).retry(None));
            spec = spec
                .handler(passthrough().service(format!("svc-{}@cluster{}", i - 1, i - 1)))
                .handler(connect(downstream));
        }
        nses.push(node.endpoint(spec).await.unwrap());
    }
    let nsc = mesh.domain(&format!("cluster{N}")).node(0).client("nsc");
    let mut conn = nsc
        .request(&mut Cx::client(), request(&format!("svc-{N}")))
        .await
        .unwrap();
    let path = names(&conn);
    assert_eq!(path.len(), 8 * (N - 1) + 4, "{path:?}");
    for k in 0..N {
        assert_eq!(path[3 + 8 * k], format!("nse-{}", N - k), "{path:?}");
    }
    assert_eq!(path[4], format!("nse-{N}-client"));
    assert_eq!(path[7], format!("nsmgr-proxy-cluster{N}"));
    assert_eq!(path[8], format!("nsmgr-proxy-cluster{}", N - 1));
    for _ in 0..3 {
        conn = nsc
            .request(&mut Cx::client(), refresh(&conn))
            .await
            .unwrap();
        assert_eq!(names(&conn), path);
    }
    nsc.close(&mut Cx::client(), conn).await.unwrap();
    for nse in &nses {
        assert_eq!(nse.counter.unique_requests(), 1, "{}", nse.name);
        assert_eq!(nse.counter.closes(), 1, "{}", nse.name);
    }
}

/// An NSC of cluster1 with `heal`, and the answers it got.
fn healing_nsc(mesh: &Mesh) -> (nsm_sdk::Chain, Answers) {
    let node = mesh.domain("cluster1").node(0);
    let answers = Answers::default();
    let chain = client(
        node.client_options("nsc")
            .handler(heal(HealOptions::new(node.channels())))
            .handler(answers.clone()),
    );
    (chain, answers)
}

/// The endpoint in cluster2 dies (and is unregistered); heal reselects there: the
/// connection moves to the other endpoint of the service, still 8 segments, and a
/// Close reaches it.
#[tokio::test]
async fn the_remote_endpoint_dies_and_heal_reselects_in_its_domain() {
    let Some(mesh) = two_clusters(false).await else {
        return;
    };
    let node = mesh.domain("cluster2").node(0);
    let nse1 = node
        .endpoint(EndpointSpec::new("nse-1", "svc"))
        .await
        .unwrap();
    let (nsc, answers) = healing_nsc(&mesh);
    let conn = nsc
        .request(&mut Cx::client(), request("svc@cluster2"))
        .await
        .unwrap();
    assert_eq!(conn.network_service_endpoint_name, "nse-1@cluster2");
    nse1.kill();
    nse1.unregister().await.unwrap();
    let nse2 = node
        .endpoint(EndpointSpec::new("nse-2", "svc"))
        .await
        .unwrap();
    eventually("healed to nse-2", Duration::from_secs(10), || {
        answers.last_endpoint() == "nse-2@cluster2"
    })
    .await;
    assert_eq!(nse2.counter.unique_requests(), 1);
    let conn = nsc
        .request(&mut Cx::client(), refresh(&conn))
        .await
        .unwrap();
    assert_eq!(names(&conn).len(), 8);
    assert_eq!(names(&conn)[7], "nse-2");
    nsc.close(&mut Cx::client(), conn).await.unwrap();
    assert_eq!(nse2.counter.closes(), 1);
}

/// cluster2's nsmgr-proxy restarts (its state lost): the connection heals through the
/// new one to the same endpoint, and later refreshes and the Close cross it.
#[tokio::test]
async fn an_nsmgr_proxy_restart_heals() {
    let Some(mesh) = two_clusters(false).await else {
        return;
    };
    let nse = mesh
        .domain("cluster2")
        .node(0)
        .endpoint(EndpointSpec::new("nse-1", "svc"))
        .await
        .unwrap();
    let (nsc, answers) = healing_nsc(&mesh);
    let conn = nsc
        .request(&mut Cx::client(), request("svc@cluster2"))
        .await
        .unwrap();
    let before = answers.count();
    mesh.domain("cluster2").kill_nsmgr_proxy();
    mesh.domain("cluster2").start_nsmgr_proxy().await.unwrap();
    eventually(
        "healed through the new proxy",
        Duration::from_secs(10),
        || answers.count() > before,
    )
    .await;
    let conn = nsc
        .request(&mut Cx::client(), refresh(&conn))
        .await
        .unwrap();
    assert_eq!(names(&conn).len(), 8);
    assert_eq!(conn.network_service_endpoint_name, "nse-1@cluster2");
    assert_eq!(
        nse.counter.unique_requests(),
        1,
        "the same endpoint connection"
    );
    nsc.close(&mut Cx::client(), conn).await.unwrap();
    assert!(nse.counter.closes() >= 1);
}

/// Security holds at the border: a component whose bundle does not hold cluster2's CA
/// (a sandbox of a trust domain outside the federation) cannot even list cluster2's
/// registry, while cluster1's federated identity can.
#[tokio::test]
async fn only_federated_domains_get_across_the_border() {
    let Some(mesh) = two_clusters(false).await else {
        return;
    };
    let target = mesh.domain("cluster2").registry_url().clone();
    let list = |channels: nsm_sdk::transport::Channels| {
        let chain = RegistryChain::<NetworkServiceEndpoint>::builder()
            .push(grpc_registry(channels, target.clone()))
            .build();
        async move { chain.list(&mut Cx::client(), by_name("x")).await }
    };
    assert!(list(mesh.domain("cluster1").channels()).await.is_ok());
    let stranger = Sandbox::builder().build().await.unwrap();
    let err = list(stranger.channels()).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err}");
}
