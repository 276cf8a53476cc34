//! DNS for connections (docs/DNS.md; docs/SCENARIOS.md 46, and the DNS parts of 48 and
//! 49): an endpoint's DNS server names its clients and hands out its DNS config; the
//! client keeps the configs of its connections and applies them to its pod.
//!
//! The sandbox tests run with security on (mTLS, signed tokens, policies) and resolve
//! with a real stub resolver (hickory) through the configs the client holds. The
//! kernel test (root) resolves with glibc itself: `ip netns exec <pod> getent hosts`,
//! through the resolv.conf the client wrote for its pod, to a server inside the
//! endpoint's pod reached over the connection's interface. Only 172.16.x.x addresses
//! inside the test's namespaces, and loopback.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use nsm_proto::connection::Connection;
use nsm_sdk::chains::client;
use nsm_sdk::sandbox::{EndpointHandle, EndpointSpec, Sandbox};
use nsm_sdk::Cx;
use nsm_sdk_dns::{dns_context, dns_names, DnsContext, DnsNames, DnsServer, Records, ResolvConf};
use nsm_testkit::dns::{lookup, lookup_in};
use nsm_testkit::{client_without_refresh, refresh, request_labelled, unique};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// The client's (`src`) or the endpoint's address on `conn`, without the length.
fn conn_ip(conn: &Connection, src: bool) -> IpAddr {
    let ctx = conn.context.as_ref().unwrap().ip_context.as_ref().unwrap();
    let addr = if src {
        &ctx.src_ip_addrs[0]
    } else {
        &ctx.dst_ip_addrs[0]
    };
    ip(addr.split('/').next().unwrap())
}

/// The client's address on `conn`.
fn client_ip(conn: &Connection) -> IpAddr {
    conn_ip(conn, true)
}

/// The endpoint's address on `conn`.
fn endpoint_ip(conn: &Connection) -> IpAddr {
    conn_ip(conn, false)
}

/// A Request of `nsc` for `service` as the pod `pod` (its `podName` label).
async fn request_as(nsc: &nsm_sdk::Chain, service: &str, pod: &str) -> Connection {
    let req = request_labelled(service, &[("podName", pod)]);
    nsc.request(&mut Cx::client(), req).await.unwrap()
}

/// A DNS server on loopback with `records`.
async fn server(records: &Records, fanout: Vec<SocketAddr>) -> DnsServer {
    DnsServer::builder(records.clone())
        .ttl(1)
        .fanout(fanout)
        .bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap()
}

/// An endpoint `name` of `service` on node 0 handing out `prefix`, with `names`.
async fn endpoint(
    mesh: &Sandbox,
    name: &str,
    service: &str,
    prefix: &str,
    names: &DnsNames,
) -> EndpointHandle {
    let spec = EndpointSpec::new(name, service)
        .ipam(prefix.parse().unwrap())
        .handler(names.clone());
    mesh.node(0).endpoint(spec).await.unwrap()
}

/// Scenario 46: an endpoint with a DNS server and records, a client with the DNS
/// context. Nothing resolves before the Request; after it `my.domain`, `my.domain.com`
/// and, through the search domain `com`, `searched`, and the client's own name; a
/// refresh keeps them; after Close nothing resolves and the client's name is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_usecase_names_resolve_through_the_clients_config_only_while_connected() {
    let mesh = Sandbox::builder().build().await.unwrap();
    assert!(
        mesh.security().is_secure(),
        "the scenario runs with security on"
    );
    let records = Records::new();
    records
        .set("my.domain", "static", vec![ip("4.4.4.4")])
        .unwrap();
    records
        .set("my.domain.com", "static", vec![ip("4.4.4.5")])
        .unwrap();
    records
        .set("searched.com", "static", vec![ip("4.4.4.6")])
        .unwrap();
    let dns = server(&records, vec![]).await;
    let names = dns_names(records.clone())
        .server_ips(vec![dns.local_addr().to_string()])
        .search_domains(vec!["com".into()]);
    let _nse = endpoint(&mesh, "nse-dns", "dns-svc", "172.16.46.0/24", &names).await;
    let dir = std::env::temp_dir().join(unique("dns"));
    let _cleanup = RemoveOnDrop(dir.clone());
    let resolv = dir.join("resolv.conf");
    let ctx = dns_context().apply_to(ResolvConf::at(&resolv));
    let nsc = client(mesh.node(0).client_options("nsc").handler(ctx.clone()));

    assert!(
        lookup_in(&ctx.configs(), "my.domain").await.is_err(),
        "no config yet"
    );
    let at = [dns.local_addr()];
    assert!(
        lookup(&at, &[], "nsc-pod.dns-svc").await.is_err(),
        "not named yet"
    );

    let req = request_labelled("dns-svc", &[("podName", "nsc-pod")]);
    let conn = nsc.request(&mut Cx::client(), req).await.unwrap();
    let configs = ctx.configs();
    assert_eq!(configs.len(), 1, "{configs:?}");
    assert_eq!(configs[0].search_domains, ["com"]);
    let resolves = |name: &'static str, want: IpAddr| {
        let configs = ctx.configs();
        async move {
            assert_eq!(
                lookup_in(&configs, name).await,
                Ok(vec![want]),
                "{name} through {configs:?}"
            );
        }
    };
    resolves("my.domain", ip("4.4.4.4")).await;
    resolves("my.domain.com", ip("4.4.4.5")).await;
    resolves("searched", ip("4.4.4.6")).await;
    assert_eq!(
        lookup_in(&configs, "nsc-pod.dns-svc").await,
        Ok(vec![client_ip(&conn)])
    );
    // The server is not on port 53: the pod's resolv.conf carries the search domain,
    // and no nameserver it could not reach.
    let file = std::fs::read_to_string(&resolv).unwrap();
    assert!(file.contains("search com\n"), "{file}");
    assert!(!file.contains("nameserver"), "{file}");

    let conn = nsc
        .request(&mut Cx::client(), refresh(&conn))
        .await
        .unwrap();
    assert_eq!(ctx.configs(), configs, "a refresh keeps one config");
    resolves("my.domain.com", ip("4.4.4.5")).await;
    assert_eq!(
        lookup_in(&ctx.configs(), "nsc-pod.dns-svc").await,
        Ok(vec![client_ip(&conn)])
    );

    nsc.close(&mut Cx::client(), conn).await.unwrap();
    assert!(ctx.configs().is_empty());
    assert!(lookup_in(&ctx.configs(), "my.domain").await.is_err());
    assert!(
        lookup(&at, &[], "nsc-pod.dns-svc").await.is_err(),
        "name removed"
    );
    assert_eq!(names.connections(), 0);
    assert!(!resolv.exists() && !dir.exists(), "the pod's file is gone");
}

/// The endpoint's expiry of a connection (a client that stopped refreshing) removes the
/// client's name like a Close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_connection_loses_its_name() {
    let mesh = Sandbox::builder().build().await.unwrap();
    let records = Records::new();
    let names = dns_names(records.clone());
    let nse = endpoint(&mesh, "nse", "svc", "172.16.47.0/24", &names).await;
    let dead = client_without_refresh(&mesh, 0, "dead-nsc", Duration::from_secs(2));
    let req = request_labelled("svc", &[("podName", "gone")]);
    dead.request(&mut Cx::client(), req).await.unwrap();
    assert!(records.lookup("gone.svc").is_some());
    nsm_testkit::eventually("the endpoint's expiry", Duration::from_secs(4), || {
        nse.counter.closes() == 1
    })
    .await;
    assert!(records.lookup("gone.svc").is_none(), "{records:?}");
    assert_eq!(names.connections(), 0);
}

/// A client of `service` (pod `pod`) with its own DNS context.
async fn connect(
    mesh: &Sandbox,
    service: &str,
    pod: &str,
) -> (nsm_sdk::Chain, DnsContext, Connection) {
    let ctx = dns_context();
    let nsc = client(mesh.node(0).client_options(pod).handler(ctx.clone()));
    let conn = request_as(&nsc, service, pod).await;
    (nsc, ctx, conn)
}

/// Scenario 49's DNS part: two endpoints whose servers fan out to each other. A client
/// of one resolves the name of a client of the other through its own config (by
/// fanout), across a refresh; after that client closes, its name stops resolving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_held_by_another_endpoints_server_resolves_by_fanout() {
    let mesh = Sandbox::builder().build().await.unwrap();
    let (ra, rb) = (Records::new(), Records::new());
    let a = server(&ra, vec![]).await;
    let b = server(&rb, vec![a.local_addr()]).await;
    a.fanout().set_servers(vec![b.local_addr()]);
    let mut endpoints = Vec::new();
    for (name, service, records, srv, prefix) in [
        ("nse-a", "net-a", &ra, &a, "172.16.49.0/25"),
        ("nse-b", "net-b", &rb, &b, "172.16.49.128/25"),
    ] {
        let names = dns_names(records.clone()).server_ips(vec![srv.local_addr().to_string()]);
        endpoints.push(endpoint(&mesh, name, service, prefix, &names).await);
    }
    let (nsc_a, _ctx_a, alpha) = connect(&mesh, "net-a", "alpha").await;
    let (nsc_b, ctx_b, beta) = connect(&mesh, "net-b", "beta").await;
    assert_eq!(
        ctx_b.configs()[0].dns_server_ips,
        [b.local_addr().to_string()]
    );

    assert_eq!(
        lookup_in(&ctx_b.configs(), "alpha.net-a").await,
        Ok(vec![client_ip(&alpha)]),
        "A's name through B's server"
    );
    assert_eq!(
        lookup_in(&ctx_b.configs(), "beta.net-b").await,
        Ok(vec![client_ip(&beta)])
    );
    let alpha = nsc_a
        .request(&mut Cx::client(), refresh(&alpha))
        .await
        .unwrap();
    assert_eq!(
        lookup_in(&ctx_b.configs(), "alpha.net-a").await,
        Ok(vec![client_ip(&alpha)])
    );

    nsc_a.close(&mut Cx::client(), alpha).await.unwrap();
    // B may answer from its cache for the records' TTL (1 s), not longer.
    let until = std::time::Instant::now() + Duration::from_secs(3);
    while lookup_in(&ctx_b.configs(), "alpha.net-a").await.is_ok() {
        assert!(
            std::time::Instant::now() < until,
            "alpha.net-a still resolves"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    nsc_b.close(&mut Cx::client(), beta).await.unwrap();
    assert!(ra.is_empty() && rb.is_empty());
}

/// Removes a directory when dropped, also when the test fails half way.
struct RemoveOnDrop(std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A DNS server on port 53 of `pod` (all its addresses) and a KERNEL endpoint `name` of
/// `service` in `pod` naming its clients there, with `service` as search domain.
async fn kernel_dns_endpoint(
    mesh: &Sandbox,
    name: &str,
    service: &str,
    pod: &nsm_testkit::Ns,
    prefix: &str,
) -> (DnsServer, Records, EndpointHandle) {
    let records = Records::new();
    let (udp, tcp) = pod
        .open()
        .run(|| {
            (
                std::net::UdpSocket::bind("0.0.0.0:53"),
                std::net::TcpListener::bind("0.0.0.0:53"),
            )
        })
        .await
        .unwrap();
    let dns = DnsServer::builder(records.clone())
        .serve(udp.unwrap(), tcp.unwrap())
        .unwrap();
    let names = dns_names(records.clone())
        .server_on_connection_dst()
        .search_domains(vec![service.into()]);
    let nse = mesh
        .node(0)
        .endpoint(nsm_testkit::kernel::kernel_nse(name, service, pod, prefix).handler(names))
        .await
        .unwrap();
    (dns, records, nse)
}

/// As root: a KERNEL client pod connected to two endpoints, each with a DNS server on
/// port 53 of its own pod. The client writes `/etc/netns/<pod>/resolv.conf` with the
/// far end of each connection as a nameserver; glibc in the pod (`getent hosts`)
/// resolves the client's name at each endpoint, a short name through the search domain
/// and a static record, over the connections' interfaces: a name the first server does
/// not hold is answered by the second after the first refused (no proxy needed). A
/// refresh keeps it; after each Close that endpoint's names stop resolving, and after
/// the last the file and its directory are gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kernel_pod_resolves_with_glibc_through_its_resolv_conf_while_connected() {
    nsm_testkit::require_root!("DNS kernel test");
    let pod = nsm_testkit::Ns::new();
    let (nse1_pod, nse2_pod) = (nsm_testkit::Ns::new(), nsm_testkit::Ns::new());
    let mesh = nsm_testkit::kernel::kernel_sandbox().build().await.unwrap();
    let (_dns1, records1, _nse1) =
        kernel_dns_endpoint(&mesh, "nse-1", "svc-one", &nse1_pod, "172.16.48.0/25").await;
    let (_dns2, records2, _nse2) =
        kernel_dns_endpoint(&mesh, "nse-2", "svc-two", &nse2_pod, "172.16.48.128/25").await;
    records1
        .set("my.domain", "static", vec![ip("172.16.48.100")])
        .unwrap();
    let resolv = ResolvConf::netns(&pod.name).unwrap();
    let file = resolv.path().to_path_buf();
    let _cleanup = RemoveOnDrop(file.parent().unwrap().to_path_buf());
    // One DNS context for the pod, in both clients (one interface each).
    let ctx = dns_context().apply_to(resolv);
    let nsc = |ifname: &str| {
        client(
            nsm_testkit::kernel::kernel_nsc(mesh.node(0), &pod, Some(ifname)).handler(ctx.clone()),
        )
    };
    let (nsc1, nsc2) = (nsc("nsm-1"), nsc("nsm-2"));

    assert!(!file.exists());
    assert_eq!(
        pod.getent_hosts("web-1.svc-one"),
        None,
        "before the Request"
    );

    let conn1 = request_as(&nsc1, "svc-one", "web-1").await;
    let me1 = client_ip(&conn1).to_string();
    let server1 = endpoint_ip(&conn1).to_string();
    let content = std::fs::read_to_string(&file).unwrap();
    assert!(
        content.contains(&format!("nameserver {server1}\n")) && content.contains("search svc-one"),
        "{content}"
    );
    assert_eq!(pod.getent_hosts("web-1.svc-one"), Some(vec![me1.clone()]));
    assert_eq!(
        pod.getent_hosts("web-1"),
        Some(vec![me1.clone()]),
        "search domain"
    );
    assert_eq!(
        pod.getent_hosts("my.domain"),
        Some(vec!["172.16.48.100".to_string()])
    );

    let conn2 = request_as(&nsc2, "svc-two", "web-1").await;
    let me2 = client_ip(&conn2).to_string();
    assert_ne!(me1, me2);
    // The first nameserver refuses this name; glibc asks the second.
    assert_eq!(pod.getent_hosts("web-1.svc-two"), Some(vec![me2.clone()]));
    assert_eq!(pod.getent_hosts("web-1.svc-one"), Some(vec![me1.clone()]));

    let conn1 = nsc1
        .request(&mut Cx::client(), refresh(&conn1))
        .await
        .unwrap();
    assert_eq!(
        pod.getent_hosts("web-1.svc-one"),
        Some(vec![me1]),
        "after refresh"
    );

    nsc1.close(&mut Cx::client(), conn1).await.unwrap();
    assert_eq!(pod.getent_hosts("web-1.svc-one"), None, "after its Close");
    assert_eq!(pod.getent_hosts("web-1.svc-two"), Some(vec![me2]));
    let content = std::fs::read_to_string(&file).unwrap();
    assert!(
        !content.contains(&format!("nameserver {server1}\n")),
        "{content}"
    );

    nsc2.close(&mut Cx::client(), conn2).await.unwrap();
    assert!(!file.exists(), "resolv.conf gone");
    assert!(
        !file.parent().is_some_and(Path::exists),
        "its directory gone"
    );
    assert_eq!(pod.getent_hosts("web-1.svc-two"), None, "after Close");
    assert!(records1.lookup("web-1.svc-one").is_none() && records2.is_empty());
}
