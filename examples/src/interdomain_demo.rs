//! The interdomain act of the demo (`demo --interdomain`): a pod of `cluster-a` joins
//! a corporate network behind a VPN gateway of `cluster-b`, over VXLAN between the two
//! clusters' nodes through their public addresses; then the gateway dies and the
//! connection heals to a second one on the other node of `cluster-b`.
//!
//! Everything NSM runs here is in this process ([`nsm_sdk::sandbox::Interdomain`]):
//! per cluster a registry, a registry proxy and an nsmgr-proxy (its address map names
//! each node's public address), and per node a manager and a forwarder (KERNEL + VXLAN,
//! its tunnel in the node's namespace); each cluster has its own throw-away CA and the
//! bundles are federated. The clusters find each other's registry and nsmgr-proxy by
//! DNS (a real dnsmasq on loopback). The network is a [`Lab`] of namespaces
//! ([`two_clusters`]): two nodes per cluster with internal addresses behind a gateway
//! that translates their public addresses; only the public link joins the clusters.
//!
//! Each check is an assertion: the act returns an error (and the program exits 1) when
//! one fails, so CI runs it as a test (`tests/tests/demo.rs`).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use ipnet::IpNet;
use nsm_sdk::chains::{client, EndpointOptions};
use nsm_sdk::config::NsUrl;
use nsm_sdk::handlers::{heal, parse_address_map, HealOptions};
use nsm_sdk::sandbox::{Interdomain, Transport};
use nsm_sdk::transport::{serve, Server, Url};
use nsm_sdk::{Chain, Cx};
use nsm_sdk_kernel::kernel_client;
use nsm_sdk_vxlan::mechanism::{vxlan_forwarder_mechanisms, Tunnel};
use nsm_testkit::clusters::two_clusters;
use nsm_testkit::dnsmasq::{dnsmasq, free_addr, DnsServer};
use nsm_testkit::lab::Lab;
use tokio_util::sync::CancellationToken;

use crate::gateway::{route_to_corporate, vpn_gateway};
use crate::vpn_demo::{
    check, corporate_network, gateway_registration, wait_for_heal, DemoError, CORPORATE_HOST,
    SERVICE,
};

const CORPORATE: &str = "10.60.0.0/24";
const CLIENT_CIDR: &str = "172.16.90.0/24";
const STEPS: usize = 8;
/// The two domains of the act.
pub const DOMAINS: [&str; 2] = ["cluster-a", "cluster-b"];

fn step(n: usize, what: &str) {
    eprintln!("\n[{n}/{STEPS}] {what}");
}

fn fail(what: &str, e: impl std::fmt::Display) -> DemoError {
    DemoError::Check(format!("{what}: {e}"))
}

/// The gateways' servers, their tasks and their socket directory.
struct Gateways {
    dir: PathBuf,
    running: Vec<(Server, CancellationToken)>,
}

impl Drop for Gateways {
    fn drop(&mut self) {
        for (server, root) in self.running.drain(..) {
            server.kill();
            root.cancel();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Starts the VPN gateway `name` in the lab pod `pod` on node `node` of `cluster-b`
/// and registers it there.
async fn start_gateway(
    mesh: &Interdomain,
    lab: &Lab,
    gateways: &mut Gateways,
    name: &str,
    pod: &str,
    node: usize,
) -> Result<(), DemoError> {
    let b = mesh.domain(DOMAINS[1]);
    let cidr: IpNet = CLIENT_CIDR.parse().map_err(|e| fail("cidr", e))?;
    let corporate: IpNet = CORPORATE.parse().map_err(|e| fail("cidr", e))?;
    let root = CancellationToken::new();
    let gw = vpn_gateway(
        name,
        &lab.url(pod),
        vec![cidr],
        vec![corporate],
        EndpointOptions::new()
            .security(b.security())
            .root(root.clone()),
    );
    let url = Url::Unix(gateways.dir.join(format!("{name}.sock")));
    let server = serve(&url, b.security().serve(gw.services())).await?;
    gateways.running.push((server, root));
    route_to_corporate(&lab.netns(pod)?, &[corporate])
        .await
        .map_err(|e| fail("gateway routing", e))?;
    b.node(node).ensure_service(SERVICE).await?;
    b.node(node)
        .registration_front()
        .nse
        .register(&mut Cx::client(), gateway_registration(name, &url, &[]))
        .await?;
    Ok(())
}

/// The links NSM made in a namespace (all but `lo`, `corp0` and the lab's own).
fn made_links(lab: &Lab, ns: &str) -> Result<Vec<String>, DemoError> {
    Ok(lab
        .links(ns)?
        .into_iter()
        .filter(|(n, _)| !["lo", "corp0", "eth0", "pub0", "n0", "n1"].contains(&n.as_str()))
        .map(|(n, kind)| format!("{n} ({kind})"))
        .collect())
}

/// Runs the act in a lab of its own; `Ok` when every check passed and nothing was left.
pub async fn run() -> Result<(), DemoError> {
    let Some(dnsmasq) = dnsmasq("the interdomain demo") else {
        return Err(DemoError::Check(
            "the interdomain demo needs dnsmasq (apt-get install dnsmasq-base)".into(),
        ));
    };
    let started = Instant::now();
    let mut lab = Lab::new(format!("nsmdemo-{}", std::process::id()));

    step(
        1,
        "building two clusters of two nodes, joined only by a public link; a corporate network behind cluster-b",
    );
    let [net_a, net_b] = two_clusters(&mut lab, ["a", "b"], 2)?;
    for ns in ["nsc", "gw1", "gw2", "corp"] {
        lab.add(ns)?;
    }
    corporate_network(&lab)?;
    for c in [&net_a, &net_b] {
        for n in &c.nodes {
            eprintln!(
                "      {}: internal {}, public {}",
                n.ns, n.internal, n.public
            );
        }
    }
    let unreachable = lab
        .exec(
            &net_b.nodes[0].ns,
            "ping",
            &["-c1", "-W0.5", &net_a.nodes[0].internal],
        )
        .is_err();
    check(
        unreachable,
        "cluster-b cannot reach cluster-a's internal addresses",
    )?;

    step(
        2,
        "starting both domains (registry, registry proxy, nsmgr-proxy; a manager and a VXLAN/KERNEL forwarder per node) and their DNS records",
    );
    let mut builder = Interdomain::builder();
    for (domain, net) in DOMAINS.iter().zip([&net_a, &net_b]) {
        let mut tunnels = Vec::new();
        for n in &net.nodes {
            let ip = n.internal.parse().map_err(|e| fail("tunnel ip", e))?;
            let tunnel = Tunnel::builder(ip)
                .netns(lab.netns(&n.ns)?)
                .build()
                .await
                .map_err(|e| fail("tunnel", e))?;
            tunnels.push(tunnel);
        }
        builder = builder
            .cluster_with(*domain, net.nodes.len(), move |b| {
                let tunnels = tunnels.clone();
                b.transport(Transport::Unix)
                    .forwarder_mechanisms(move |i| vxlan_forwarder_mechanisms(tunnels[i].clone()))
            })
            .addresses(*domain, parse_address_map(&net.address_map())?);
    }
    let dns_addr = free_addr();
    let mesh = builder.dns_server(dns_addr).build().await?;
    let _dns = DnsServer::start(
        &dnsmasq,
        dns_addr,
        &mesh.dns_records(),
        &mesh.domain_names(),
    )
    .map_err(|e| fail("dnsmasq", e))?;
    for (name, addr) in mesh.dns_records() {
        eprintln!("      DNS: {name} -> {addr}");
    }
    eprintln!(
        "      security on: a CA per domain, federated bundles, mTLS on every link, signed path tokens"
    );
    for (domain, net) in DOMAINS.iter().zip([&net_a, &net_b]) {
        eprintln!(
            "      {domain}'s nsmgr-proxy swaps tunnel addresses: {}",
            net.address_map()
        );
    }

    step(3, "starting the VPN gateway gw-1 on cluster-b's node 0");
    let dir = std::env::temp_dir().join(format!("nsm-demo-gw-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| fail("socket directory", e))?;
    let mut gateways = Gateways {
        dir,
        running: Vec::new(),
    };
    start_gateway(&mesh, &lab, &mut gateways, "gw-1", "gw1", 0).await?;
    eprintln!("      gw-1: addresses from {CLIENT_CIDR}, route to {CORPORATE}, NAT to the corporate network");

    step(
        4,
        "the client pod on cluster-a's node 0 requests kernel://vpn-gateway@cluster-b/nsm-1",
    );
    let a_node = mesh.domain(DOMAINS[0]).node(0);
    let nsc: Chain = client(
        a_node
            .client_options("nsc")
            .mechanisms(vec![])
            .handler(heal(HealOptions::new(a_node.channels())))
            .handler(kernel_client(lab.url("nsc")).ifname("nsm-1")),
    );
    let url = NsUrl::parse(&format!("kernel://{SERVICE}@{}/nsm-1", DOMAINS[1]))?;
    let t = Instant::now();
    let conn = nsc.request(&mut Cx::client(), url.to_request()).await?;
    eprintln!("      connected in {} ms", t.elapsed().as_millis());
    let names: Vec<String> = conn
        .path
        .as_ref()
        .map(|p| p.path_segments.iter().map(|s| s.name.clone()).collect())
        .unwrap_or_default();
    eprintln!("      path ({} segments):", names.len());
    for (i, n) in names.iter().enumerate() {
        let side = match i {
            0 => "cluster-a, pod nsc",
            1..=3 => "cluster-a",
            7 => "cluster-b, pod gw1",
            _ => "cluster-b",
        };
        eprintln!("        {i}. {n:<24} ({side})");
    }
    check(
        names.len() == 8 && names[0] == "nsc" && names[7] == "gw-1",
        "8 segments, from the client across both borders to gw-1",
    )?;
    check(
        conn.network_service_endpoint_name == "gw-1@cluster-b",
        "the client sees gw-1@cluster-b; gw-1 never sees @cluster-b",
    )?;
    let (a0, b0, b1) = (&net_a.nodes[0], &net_b.nodes[0], &net_b.nodes[1]);
    let ends = lab.vxlan_ends("nsc")?;
    eprintln!("      the client's VXLAN device (local, remote): {ends:?}");
    check(
        ends == Some((a0.internal.clone(), b0.public.clone())),
        "the client's side: its node's internal address, gw-1's node's public one",
    )?;
    let ends = lab.vxlan_ends("gw1")?;
    eprintln!("      gw-1's VXLAN device (local, remote): {ends:?}");
    check(
        ends == Some((b0.internal.clone(), a0.public.clone())),
        "gw-1's side: its node's internal address, the client's node's public one",
    )?;

    step(
        5,
        "proving it: ping from the client pod to the corporate host",
    );
    let (_, tx_before) = lab.packets(&net_a.gateway, "pub0")?;
    let summary = lab.ping("nsc", CORPORATE_HOST, 3)?;
    eprintln!("      ping {CORPORATE_HOST}: {summary}");
    let (_, tx_after) = lab.packets(&net_a.gateway, "pub0")?;
    check(
        tx_after >= tx_before + 3,
        format!(
            "the pings crossed the public link encapsulated ({} packets out of cluster-a's gateway)",
            tx_after - tx_before
        ),
    )?;

    step(
        6,
        "killing gw-1 and starting gw-2 on cluster-b's node 1 (same addresses, other pod)",
    );
    start_gateway(&mesh, &lab, &mut gateways, "gw-2", "gw2", 1).await?;
    let killed = Instant::now();
    let (server, root) = gateways.running.remove(0);
    server.kill();
    root.cancel();
    eprintln!("      gw-1 killed (its server and tasks stopped; still registered)");
    let (rewired, healed) = wait_for_heal(&lab, killed, CORPORATE_HOST, |lab| {
        Ok(lab.vxlan_ends("gw2")?.is_some())
    })
    .await?;
    eprintln!(
        "      healed: gw-2 has its tunnel after {} ms; the client reaches {CORPORATE_HOST} again after {} ms",
        rewired.as_millis(),
        healed.as_millis()
    );
    let ends = lab.vxlan_ends("nsc")?;
    eprintln!("      the client's VXLAN device now (local, remote): {ends:?}");
    check(
        ends == Some((a0.internal.clone(), b1.public.clone())),
        "the client's tunnel now goes to gw-2's node's public address",
    )?;

    step(7, "closing the connection");
    let conn = nsc
        .request(&mut Cx::client(), nsm_testkit::refresh(&conn))
        .await?;
    check(
        conn.network_service_endpoint_name == "gw-2@cluster-b",
        "the connection is on gw-2@cluster-b",
    )?;
    nsc.close(&mut Cx::client(), conn).await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut all = vec!["nsc".to_string(), "gw1".into(), "gw2".into()];
    for c in [&net_a, &net_b] {
        all.push(c.gateway.clone());
        all.extend(c.nodes.iter().map(|n| n.ns.clone()));
    }
    for ns in &all {
        let left = made_links(&lab, ns)?;
        check(left.is_empty(), format!("{ns}: nothing left {left:?}"))?;
    }

    step(8, "stopping the mesh and removing the lab");
    drop(gateways);
    drop(mesh);
    lab.teardown();
    eprintln!("\ndone in {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}
