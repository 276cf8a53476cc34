//! Interdomain scenarios (docs/SCENARIOS.md 5.9: 55 to 61) through an in-process
//! multi-domain mesh (`nsm_sdk::sandbox::Interdomain`): each cluster its own sandbox and
//! trust domain (security on, bundles federated), a registry proxy and an nsmgr-proxy
//! per cluster, floating registries, and a real DNS server (dnsmasq) serving the SRV
//! records the domains find each other by. Skipped (passing, with a line saying so)
//! where dnsmasq is not installed.

use nsm_proto::connection::Connection;
use nsm_proto::networkservice::NetworkServiceRequest;
use nsm_sdk::sandbox::{EndpointSpec, Interdomain, InterdomainBuilder};
use nsm_sdk::{async_trait, Cx, Handler, Next, Result};
use nsm_testkit::dns::{dnsmasq, free_addr, DnsServer};
use nsm_testkit::{names, refresh, request};

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
        if conn.network_service.contains('@') || conn.network_service_endpoint_name.contains('@')
        {
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
    assert_eq!(nse.counter.closes(), before_close + 1, "the Close crossed the border");
    conn
}

/// 5.9 item 55: `ns@cluster2` from cluster1: 8 segments (nsc, nsmgr1, fwd1, proxy1,
/// proxy2, nsmgr2, fwd2, nse); the NSE never sees `@`; refresh keeps 8; the Close
/// reaches the NSE.
#[tokio::test]
async fn interdomain_usecase_has_eight_segments_and_the_endpoint_sees_no_domain() {
    let Some(mesh) = start(
        Interdomain::builder()
            .cluster("cluster1", 1)
            .cluster("cluster2", 1),
    )
    .await
    else {
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
