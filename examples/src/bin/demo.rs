//! The demo: a pod joins a corporate network through a firewall and a VPN gateway on
//! another node (see [`nsm_examples::vpn_demo`]): real interfaces in network
//! namespaces, VXLAN between the nodes, a heal after the gateway dies.
//!
//! That needs root, `ip` and `nft`. Without them it says why and runs the in-process
//! sandbox version instead: two nodes over real gRPC (unix sockets), an endpoint on
//! node 1, a client on node 0, the NOOP mechanism; it prints the connection path and
//! the addresses, then refreshes and closes the connection.
//!
//! `demo --vl3` runs the vL3 act instead ([`nsm_examples::vl3_demo`]): three nodes, two
//! vL3 endpoints, six client pods that all ping each other, and an HTTP server in one
//! pod reached by name from a pod on another node. It needs root and `ip`.
//!
//! `demo --interdomain` is the interdomain act instead (see
//! [`nsm_examples::interdomain_demo`]): a pod of one cluster uses a VPN gateway of
//! another over VXLAN through public addresses; it needs root, `ip`, `nft` and
//! `dnsmasq`.
//!
//! Exit status 0 when every check passed, 1 otherwise.

use std::time::Instant;

use nsm_proto::connection::Connection;
use nsm_proto::networkservice::NetworkServiceRequest;
use nsm_sdk::config::NsUrl;
use nsm_sdk::sandbox::{EndpointSpec, Sandbox, Transport};
use nsm_sdk::Cx;

fn step(n: usize, what: &str) {
    eprintln!("[{n}/5] {what}");
}

#[tokio::main]
async fn main() {
    if std::env::args().skip(1).any(|a| a == "--vl3") {
        return vl3().await;
    }
    if std::env::args().skip(1).any(|a| a == "--interdomain") {
        return interdomain().await;
    }
    let outcome = match nsm_examples::vpn_demo::can_run() {
        Ok(()) => {
            eprintln!("nsm-rs demo: a pod on node 1 reaches a corporate network behind a VPN gateway on node 2, through a firewall");
            nsm_examples::vpn_demo::run()
                .await
                .map_err(|e| e.to_string())
        }
        Err(why) => {
            eprintln!("the kernel demo needs root, ip and nft: {why}");
            eprintln!(
                "running the in-process sandbox version instead (NOOP mechanism, no interfaces)\n"
            );
            sandbox().await.map_err(|e| e.to_string())
        }
    };
    if let Err(e) = outcome {
        eprintln!("demo failed: {e}");
        std::process::exit(1);
    }
}

/// The vL3 act, as root only.
async fn vl3() {
    if let Err(why) = nsm_testkit::lab::can_build() {
        eprintln!("the vL3 demo needs root and ip: {why}");
        std::process::exit(1);
    }
    eprintln!(
        "nsm-rs demo, vL3 act: six pods on three nodes in one flat IPv4/IPv6 network, with names"
    );
    if let Err(e) = nsm_examples::vl3_demo::run().await {
        eprintln!("demo failed: {e}");
        std::process::exit(1);
    }
}

/// The interdomain act, as root only.
async fn interdomain() {
    if let Err(why) = nsm_examples::vpn_demo::can_run() {
        eprintln!("the interdomain demo needs root, ip, nft and dnsmasq: {why}");
        std::process::exit(1);
    }
    eprintln!("nsm-rs interdomain demo: a pod of cluster-a reaches a corporate network behind a VPN gateway of cluster-b");
    if let Err(e) = nsm_examples::interdomain_demo::run().await {
        eprintln!("demo failed: {e}");
        std::process::exit(1);
    }
}

async fn sandbox() -> nsm_sdk::Result<()> {
    step(
        1,
        "starting a registry and 2 nodes (a manager and a forwarder each) on unix sockets",
    );
    let mesh = Sandbox::builder()
        .nodes(2)
        .transport(Transport::Unix)
        .build()
        .await?;
    eprintln!("      registry at {}", mesh.registry_url());

    step(
        2,
        "starting the endpoint icmp-responder on node 1 (addresses from 172.16.1.0/24)",
    );
    let nse = mesh
        .node(1)
        .endpoint(
            EndpointSpec::new("icmp-responder", "icmp-responder").ipam(
                "172.16.1.0/24"
                    .parse()
                    .map_err(|e| nsm_sdk::Error::invalid(format!("{e}")))?,
            ),
        )
        .await?;

    step(
        3,
        "client nsc on node 0 requests kernel://icmp-responder/nsm-1",
    );
    let nsc = mesh.node(0).client("nsc");
    let url = NsUrl::parse("kernel://icmp-responder/nsm-1")?;
    let started = Instant::now();
    let conn = nsc.request(&mut Cx::client(), url.to_request()).await?;
    eprintln!("      connected in {:?}", started.elapsed());
    show(&conn);
    println!("{}", nsm_proto::json::connection_to_json(&conn));

    step(4, "refreshing the connection (same path, same ids)");
    let again = nsc
        .request(
            &mut Cx::client(),
            NetworkServiceRequest {
                connection: Some(conn.clone()),
                ..Default::default()
            },
        )
        .await?;
    let same = ids(&again) == ids(&conn);
    eprintln!(
        "      path unchanged: {same}; the endpoint saw {} requests",
        nse.counter.requests()
    );

    step(5, "closing: the Close travels the whole path");
    nsc.close(&mut Cx::client(), again).await?;
    eprintln!("      the endpoint saw {} close(s)", nse.counter.closes());
    if !same || nse.counter.closes() != 1 {
        return Err(nsm_sdk::Error::internal("the demo's checks failed"));
    }
    eprintln!("done");
    Ok(())
}

fn ids(c: &Connection) -> Vec<String> {
    c.path
        .as_ref()
        .map(|p| p.path_segments.iter().map(|s| s.id.clone()).collect())
        .unwrap_or_default()
}

fn show(conn: &Connection) {
    if let Some(path) = &conn.path {
        eprintln!("      path ({} segments):", path.path_segments.len());
        for (i, s) in path.path_segments.iter().enumerate() {
            eprintln!("        {i}. {:<16} id {}", s.name, s.id);
        }
    }
    if let Some(ip) = conn.context.as_ref().and_then(|c| c.ip_context.as_ref()) {
        eprintln!(
            "      client address {:?}, endpoint address {:?}",
            ip.src_ip_addrs, ip.dst_ip_addrs
        );
        let routes: Vec<_> = ip.src_routes.iter().map(|r| r.prefix.clone()).collect();
        eprintln!("      client routes {routes:?}");
    }
}
