//! The demo mesh: two nodes in one process over real gRPC (unix sockets), an endpoint on
//! node 1, a client on node 0; prints what it starts, the connection path, the
//! addresses, then refreshes and closes the connection.
//!
//! (The kernel data plane demo with real interfaces replaces this once it lands; until
//! then the mechanism is NOOP.)

use std::time::Instant;

use nsm_proto::connection::Connection;
use nsm_proto::networkservice::NetworkServiceRequest;
use nsm_sdk::sandbox::{EndpointSpec, Sandbox, Transport};
use nsm_sdk::tools::NsUrl;
use nsm_sdk::Cx;

fn step(n: usize, what: &str) {
    eprintln!("[{n}/5] {what}");
}

#[tokio::main]
async fn main() {
    if let Err(e) = run().await {
        eprintln!("demo failed: {e}");
        std::process::exit(1);
    }
}

async fn run() -> nsm_sdk::Result<()> {
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
