//! The interdomain programs as processes (docs/INTERDOMAIN.md): two domains, each with
//! `nsm-registry` (handing `@` names to its `nsm-registry-proxy`), `nsm-registry-proxy`,
//! `nsmgr-proxy`, `nsmgr` and `nsm-forwarder`; an `nse-icmp-responder` in `cluster2` and
//! an `nsc` in `cluster1` asking for `icmp-responder@cluster2`; the domains find each
//! other through a real DNS server (dnsmasq) on loopback. The data plane is NOOP (no
//! root needed); the VXLAN path across public addresses is not tested here.
//!
//! The binaries are looked up as in `processes.rs` (built first when missing). All
//! programs share the test's CA (one trust domain): federation across trust domains is
//! tested in `interdomain.rs`.

use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use nsm_testkit::dnsmasq::{dnsmasq, free_addr, DnsServer};
use nsm_tests::{Proc, TempDir};
use serde_json::Value;

const READY: Duration = Duration::from_secs(20);

fn free_tcp() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
}

fn tcp(addr: SocketAddr) -> String {
    format!("tcp://{addr}")
}

/// The addresses of one domain's programs.
struct Domain {
    name: &'static str,
    registry: SocketAddr,
    registry_proxy: SocketAddr,
    nsmgr_proxy: SocketAddr,
    nsmgr: SocketAddr,
}

impl Domain {
    fn new(name: &'static str) -> Domain {
        Domain {
            name,
            registry: free_tcp(),
            registry_proxy: free_tcp(),
            nsmgr_proxy: free_tcp(),
            nsmgr: free_tcp(),
        }
    }

    /// Starts the domain's registry, proxies, manager and forwarder.
    fn start(&self, dir: &TempDir, dns: SocketAddr) -> Vec<Proc> {
        let dns = dns.to_string();
        let start = |program: &str, name: String, env: &[(&str, &str)], ready: &[&str]| {
            let mut p = nsm_tests::start(dir, program, &name, env, false, READY);
            p.wait_for_log(ready);
            p
        };
        let (reg, reg_proxy, proxy, nsmgr) = (
            tcp(self.registry),
            tcp(self.registry_proxy),
            tcp(self.nsmgr_proxy),
            tcp(self.nsmgr),
        );
        vec![
            start(
                "nsm-registry",
                format!("registry-{}", self.name),
                &[
                    ("NSM_LISTEN_ON", &reg),
                    ("NSM_REGISTRY_PROXY_URL", &reg_proxy),
                ],
                &["serving", &reg],
            ),
            start(
                "nsm-registry-proxy",
                format!("registry-proxy-{}", self.name),
                &[
                    ("NSM_LISTEN_ON", &reg_proxy),
                    ("NSM_NSMGR_PROXY_URL", &proxy),
                    ("NSM_DNS_SERVER", &dns),
                ],
                &["serving", &reg_proxy],
            ),
            start(
                "nsmgr-proxy",
                format!("nsmgr-proxy-{}", self.name),
                &[
                    ("NSM_NAME", &format!("nsmgr-proxy-{}", self.name)),
                    ("NSM_DOMAIN", self.name),
                    ("NSM_LISTEN_ON", &proxy),
                    ("NSM_REGISTRY_URL", &reg),
                    ("NSM_DNS_SERVER", &dns),
                    ("NSM_ADDRESS_MAP", "10.0.0.2=127.0.0.1"),
                ],
                &["serving", &proxy],
            ),
            start(
                "nsmgr",
                format!("nsmgr-{}", self.name),
                &[
                    ("NSM_NAME", &format!("nsmgr-{}", self.name)),
                    ("NSM_LISTEN_ON", &nsmgr),
                    ("NSM_REGISTRY_URL", &reg),
                ],
                &["serving", &nsmgr],
            ),
            start(
                "nsm-forwarder",
                format!("fwd-{}", self.name),
                &[
                    ("NSM_NAME", &format!("fwd-{}", self.name)),
                    ("NSM_LISTEN_ON", "tcp://127.0.0.1:0"),
                    ("NSM_CONNECT_TO", &nsmgr),
                    ("NSM_TUNNEL_IP", "127.0.0.1"),
                ],
                &["registered endpoint"],
            ),
        ]
    }
}

#[test]
fn an_nsc_reaches_an_endpoint_of_another_domain_through_the_proxies() {
    let Some(program) = dnsmasq("the interdomain process test") else {
        return;
    };
    let dir = TempDir::new("nsm", "interdomain");
    let (c1, c2) = (Domain::new("cluster1"), Domain::new("cluster2"));
    let dns_addr = free_addr();
    let records: Vec<(String, SocketAddr)> = [&c1, &c2]
        .iter()
        .flat_map(|d| {
            [
                (format!("registry.nsm-system.{}", d.name), d.registry),
                (format!("nsmgr-proxy.nsm-system.{}", d.name), d.nsmgr_proxy),
            ]
        })
        .collect();
    let _dns = DnsServer::start(
        &program,
        dns_addr,
        &records,
        &["cluster1".into(), "cluster2".into()],
    )
    .expect("dnsmasq");
    let _c1 = c1.start(&dir, dns_addr);
    let _c2 = c2.start(&dir, dns_addr);
    let mut nse = nsm_tests::start(
        &dir,
        "nse-icmp-responder",
        "nse",
        &[
            ("NSM_NAME", "nse"),
            ("NSM_LISTEN_ON", "tcp://127.0.0.1:0"),
            ("NSM_CONNECT_TO", &tcp(c2.nsmgr)),
            ("NSM_SERVICE_NAMES", "icmp-responder"),
            ("NSM_CIDR_PREFIX", "172.16.1.100/31"),
        ],
        false,
        READY,
    );
    nse.wait_for_log(&["registered endpoint", "name=nse"]);
    let mut nsc = nsm_tests::start(
        &dir,
        "nsc",
        "nsc",
        &[
            ("NSM_NAME", "nsc"),
            ("NSM_CONNECT_TO", &tcp(c1.nsmgr)),
            (
                "NSM_NETWORK_SERVICES",
                "kernel://icmp-responder@cluster2/nsm-1",
            ),
            ("NSM_REQUEST_TIMEOUT", "15s"),
            ("NSM_MECHANISM", "noop"),
        ],
        true,
        READY,
    );
    let line = nsc.next_stdout_line();
    let conn: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
    let names: Vec<&str> = conn["path"]["pathSegments"]
        .as_array()
        .expect("a path")
        .iter()
        .map(|s| s["name"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(
        names,
        [
            "nsc",
            "nsmgr-cluster1",
            "fwd-cluster1",
            "nsmgr-proxy-cluster1",
            "nsmgr-proxy-cluster2",
            "nsmgr-cluster2",
            "fwd-cluster2",
            "nse"
        ],
        "{line}"
    );
    assert_eq!(conn["networkService"], "icmp-responder@cluster2", "{line}");
    assert_eq!(conn["networkServiceEndpointName"], "nse@cluster2", "{line}");
    // The endpoint saw its own names only; the Close crosses back to it.
    let nse_id = conn["path"]["pathSegments"][7]["id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    nsc.terminate();
    nse.wait_for_log(&["close received", &format!("connection_id={nse_id}")]);
    assert!(!nse.log().contains("@cluster2"), "{}", nse.log());
}
